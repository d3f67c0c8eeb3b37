"""Networks and training: the timm model factory (offline-safe weights, head reset, EMA,
channels_last), one optimisation step (engine), one fold (fit), the K-fold CV with MLflow runs
and resume, DDP and fold-parallel workers.  Imports core, artifacts, data, evaluation.metrics."""
