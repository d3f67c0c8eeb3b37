"""A fold localiser on disk: `localiser.pt` (state dict; with a refiner, {"localiser": ...,
"refiner": ...}) + `meta.json` (what it needs to run and how it was made).  meta.json is written
last, so a folder without it is unfinished.

The same layout travels inside the registered model (artifacts `localiser_<k>`), so the served
model finds boxes with exactly the networks the locate stage scored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from src.core.errors import BoneHealthError
from src.core.fileio import atomic_path, atomic_write_json, read_json_object

WEIGHTS_FILE = "localiser.pt"
META_FILE = "meta.json"
REFINED_KEYS = ("localiser", "refiner")


@dataclass
class LocaliserMeta:
    model: str                      # timm backbone
    size: list[int]                 # overview [h, w]
    min_confidence: float           # below it: no cortex found
    both_sides: bool = False        # classify a crop on each side and average
    fold: int | None = None         # the fold it never saw
    fingerprint: str | None = None  # settings + data + code it was trained with (resume)
    mlflow_run_id: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # its held-out fold's scores
    refine: dict[str, Any] | None = None  # the refiner's FineView.as_meta(); None: no refiner

    def fine_view(self):
        # refine needs torch and timm: not for readers of meta.json only
        from src.localise.refine import FineView

        if self.refine is None:
            return None
        try:
            return FineView(tuple(self.refine["size"]), tuple(self.refine["window"]), float(self.refine["jitter"]))
        except (KeyError, TypeError, ValueError):
            raise BoneHealthError(f"meta.json of localiser fold {self.fold}: refine {self.refine!r}; expected "
                                  "size, window and jitter (rerun `python -m src.locate`)") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "LocaliserMeta":
        missing = [k for k in ("model", "size", "min_confidence") if k not in data]
        if missing:
            raise BoneHealthError(f"{source}: key(s) {', '.join(missing)} missing (is this a bone-health localiser?)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def save_localiser(directory: str | Path, state_dict, meta: LocaliserMeta, refiner_state=None) -> Path:
    import torch

    if (refiner_state is None) != (meta.refine is None):
        raise BoneHealthError(f"{directory}: a refiner needs its view in meta.refine, and meta.refine its refiner")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(state_dict) if refiner_state is None else {REFINED_KEYS[0]: dict(state_dict),
                                                               REFINED_KEYS[1]: dict(refiner_state)}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save(weights, tmp)
    atomic_write_json(directory / META_FILE, asdict(meta))
    return directory


def is_localiser(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / WEIGHTS_FILE).is_file() and (directory / META_FILE).is_file()


def read_localiser_meta(directory: str | Path) -> LocaliserMeta:
    path = Path(directory) / META_FILE
    return LocaliserMeta.from_dict(read_json_object(path, "localiser meta missing"), str(path))


def load_localiser(directory: str | Path):
    """(network, refiner or None, meta) from a localiser folder, the networks in eval mode."""
    import torch

    from src.localise.network import (
        Localiser,  # timm and torch: not for readers of meta.json only
    )

    directory = Path(directory)
    if not is_localiser(directory):
        raise BoneHealthError(f"{directory}: not a localiser folder (expected {WEIGHTS_FILE} and {META_FILE}); "
                              "run `python -m src.locate`")
    meta = read_localiser_meta(directory)
    model, refiner = Localiser(meta.model), None if meta.refine is None else Localiser(meta.model)
    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        if refiner is None:
            model.load_state_dict(state)
        else:
            if set(state) != set(REFINED_KEYS):
                raise RuntimeError(f"expected the weights of {' and '.join(REFINED_KEYS)} (meta.json names a refiner)")
            model.load_state_dict(state[REFINED_KEYS[0]])
            refiner.load_state_dict(state[REFINED_KEYS[1]])
    except (RuntimeError, OSError, EOFError) as exc:
        raise BoneHealthError(f"{directory / WEIGHTS_FILE}: cannot load the localiser "
                              f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval(), None if refiner is None else refiner.eval(), meta
