"""Optuna over the same folds and trainer: study storage, lock and heartbeats; pruners (Wilcoxon
or median, with an exact unreachable-best bound); trials and their MLflow runs.
Imports core, artifacts, evaluation.metrics and model."""
