"""Per-fold pruning of trials: Wilcoxon (made for k-fold objectives) or median, wrapped in an
exact bound that stops a trial as soon as its K-fold mean cannot beat the best any more."""
from __future__ import annotations

import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

from src.core.config import Params


def make_pruner(params: Params):
    cfg = params.tune
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "wilcoxon":
        with warnings.catch_warnings():  # "experimental since 3.6": known, and pinned in constraints.txt
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            inner = optuna.pruners.WilcoxonPruner(p_threshold=cfg.pruner_p_threshold,
                                                  n_startup_steps=cfg.pruner_startup_steps)
    else:
        # its own startup count: how many trials TPE samples at random says nothing about
        # how many completed trials make a median worth pruning against
        inner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                            n_warmup_steps=cfg.pruner_startup_steps - 1)
    return UnreachablePruner(inner) if cfg.prune_unreachable else inner


# Fold scores are ROC-AUCs (val or test), so no fold can score above this.
MAX_FOLD_SCORE = 1.0


def unreachable(values: list[float], n_folds: int, best: float) -> bool:
    """True when a trial with these fold scores cannot end above `best` even if every fold
    left scores MAX_FOLD_SCORE.  Folds that later give NaN (dropped by the mean) cannot
    lift it either: each fold score is at most the maximum, so adding folds at the maximum
    is the most any remainder can do."""
    if not values or not np.all(np.isfinite(values)) or len(values) >= n_folds:
        return False
    return (sum(values) + (n_folds - len(values)) * MAX_FOLD_SCORE) / n_folds < best


class UnreachablePruner(optuna.pruners.BasePruner):
    """Stops a trial whose K-fold mean can no longer beat the best completed trial's, then asks
    the wrapped pruner.  Exact, not statistical: it never stops a trial that could still have
    become the best, and it needs no startup trials or steps."""

    def __init__(self, inner: optuna.pruners.BasePruner):
        self.inner = inner

    def prune(self, study, trial) -> bool:
        n_folds = len(trial.user_attrs.get("fold_order") or ())  # set by run_trial
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if n_folds and completed:
            best = max(t.value for t in completed)  # the study maximises
            if unreachable(list(trial.intermediate_values.values()), n_folds, best):
                return True
        return self.inner.prune(study, trial)


