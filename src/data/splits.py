"""Who is tested and who trains: the outer test folds (assigned once, in prepare, and stored
with the data) and the inner training/validation split inside each fold's training part.

Both are grouped by patient and stratified by class, so no patient sits on both sides of
either split.  Only the inner validation part steers training (early stopping, LR, the
checkpoint); a fold's test images are predicted once, by the model chosen without them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from src.artifacts.store import PreparedStore
from src.core.errors import BoneHealthError, DataError

if TYPE_CHECKING:  # type only: dataset imports nothing from here
    from src.data.dataset import ImageRecord


# --------------------------------------------------------------------------- outer folds
def fold_groups(records: Sequence[ImageRecord]) -> list[str]:
    """Group id per record: its patient, merged with every patient that shares an image file."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_patient_of_hash: dict[str, str] = {}
    for r in records:
        find(r.patient)
        other = first_patient_of_hash.setdefault(r.sha256, r.patient)
        a, b = find(r.patient), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(r.patient) for r in records]


def assign_folds(labels: np.ndarray, groups: list[str], n_splits: int, seed: int) -> np.ndarray:
    """StratifiedGroupKFold test-fold index per image: one group never spans two folds."""
    labels = np.asarray(labels)
    fold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():
            # "least populated class has only N members": our own patient check already ran.
            warnings.simplefilter("ignore", UserWarning)
            for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
                fold[test] = k
    except ValueError as exc:
        raise DataError(f"prepare.folds={n_splits}: cannot split these patients into folds ({exc})") from None
    return fold


# --------------------------------------------------------------------------- inner split
@dataclass
class Split:
    train: np.ndarray  # store row indices
    val: np.ndarray
    test: np.ndarray



def inner_split(labels: np.ndarray, patients: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the given arrays) of a stratified, patient-grouped (train, val) split.

    StratifiedGroupKFold with round(1 / val_fraction) splits, first split whose both parts
    hold every class (tiny data can produce a one-class part; a later split usually doesn't).
    """
    n_splits = max(2, int(round(1.0 / val_fraction)))
    n_groups = len(np.unique(patients))
    if n_groups < n_splits:
        raise DataError(f"train.val_fraction={val_fraction}: needs at least {n_splits} patients in the training folds, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    classes = np.unique(labels)
    first = None
    with warnings.catch_warnings():
        # "The least populated class has only N members": expected on tiny toy sets.
        warnings.simplefilter("ignore", UserWarning)
        try:
            for train_pos, val_pos in splitter.split(np.zeros(len(labels)), labels, groups=patients):
                first = first or (train_pos, val_pos)
                if len(np.unique(labels[val_pos])) == len(classes) and len(np.unique(labels[train_pos])) == len(classes):
                    return np.sort(train_pos), np.sort(val_pos)
        except ValueError as exc:  # sklearn: more splits than members of a class
            raise DataError(f"train.val_fraction={val_fraction}: the training folds are too small for a "
                            f"{n_splits}-way stratified patient split ({exc})") from None
    return np.sort(first[0]), np.sort(first[1])


def fold_split(store: PreparedStore, fold: int, val_fraction: float, seed: int) -> Split:
    """Test fold k, and the other folds split into training and inner validation parts."""
    if not 0 <= fold < store.n_folds:
        raise BoneHealthError(f"fold {fold} is out of range: {store.root} has folds 0..{store.n_folds - 1}")
    test = store.indices_of_fold(fold)
    rest = store.indices_not_in_fold(fold)
    if len(test) == 0 or len(rest) == 0:
        raise DataError(f"{store.root}: fold {fold} leaves an empty test or training set")
    tr, va = inner_split(store.labels[rest], store.patients[rest], val_fraction, seed)
    return Split(train=rest[tr], val=rest[va], test=test)
