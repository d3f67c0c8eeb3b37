"""bone-health: experiment-tracked osteoporosis screening on dental panoramic radiographs.

Research software: a screening aid for studies, not a diagnostic device.
"""
import os as _os

# albumentations 2.0.8 checks PyPI at import; we never want a network call at run time.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Never reach for a weights hub implicitly: pretrained weights come from train.weights or
# the existing cache.  Users who want timm to download set HF_HUB_OFFLINE=0 themselves.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
