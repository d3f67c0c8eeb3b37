"""Settings, errors, CLI plumbing, atomic files, MLflow wiring, device/seed/threads, logging.

Imports nothing from the project: every other package may import it."""
