"""The typed files stages hand to each other: the prepared store, checkpoints (CheckpointMeta),
the finished CV run (cv.json, fold folders, out-of-fold predictions, its MLflow parent run), the
metrics files and the checkpoint layout of a registered model.  Imports only src.core."""
