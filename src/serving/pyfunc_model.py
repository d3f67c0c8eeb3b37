"""The registered model: raw radiograph bytes in, the mean of the fold models' probabilities out.

One `Ensemble` does the work for every way in: the MLflow pyfunc (registry, `mlflow models
serve`), `python -m src.predict` and the Grad-CAM single-image mode, so a served answer and a
command-line answer cannot drift apart.  Raw images go through `src.data.imaging` and
`src.data.preprocess.preprocess_image` with the checkpoints' own `preprocessing` dict: the exact
transform the training images went through in `prepare`.

Layout of a logged model (what `src.artifacts.model_ref` reads back):
    <model>/artifacts/fold_<k>/model.pt + meta.json   one per fold (or one `fold_refit`)
    <model>/artifacts/localiser_<k>/localiser.pt + meta.json   crop mode, when the locate stage ran
    <model>/artifacts/model_card/model_card.md + metadata.json
A crop-mode row without a box is cropped where the localisers (src.localise.finder) point; with
their `both_sides`, on each side that passes min_confidence, the probabilities averaged.
Input DataFrame: `image` = base64 of the file bytes (PNG, JPEG, TIFF, BMP, DICOM) and optional
`box_x, box_y, box_w, box_h` (source pixels; the crop box in crop mode).  Output DataFrame:
`prob_<class>` per class and `predicted` (the arg-max class); crop-mode models add the box the
crop was centred on (`box_x..box_h`), where it came from (`box_source`: "given" by the caller,
else "found" by the bundled localiser), the localiser's `box_confidence` (NaN for a given box)
and `error` (None, or why no cortex was found: that row's probabilities are NaN).
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from src.artifacts.checkpoint import CheckpointMeta
from src.artifacts.model_ref import sorted_checkpoint_keys, sorted_localiser_keys
from src.core.config import DataParams
from src.core.errors import BoneHealthError, DataError
from src.core.offline import offline_defaults
from src.data.imaging import read_image, read_image_bytes
from src.data.preprocess import Box, preprocess_crops, preprocess_image
from src.localise.finder import BoxFinder, NoCortexFound
from src.model.factory import load_checkpoint, predict_proba

IMAGE_COLUMN = "image"
BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")
PREDICTED_COLUMN = "predicted"
BOX_SOURCE_COLUMN = "box_source"
BOX_CONFIDENCE_COLUMN = "box_confidence"
ERROR_COLUMN = "error"
# The crop-mode output columns after prob_<class> and predicted, in order.
CROP_COLUMNS = (*BOX_COLUMNS, BOX_SOURCE_COLUMN, BOX_CONFIDENCE_COLUMN, ERROR_COLUMN)
GIVEN, FOUND = "given", "found"
CARD_KEY = "model_card"
DEFAULT_BATCH_SIZE = 16
# Models registered before data.max_pixels existed carry no limit in their config: the default's.
DEFAULT_MAX_PIXELS = DataParams.model_fields["max_pixels"].default



def prob_column(cls: str) -> str:
    return f"prob_{cls}"


@dataclass(frozen=True)
class BoxChoice:
    """The box a crop was centred on and where it came from."""
    box: Box
    source: str                  # GIVEN or FOUND
    confidence: float = math.nan  # the localiser's peak probability; NaN for a given box


@dataclass
class Prepared:
    """One radiograph ready for the networks: one array (full mode, a given box) or a crop per
    side (both_sides), whose probabilities are averaged."""
    arrays: list[np.ndarray]
    box: BoxChoice | None = None  # crop mode only


class Ensemble:
    """K fold checkpoints that share classes and preprocessing; predicts their mean probability."""

    def __init__(self, checkpoint_dirs: Sequence[str | Path], batch_size: int = DEFAULT_BATCH_SIZE,
                 device: str = "cpu", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 localiser_dirs: Sequence[str | Path] | None = None):
        if not checkpoint_dirs:
            raise BoneHealthError("no checkpoints given: expected at least one fold_<k>/ folder with model.pt + meta.json")
        self.checkpoint_dirs = [Path(d) for d in checkpoint_dirs]
        loaded = [load_checkpoint(d, device=device) for d in self.checkpoint_dirs]
        self.models = [m for m, _ in loaded]
        self.metas: list[CheckpointMeta] = [meta for _, meta in loaded]
        self.batch_size = int(batch_size)
        self.max_pixels = max_pixels
        self.device = device
        first = self.metas[0]
        # Averaging probabilities is only meaningful when every member saw the same inputs
        # and speaks about the same classes in the same order.
        for key in ("classes", "preprocessing"):
            for directory, meta in zip(self.checkpoint_dirs[1:], self.metas[1:]):
                if getattr(meta, key) != getattr(first, key):
                    raise BoneHealthError(
                        f"{directory}/meta.json: {key!r} differs from {self.checkpoint_dirs[0]}/meta.json; "
                        "an ensemble needs folds trained on the same classes and preprocessing"
                    )
        if not first.preprocessing:
            raise BoneHealthError(
                f"{self.checkpoint_dirs[0]}/meta.json: missing 'preprocessing' (the prepare settings); "
                "cannot reproduce the training transform for raw images"
            )
        self.finder: BoxFinder | None = None
        if localiser_dirs:
            self.use_localisers(localiser_dirs)

    def use_localisers(self, localiser_dirs: Sequence[str | Path]) -> None:
        """Find the crop box with these fold localisers when none is given; full-mode models crop
        nothing, so theirs are not even loaded."""
        if self.is_crop and localiser_dirs:
            self.finder = BoxFinder(list(localiser_dirs))

    @property
    def is_crop(self) -> bool:
        return self.preprocessing.get("mode") == "crop"

    @property
    def classes(self) -> list[str]:
        return list(self.metas[0].classes)

    @property
    def positive_class(self) -> str | None:
        return self.metas[0].positive_class

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.metas[0].prepare_settings

    # ------------------------------------------------------------------ inputs
    def prepare(self, image: np.ndarray, box: Box | None = None) -> np.ndarray:
        """A decoded grey radiograph -> the array a training image was stored as."""
        array, _geometry = preprocess_image(image, self.preprocessing, box)
        return array

    def prepare_bytes(self, data: bytes, name: str, box: Box | None = None) -> np.ndarray:
        return self.prepare(read_image_bytes(data, name, self.max_pixels), box)

    def prepare_file(self, path: str | Path, box: Box | None = None) -> np.ndarray:
        return self.prepare(read_image(path, self.max_pixels), box)

    def prepare_input(self, image: np.ndarray, box: Box | None = None, name: str = "image") -> Prepared:
        """A decoded radiograph -> its array(s); in crop mode a given box wins, else the localiser
        finds one (NoCortexFound when it finds none), else DataError naming `name`."""
        if not self.is_crop:
            return Prepared([self.prepare(image)])
        if box is not None:
            return Prepared([self.prepare(image, box)], BoxChoice(tuple(float(v) for v in box), GIVEN))
        if self.finder is None:
            raise DataError(f"{name}: crop mode needs a box (x, y, w, h) for every image and this model bundles no "
                            f"localiser to find one; give {', '.join(BOX_COLUMNS)}")
        located = self.finder.locate(image)
        arrays = preprocess_crops(image, self.preprocessing, located.boxes(self.finder.both_sides))
        return Prepared(arrays, BoxChoice(tuple(float(v) for v in located.box), FOUND, float(located.confidence)))

    # --------------------------------------------------------------- predicting
    def predict_prepared(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Prepared arrays -> (N, C) mean probabilities over the fold models."""
        n = len(arrays)
        total = np.zeros((n, len(self.classes)), dtype=np.float64)
        if n == 0:
            return total.astype(np.float32)
        # Full mode keeps each radiograph's aspect ratio, so prepared shapes can differ;
        # stack those that agree (to_input resizes every group to the model's input size).
        groups: dict[tuple, list[int]] = {}
        for i, arr in enumerate(arrays):
            groups.setdefault((np.asarray(arr).shape, np.asarray(arr).dtype.str), []).append(i)
        for idx in groups.values():
            stacked = np.stack([np.asarray(arrays[i]) for i in idx])
            for model, meta in zip(self.models, self.metas):
                total[idx] += predict_proba(model, stacked, meta, batch_size=self.batch_size, device=self.device)
        return (total / len(self.models)).astype(np.float32)

    def predict_inputs(self, inputs: Sequence[Prepared]) -> np.ndarray:
        """(N, C): each radiograph's probabilities, averaged over its crops (both sides)."""
        flat = [arr for item in inputs for arr in item.arrays]
        probs = self.predict_prepared(flat)
        out = np.zeros((len(inputs), len(self.classes)), dtype=np.float32)
        start = 0
        for i, item in enumerate(inputs):
            out[i] = probs[start:start + len(item.arrays)].mean(axis=0)
            start += len(item.arrays)
        return out

    def predict_images(self, images: Sequence[np.ndarray], boxes: Sequence[Box | None] | None = None) -> np.ndarray:
        boxes = list(boxes) if boxes is not None else [None] * len(images)
        return self.predict_prepared([self.prepare(img, box) for img, box in zip(images, boxes)])

    def to_frame(self, probs: np.ndarray) -> pd.DataFrame:
        """(N, C) probabilities -> the pyfunc's output columns (full mode's, the first of crop mode's)."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(self.classes))
        frame = pd.DataFrame({prob_column(c): probs[:, j] for j, c in enumerate(self.classes)})
        frame[PREDICTED_COLUMN] = [self.classes[j] for j in probs.argmax(axis=1)] if len(probs) else []
        return frame

    def crop_frame(self, probs: np.ndarray, choices: Sequence[BoxChoice | None],
                   errors: Sequence[str | None]) -> pd.DataFrame:
        """Crop mode's output: to_frame's columns, then CROP_COLUMNS; an error row (NaN
        probabilities) has no prediction and no box."""
        frame = self.to_frame(probs)
        failed = np.array([e is not None for e in errors], dtype=bool)
        frame[PREDICTED_COLUMN] = frame[PREDICTED_COLUMN].astype(object).where(~failed, None)
        for j, col in enumerate(BOX_COLUMNS):
            frame[col] = [c.box[j] if c is not None else math.nan for c in choices]
        frame[BOX_SOURCE_COLUMN] = pd.Series([c.source if c is not None else None for c in choices], dtype=object)
        frame[BOX_CONFIDENCE_COLUMN] = [c.confidence if c is not None else math.nan for c in choices]
        frame[ERROR_COLUMN] = pd.Series(list(errors), dtype=object)
        return frame

    def predict_frame(self, model_input: pd.DataFrame) -> pd.DataFrame:
        """The pyfunc contract: base64 `image` (+ optional box columns) -> probabilities.

        Unreadable input fails the whole request (the caller's mistake, HTTP 400); a radiograph
        on which the localiser finds no cortex is an error row, and the other rows are answered."""
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if IMAGE_COLUMN not in model_input.columns:
            raise DataError(
                f"model input: column {IMAGE_COLUMN!r} (base64 of the image file bytes) is missing; "
                f"got columns {list(model_input.columns)}"
            )
        ready: list[Prepared] = []
        errors: list[str | None] = []
        for row, (value, box) in enumerate(zip(model_input[IMAGE_COLUMN], boxes_from_frame(model_input))):
            name = f"row {row}"
            image = read_image_bytes(decode_image_field(value, name), name, self.max_pixels)
            try:
                ready.append(self.prepare_input(image, box, name))
                errors.append(None)
            except NoCortexFound as exc:
                ready.append(Prepared([]))
                errors.append(str(exc).splitlines()[0])
        answered = [i for i, e in enumerate(errors) if e is None]
        probs = np.full((len(ready), len(self.classes)), np.nan, dtype=np.float64)
        if answered:
            probs[answered] = self.predict_inputs([ready[i] for i in answered])
        if not self.is_crop:
            return self.to_frame(probs)
        return self.crop_frame(probs, [r.box for r in ready], errors)


def decode_image_field(value: Any, name: str) -> bytes:
    """A base64 string (or already raw bytes) -> file bytes; DataError naming the row otherwise."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise DataError(f"{name}: column {IMAGE_COLUMN!r} must be a non-empty base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # tolerate a browser data URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{name}: column {IMAGE_COLUMN!r} is not valid base64") from None


def boxes_from_frame(frame: pd.DataFrame) -> list[Box | None]:
    """Per-row (x, y, w, h) from the optional box columns; a row with none of them has no box."""
    present = [c for c in BOX_COLUMNS if c in frame.columns]
    if not present:
        return [None] * len(frame)
    if len(present) != len(BOX_COLUMNS):
        missing = [c for c in BOX_COLUMNS if c not in frame.columns]
        raise DataError(f"model input: box columns must come together; missing {missing}")
    out: list[Box | None] = []
    for row, values in enumerate(frame[list(BOX_COLUMNS)].itertuples(index=False, name=None)):
        out.append(parse_box(values, f"row {row}"))
    return out


def parse_box(values: Iterable[Any] | str | None, name: str = "box") -> Box | None:
    """'x,y,w,h' or four numbers -> a box; all empty/NaN -> None; partial or w/h <= 0 -> DataError."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in values.split(",")]
    items = list(values)
    if len(items) != 4:
        raise DataError(f"{name}: a box is x,y,w,h (four numbers), got {len(items)} values")
    nums: list[float | None] = []
    for v in items:
        if v is None or (isinstance(v, str) and not v.strip()):
            nums.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DataError(f"{name}: box value {v!r} is not a number") from None
        nums.append(None if math.isnan(f) else f)
    if all(n is None for n in nums):
        return None
    if any(n is None for n in nums):
        raise DataError(f"{name}: box needs all of x, y, w, h; got {items}")
    x, y, w, h = (float(n) for n in nums)  # type: ignore[arg-type]
    if w <= 0 or h <= 0:
        raise DataError(f"{name}: box width and height must be > 0, got w={w}, h={h}")
    return (x, y, w, h)


class BoneHealthModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc over `Ensemble`; the fold checkpoints travel as model artifacts."""

    def load_context(self, context):
        offline_defaults()
        dirs = [context.artifacts[key] for key in sorted_checkpoint_keys(context.artifacts)]
        localisers = [context.artifacts[key] for key in sorted_localiser_keys(context.artifacts)]
        config = getattr(context, "model_config", None) or {}
        self._ensemble = Ensemble(dirs, batch_size=int(config.get("batch_size", DEFAULT_BATCH_SIZE)),
                                  max_pixels=config.get("max_pixels", DEFAULT_MAX_PIXELS),
                                  localiser_dirs=localisers or None)

    # Type hints make MLflow 3 accept the DataFrame as is; the signature does the validation.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self._ensemble.predict_frame(model_input)
        except BoneHealthError as exc:
            # The scoring server turns this into HTTP 400 with the reason in `message`; any other
            # exception becomes a 500 whose reason is buried in `stack_trace`.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    @property
    def ensemble(self) -> Ensemble:
        return self._ensemble
