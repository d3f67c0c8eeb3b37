"""bone-health: experiment-tracked osteoporosis screening on dental panoramic radiographs.

Research software: a screening aid for studies, not a diagnostic device.  Package map and
data flow: docs/ARCHITECTURE.md.  Importing this package changes nothing in the process;
stage entries set the offline defaults explicitly (src.core.runtime.offline_defaults).
"""
