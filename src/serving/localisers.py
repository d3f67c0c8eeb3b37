"""The locate stage's fold localisers as the serving side finds them: what register bundles into
a crop-mode model, and what predict uses with a local train.out or checkpoint folder."""
from __future__ import annotations

from pathlib import Path

from src.core.errors import BoneHealthError
from src.localise.artifact import META_FILE, WEIGHTS_FILE, is_localiser
from src.localise.files import FOLDS_DIR

FOLD_DIR_PREFIX = "fold_"


def fold_suffix(directory: Path) -> str:
    """fold_3 -> '3': the fold a localiser never saw, kept in its artifact name (localiser_3)."""
    return directory.name[len(FOLD_DIR_PREFIX):]


def fold_localiser_dirs(locate_out: str | Path) -> list[Path]:
    """`{locate.out}/folds/fold_<k>` in numeric order; [] when the locate stage has written none.

    A fold folder without both files is a locate run that was killed or is still running: refused,
    since a model (or a prediction) built from some of the folds is not the run that was scored."""
    root = Path(locate_out) / FOLDS_DIR
    if not root.is_dir():
        return []
    folds = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(FOLD_DIR_PREFIX)]
    unfinished = sorted(p for p in folds if not is_localiser(p))
    if unfinished:
        raise BoneHealthError(f"{unfinished[0]}: unfinished localiser (expected {WEIGHTS_FILE} and {META_FILE}); "
                              "finish it with `python -m src.locate`")
    return sorted(folds, key=lambda p: (not fold_suffix(p).isdigit(),
                                        int(fold_suffix(p)) if fold_suffix(p).isdigit() else 0, p.name))
