"""How well predicted centres match the annotated box, on either side of the mandible.

An annotator draws one side; the other side's cortex is just as diagnostic, so a prediction
is scored against the annotated box or the other side's box, whichever is closer: the image
mirror (x -> width - x) on real data, the mirror through the ground-truth masks on the phantom.
"""
from __future__ import annotations

import numpy as np


def mirror_box(box: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(N, 4: x, y, w, h) boxes reflected about the vertical centre line of their images."""
    box = np.asarray(box, dtype=np.float64)
    out = box.copy()
    out[:, 0] = np.asarray(width, dtype=np.float64) - box[:, 0] - box[:, 2]
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (N, 4: x, y, w, h) boxes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ix = np.clip(np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_at(centres: np.ndarray, size: np.ndarray) -> np.ndarray:
    """(N, 4) boxes of `size` (N, 2: w, h) centred on `centres` (N, 2: x, y)."""
    centres, size = np.asarray(centres, dtype=np.float64), np.asarray(size, dtype=np.float64)
    return np.column_stack([centres - size / 2, size])


def anatomical_mirror_boxes(boxes: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """The other side's box from ground-truth cortex masks (the phantom's, both sides drawn):
    the annotated box keeps its offset from its own side's mask centroid, mirrored in x, around
    the other side's centroid.  Unlike the image mirror this follows the patient's pose (a
    mandible shifted 5 mm moves the image mirror 10 mm off the other cortex)."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    for i, (box, mask) in enumerate(zip(out, masks)):
        ys, xs = np.nonzero(mask)
        half = xs < mask.shape[1] / 2
        if not half.any() or half.all():
            out[i] = mirror_box(box[None], np.array([mask.shape[1]]))[0]
            continue
        sides = np.array([(xs[half].mean(), ys[half].mean()), (xs[~half].mean(), ys[~half].mean())])
        centre = box[:2] + box[2:] / 2
        own = 0 if centre[0] < mask.shape[1] / 2 else 1
        dx, dy = centre - sides[own]
        other = sides[1 - own] + (-dx, dy)
        out[i, :2] = other - box[2:] / 2
    return out


def score_either(centres: np.ndarray, boxes: np.ndarray, mirrors: np.ndarray, sizes: np.ndarray,
                 mm_per_px: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: the prediction against the annotated box or `mirrors` (the other side's box),
    whichever centre is closer: IoU (the predicted box is `sizes` at the centre), the side, and
    the centre error in pixels and mm."""
    pred = box_at(centres, sizes)
    sides = [np.asarray(boxes, dtype=np.float64), np.asarray(mirrors, dtype=np.float64)]
    ious = np.stack([iou(pred, s) for s in sides])
    errors = np.stack([np.hypot(*(np.asarray(centres) - (s[:, :2] + s[:, 2:] / 2)).T) for s in sides])
    side = np.argmin(errors, axis=0)
    rows = np.arange(len(pred))
    return {"iou": ious[side, rows], "side": np.where(side == 0, "annotated", "other"),
            "error_px": errors[side, rows], "error_mm": errors[side, rows] * np.asarray(mm_per_px, dtype=np.float64)}


def summary(s: dict[str, np.ndarray]) -> dict[str, float]:
    """score_either's per-image scores -> mean IoU, hit rate (IoU >= 0.5), centre errors."""
    return {"iou_mean": float(np.mean(s["iou"])), "hit_rate": float(np.mean(s["iou"] >= 0.5)),
            "centre_error_px_median": float(np.median(s["error_px"])),
            "centre_error_mm_median": float(np.median(s["error_mm"])),
            "centre_error_mm_p90": float(np.percentile(s["error_mm"], 90))}


def fixed_box(boxes: np.ndarray, src_hw: np.ndarray, train: np.ndarray, test: np.ndarray, mirrors: np.ndarray,
              mm_per_px: np.ndarray) -> dict[str, np.ndarray]:
    """The baseline any localiser must beat: the training part's median box (centre folded onto
    one half, relative to the image size) put on the truth's own side of each test image."""
    boxes, src_hw = np.asarray(boxes, dtype=np.float64), np.asarray(src_hw, dtype=np.float64)
    rel_c = (boxes[:, :2] + boxes[:, 2:] / 2) / src_hw[:, ::-1]
    folded = np.column_stack([np.minimum(rel_c[:, 0], 1 - rel_c[:, 0]), rel_c[:, 1]])
    med_c = np.median(folded[train], axis=0)
    med_s = np.median((boxes[:, 2:] / src_hw[:, ::-1])[train], axis=0)
    left = rel_c[test, 0] < 0.5
    cx = np.where(left, med_c[0], 1 - med_c[0]) * src_hw[test, 1]
    centres = np.column_stack([cx, np.full(len(test), med_c[1]) * src_hw[test, 0]])
    return score_either(centres, boxes[test], mirrors[test], med_s * src_hw[test][:, ::-1], mm_per_px[test])
