"""The model card that travels with every registered version.

Two renderings of one record: `metadata.json` shaped like a MONAI bundle's metadata (so
tools that read bundles find inputs, outputs, metrics and intended use where they expect
them) and `model_card.md` for people.  Everything in it comes from files the pipeline
wrote (checkpoint meta, cv.json, metrics.json, the prepared store, Grad-CAM metrics); a
missing optional source is said out loud in the card rather than silently left out.
"""
from __future__ import annotations

import math
from typing import Any

from src.artifacts.checkpoint import CheckpointMeta

NOT_A_DIAGNOSIS = ("Not a diagnosis and not a medical device: every output needs review by a qualified "
                   "clinician, and no clinical decision may rest on it.")
INTENDED_USE = (
    "Research screening aid for studies of osteoporosis signs on dental panoramic radiographs "
    f"(Mandibular Cortical Index). {NOT_A_DIAGNOSIS}"
)
DENTAL_MODALITY = "dental panoramic radiograph (OPG)"
GENERIC_MODALITY = "radiograph"
SYNTHETIC_LIMITATION = (
    "Trained and evaluated on SYNTHETIC phantom radiographs (src.phantom): the metrics show the pipeline "
    "works, and say nothing about performance on real patients."
)
METADATA_SCHEMA = "monai-bundle-like (https://docs.monai.io/en/latest/mb_specification.html)"

LIMITATIONS = [
    "Trained and validated by cross-validation on one dataset; no external validation on other "
    "scanners, sites or populations. Expect performance to drop under distribution shift.",
    "Probabilities are calibrated only as well as the cross-validated Brier score and ECE in this "
    "card show; the operating threshold was not tuned for a clinical prevalence.",
    "Raw images must be preprocessed exactly as in training (same mode, size, crop box convention, "
    "rolling ball / CLAHE); the registered model does this itself, so feed it the original files.",
    "Crop-mode models classify a square crop centred on a box around the annotated region (the mandibular cortex "
    "in the lab's data; source pixels), exactly as in training: given with the image, or found by the bundled "
    "localiser when there is one (see Inputs and outputs). A misplaced box misleads the model.",
    "Grad-CAM maps show where the network looked, not why; they are a plausibility check, not an explanation "
    "a clinician can rely on.",
]


def crop_box_line(finder: str | None, hit_rate: float | None, metrics_file: str) -> str:
    """How a crop-mode model gets its box: `finder` is BoxFinder.describe() of the bundled
    localiser (None: none bundled), `hit_rate` its held-out hit rate from `metrics_file`."""
    if finder is None:
        return ("boxes must be given: no localiser is bundled (the locate stage had written none), so every image "
                "needs box_x, box_y, box_w, box_h")
    rate = (f"held-out hit rate {hit_rate:.3f} from {metrics_file}" if _finite(hit_rate)
            else f"held-out hit rate not available ({metrics_file} is missing or was written for other localisers)")
    return f"given by the caller, else found by the bundled localiser: {finder}; {rate}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if _finite(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    return "n/a" if value is None or isinstance(value, float) else str(value)


def _switch(section: Any, key: str) -> str:
    if not isinstance(section, dict) or not section.get("enabled"):
        return "off"
    return f"on ({key} {section.get(key)})"


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(name, value, ci_low, ci_high) for every metric, CI bounds folded into their metric's row."""
    rows = []
    for key, value in metrics.items():
        if key.endswith(("_ci_low", "_ci_high")):
            continue
        rows.append((key, value, metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")))
    return rows


def wording(data: dict[str, Any], classes: list[str], positive: str | None) -> dict[str, str]:
    """Task, intended use and modality from the data's own description (data.description,
    data.modality); the lab's dental wording is the default only on the phantom, whose
    signal mimics it.  Any other data with no description gets a neutral wording."""
    dental = bool(data.get("synthetic_phantom")) and not data.get("description")
    modality = data.get("modality") or (DENTAL_MODALITY if dental else GENERIC_MODALITY)
    kind = "Binary screening" if len(classes) == 2 else "Multi-class grading"
    if dental:
        task = (f"{kind} of dental panoramic radiographs for osteoporosis (Mandibular Cortical Index)"
                if len(classes) == 2 else f"{kind} of dental panoramic radiographs (Mandibular Cortical Index)")
        return {"task": task, "intended_use": INTENDED_USE, "modality": modality}
    what = data.get("description") or (f"{modality} images labelled {', '.join(classes)}"
                                       + (f" (positive: {positive})" if positive else ""))
    return {"task": f"{kind}: {what}",
            "intended_use": f"Research aid for studies of {what}. {NOT_A_DIAGNOSIS}"
                            + ("" if data.get("description") else " (set data.description to say what the images "
                                                                    "show and what the classes mean)"),
            "modality": modality}


def build_metadata(*, name: str, version: str | None, strategy: str, meta: CheckpointMeta,
                   n_models: int, cv_metrics: dict[str, Any], gradcam_metrics: dict[str, Any] | None,
                   data: dict[str, Any], provenance: dict[str, Any], versions: dict[str, str],
                   data_warnings: list[str] | tuple[str, ...] = (), crop_box: str | None = None) -> dict[str, Any]:
    """The card as a MONAI-bundle-like metadata dict; `data_warnings` (cv.json: data too small
    for the settings, model.data_checks) join the limitations; `crop_box` (crop mode,
    `crop_box_line`) says where the crop box comes from."""
    classes = list(meta.classes)
    prep = meta.prepare_settings
    input_size = meta.input_size
    words = wording(data, classes, meta.positive_class)
    return {
        "schema": METADATA_SCHEMA,
        "name": name,
        "version": version,
        "task": words["task"],
        "description": (
            f"{meta.model} ({'mean of ' + str(n_models) + ' cross-validation fold models' if strategy == 'ensemble' else 'one model refit on all data'})"
            f", {prep.get('mode', '?')}-mode preprocessing reproduced from the raw file inside the model."
        ),
        "intended_use": words["intended_use"],
        "pytorch_version": versions.get("torch"),
        "numpy_version": versions.get("numpy"),
        "optional_packages_version": {k: v for k, v in versions.items() if k not in ("torch", "numpy")},
        "data_source": data.get("name"),
        "data_type": f"PNG, JPEG, TIFF, BMP or DICOM {words['modality']}, decoded to one grey channel in [0, 1]",
        "image_classes": "single channel grey radiograph, intensity scaled to [0, 1], then the training preprocessing",
        "label_classes": {str(i): c for i, c in enumerate(classes)},
        "pred_classes": f"{len(classes)} probabilities summing to 1, in the order {classes}",
        "positive_class": meta.positive_class,
        "crop_box": crop_box,
        "eval_metrics": {k: v for k, v in cv_metrics.items() if _finite(v)},
        "explainability_metrics": {k: v for k, v in (gradcam_metrics or {}).items() if _finite(v)},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "file bytes, base64 in column 'image'",
                    "modality": words["modality"],
                    "num_channels": meta.in_chans,
                    "spatial_shape": input_size,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": prep.get("mode") == "crop",
                    "preprocessing": prep,
                    "normalization": meta.normalization,
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(classes),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): c for i, c in enumerate(classes)},
                }
            },
        },
        "data": data,
        "provenance": provenance,
        "limitations": ([SYNTHETIC_LIMITATION] if data.get("synthetic_phantom") else [])
        + [f"Training data warning: {w}" for w in data_warnings]
        + LIMITATIONS,
    }


def render_markdown(md: dict[str, Any]) -> str:
    """The people-facing card; sections follow MONAI model-zoo READMEs plus intended use and limits."""
    prov, data = md["provenance"], md["data"]
    lines = [
        f"# Model card: {md['name']}" + (f" v{md['version']}" if md.get("version") else ""),
        "",
        f"> **Intended use.** {md['intended_use']}",
        "",
        "## Model",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| description | {md['description']} |",
        f"| classes | {', '.join(md['label_classes'].values())} (positive: {md.get('positive_class')}) |",
    ]
    for key in ("strategy", "model", "n_models", "best_epochs", "git_commit", "cv_parent_run_id", "registered_at"):
        if key in prov:
            lines.append(f"| {key} | {_fmt(prov[key])} |")
    fmt_in = md["network_data_format"]["inputs"]["image"]
    lines += [
        "",
        "## Inputs and outputs",
        "",
        f"- Input: {md['data_type']}; optional crop box `box_x, box_y, box_w, box_h` in source pixels.",
        f"- Preprocessing (the training transform, applied inside the model): mode `{fmt_in['preprocessing'].get('mode')}`, "
        f"rolling ball {_switch(fmt_in['preprocessing'].get('rolling_ball'), 'radius')}, "
        f"CLAHE {_switch(fmt_in['preprocessing'].get('clahe'), 'clip_limit')}, stored as {fmt_in['preprocessing'].get('dtype')}; "
        f"network input {fmt_in['spatial_shape']} x {fmt_in['num_channels']} channel(s), normalization {fmt_in['normalization']}.",
        f"- Output: {md['pred_classes']} as `prob_<class>` columns, plus `predicted` (the most probable class)"
        + (("; then the box used (`box_x, box_y, box_w, box_h`), `box_source` (given or found), `box_confidence` "
            "(the localiser's; empty for a given box) and `error` (why no cortex was found: that row has no "
            "probabilities).") if md.get("crop_box") else "."),
    ]
    if md.get("crop_box"):
        lines.append(f"- Crop box: {md['crop_box']}.")
    lines += [
        "",
        "## Data and provenance",
        "",
    ]
    for key, value in data.items():
        lines.append(f"- {key}: {_fmt(value) if not isinstance(value, (dict, list)) else value}")
    lines += [
        "",
        "## Cross-validated performance",
        "",
        "Pooled out-of-fold predictions; intervals are patient-level bootstrap CIs where the evaluation computed them.",
        "",
        "| metric | value | CI low | CI high |",
        "| --- | --- | --- | --- |",
    ]
    for key, value, lo, hi in metric_rows(md["eval_metrics"]):
        lines.append(f"| {key} | {_fmt(value)} | {_fmt(lo) if lo is not None else ''} | {_fmt(hi) if hi is not None else ''} |")
    calib = {k: v for k, v in md["eval_metrics"].items() if any(s in k for s in ("brier", "ece", "calibration"))}
    lines += ["", "### Calibration", ""]
    if calib:
        lines += [f"- {k}: {_fmt(v)}" for k, v in calib.items()]
    else:
        lines.append("- not reported by the evaluation (no Brier/ECE keys in metrics.json)")
    lines += ["", "## Grad-CAM faithfulness", ""]
    if md["explainability_metrics"]:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in md["explainability_metrics"].items()]
    else:
        lines.append("Not available: no Grad-CAM metrics were found when this version was registered.")
    lines += ["", "## Limitations", ""]
    lines += [f"- {item}" for item in md["limitations"]]
    lines += [
        "",
        "## How to use",
        "",
        "```",
        f"python -m src.predict radiograph.dcm --model models:/{md['name']}@champion",
        f"mlflow models serve -m models:/{md['name']}@champion --env-manager local -h 127.0.0.1 -p 5001",
        "```",
        "",
    ]
    return "\n".join(lines)
