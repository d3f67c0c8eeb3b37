"""What a user reads in DVC, with the real dvc CLI in a temp git repo holding this project's
dvc.yaml, params.yaml, .dvc/config and .dvc/plots: the headline metrics (`dvc metrics show`,
`make exp`), the plots (`dvc plots show`: learning curves per fold, the diagonals, the confusion
axes, the Grad-CAM sheets) and the offline page template (docs/vega/).

The stage outputs are written by the project's own writers on small synthetic data: a CV is not
trained here (tests/test_train.py checks history.csv against a real one).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from src.artifacts.cv_run import HISTORY_COLUMNS, write_fold_history
from src.artifacts.metrics_file import write_headline, write_metrics
from src.core.config import params_from_dict
from src.evaluation.report import HEADLINE, compute_metrics, write_plots
from src.explain.figures import SheetItem, save_contact_sheet
from src.explain.oof_explain import HEADLINE as CAM_HEADLINE
from src.localise.files import HEADLINE as LOCATE_HEADLINE

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
TEMPLATE = ROOT / "docs" / "vega" / "plots_offline.html"
LIBRARIES = ("vega", "vega-lite", "vega-embed")
needs_dvc = pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is installed into the project venv by make")


def run(cmd: list[str], cwd: Path, **env: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **env}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


def make_variable(name: str) -> str:
    """A `NAME := value` line of the Makefile, as the shell sees it ($$ -> $)."""
    match = re.search(rf"^{name} := (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile: no {name}"
    return match.group(1).replace("$$", "$")


# ------------------------------------------------------------------ the offline page template
def test_offline_template_inlines_vega_and_loads_nothing_from_the_network():
    page = TEMPLATE.read_text(encoding="utf-8")
    # DVC fills {plot_divs}; {scripts} would add its CDN <script src=...> tags.
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.DOTALL | re.IGNORECASE)
    assert scripts and not [attrs for attrs, _ in scripts if "src" in attrs.lower()]
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL | re.IGNORECASE)
    assert not re.search(r"<(link|img|iframe)\b|@import|url\(|https?:", markup, re.IGNORECASE)
    inlined = {}
    for attrs, code in scripts:
        found = dict(re.findall(r'data-([a-z0-9]+)="([^"]*)"', attrs))
        if "library" in found:
            inlined[found["library"]] = found
            assert hashlib.sha256(code.strip("\n").encode()).hexdigest() == found["sha256"], found
            assert f'"{found["version"]}"' in code, found  # the library's own version constant
    assert sorted(inlined) == sorted(LIBRARIES)
    assert inlined["vega"]["version"].startswith("5.") and inlined["vega-lite"]["version"].startswith("5.")
    for name in LIBRARIES:
        licence = (TEMPLATE.parent / f"LICENSE.{name}").read_text()
        assert "Redistribution and use in source and binary forms" in licence, name
    # `dvc plots show` takes it by default: .dvc/config names it, relative to .dvc/
    config = (ROOT / ".dvc" / "config").read_text()
    setting = re.search(r"^\[plots\]\s*\n\s*html_template = (.+)$", config, re.MULTILINE)
    assert setting and (ROOT / ".dvc" / setting.group(1).strip()).resolve() == TEMPLATE


def test_make_exp_keeps_exactly_the_headline_columns():
    keep = make_variable("EXP_KEEP")
    names = re.fullmatch(r"\^\((.*)\)\$", keep).group(1).split("|")
    # every evaluate headline figure (the whole chain's AUC included) and Grad-CAM's localisation
    # (its chance level shows when it changes); the localiser's figures are in `dvc metrics show`,
    # or the table would not fit 120 columns
    assert names == [*HEADLINE, "cam_in"] and "cam_in" in CAM_HEADLINE


# ------------------------------------------------------------------ DVC in a temp repo
@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """A git + DVC repo with this project's DVC files and stage outputs at params.yaml's paths."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    run(["git", "init", "-q"], repo)
    run([DVC, "init", "-q"], repo)
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / "params.yaml", repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / "docs" / "vega").mkdir(parents=True)
    shutil.copy(TEMPLATE, repo / "docs" / "vega")
    cfg = yaml.safe_load((repo / "params.yaml").read_text())
    out = {"train": repo / cfg["train"]["out"], "evaluate": repo / cfg["evaluate"]["out"],
           "gradcam": repo / cfg["gradcam"]["out"], "locate": repo / cfg["locate"]["out"],
           "folds": int(cfg["prepare"]["folds"])}

    for k in range(out["folds"]):  # three epochs per fold, each fold its own curve
        write_fold_history(out["train"] / f"fold_{k}", [
            {"epoch": e, "train_loss": 0.7 / e, "val_loss": 0.75 / e + 0.01 * k, "val_auc": 0.6 + 0.1 * e - 0.01 * k,
             "lr": 1e-3, "images_per_s": 20.0} for e in (1, 2, 3)])

    rng = np.random.default_rng(0)
    label = np.repeat([0, 1], 30)
    p3 = np.clip(0.5 + 0.3 * (label - 0.5) * 2 + rng.normal(0, 0.2, 60), 0.01, 0.99)
    oof = pd.DataFrame({"index": range(60), "file": [f"x{i}.png" for i in range(60)],
                        "patient": [f"P{i}" for i in range(60)], "fold": np.arange(60) % out["folds"],
                        "label": label, "prob_C1": 1 - p3, "prob_C3": p3})
    ecfg = params_from_dict({"evaluate": {"bootstrap": 50}}).evaluate
    metrics, _, _ = compute_metrics(oof, ["C1", "C3"], "C3", ecfg)
    metrics["chain_oof_roc_auc"] = 0.91234  # crops at the found boxes (src.localise.chain), a headline figure
    write_plots(oof, ["C1", "C3"], "C3", ecfg, out["evaluate"])
    write_metrics(out["evaluate"], metrics)
    write_headline(out["evaluate"], metrics, HEADLINE)

    located = {"locate_oof_hit_rate": 0.9541, "locate_oof_iou_mean": 0.7093, "locate_fixed_box_hit_rate": 0.516}
    write_metrics(out["locate"], located)
    write_headline(out["locate"], located, LOCATE_HEADLINE)

    cam = {"gradcam_energy_inside_all": 0.0512345, "gradcam_area_fraction_all": 0.026, "gradcam_road_all": 0.15,
           "gradcam_pointing_hit_all": 0.8, "gradcam_randomization_similarity_all": 0.2345}
    write_metrics(out["gradcam"], cam)
    write_headline(out["gradcam"], cam, CAM_HEADLINE)
    for cls in ("C1", "C3"):
        item = SheetItem(rng.integers(0, 255, (24, 24), dtype=np.uint8), rng.random((24, 24)).astype(np.float32), cls)
        save_contact_sheet(out["gradcam"] / "images" / "_contact_sheets" / f"{cls}.png", [item], f"{cls}: 1 image")
    out["metrics"] = metrics
    return repo, out


@needs_dvc
def test_dvc_metrics_are_the_three_headline_files(repo):
    repo, out = repo
    shown = json.loads(run([DVC, "metrics", "show", "--json"], repo))[""]["data"]
    rel = {str(p.relative_to(repo)) for p in (out["evaluate"] / "headline.json", out["gradcam"] / "headline.json",
                                              out["locate"] / "headline.json")}
    assert set(shown) == rel  # the metrics.json files are outs, not DVC metrics
    evaluate = shown[str((out["evaluate"] / "headline.json").relative_to(repo))]["data"]
    assert evaluate == {short: round(out["metrics"][key], 3) for short, key in HEADLINE.items()}
    assert shown[str((out["gradcam"] / "headline.json").relative_to(repo))]["data"] == {
        "cam_in": 0.051, "cam_chance": 0.026, "cam_pointing": 0.8, "cam_random_sim": 0.234}
    located = shown[str((out["locate"] / "headline.json").relative_to(repo))]["data"]
    assert located["hit"] == 0.954 and located.get("unseen_hit") is None  # real data: no unseen phantom


@needs_dvc
def test_dvc_plots_draw_every_fold_the_diagonals_and_the_sheets(repo):
    repo, out = repo
    plots = json.loads(run([DVC, "plots", "show", "--json"], repo))["data"]

    curves = {k: v[0]["content"] for k, v in plots.items() if k.startswith("Learning curves")}
    assert len(curves) == 3  # validation AUC, validation loss, training loss
    for name, spec in curves.items():  # one line per fold (DVC shortens the paths to what differs)
        files = sorted({row["filename"] for row in spec["data"]["values"]})
        assert len(files) == out["folds"], name
        assert all(f.endswith(f"fold_{k}/history.csv") for k, f in enumerate(files)), name
        assert spec["encoding"]["color"]["field"] == "fold" and spec["encoding"]["x"]["field"] == "epoch"
    assert {spec["encoding"]["y"]["field"] for spec in curves.values()} == {"val_auc", "val_loss", "train_loss"}
    assert set(HISTORY_COLUMNS) >= {"epoch", "val_auc", "val_loss", "train_loss"}

    for name in ("ROC", "Calibration"):  # the data over a dashed diagonal from (0, 0) to (1, 1)
        rule, line = plots[name][0]["content"]["layer"]
        assert rule["mark"]["type"] == "rule" and rule["mark"]["strokeDash"]
        assert [rule["encoding"][c]["datum"] for c in ("x", "y", "x2", "y2")] == [0, 0, 1, 1]
        assert line["mark"]["type"] == "line" and len(plots[name][0]["content"]["data"]["values"]) > 2

    # as confusion.png: columns predicted (x), rows actual (y), counts shown
    confusion = plots["Confusion"][0]["content"]
    assert confusion["spec"]["encoding"]["x"]["field"] == "predicted"
    assert confusion["spec"]["encoding"]["y"]["field"] == "actual"
    assert {p["name"]: p.get("value") for p in confusion["params"]}["showValues"] is True

    sheets = sorted(k for k, v in plots.items() if v[0]["type"] == "image")
    assert sheets == [str((out["gradcam"] / "images" / "_contact_sheets" / f"{c}.png").relative_to(repo))
                      for c in ("C1", "C3")]


@needs_dvc
def test_dvc_plots_page_works_offline(repo):
    """`dvc plots show` with no option takes the template from .dvc/config: every script inline."""
    repo, _ = repo
    printed = run([DVC, "plots", "show"], repo).strip()
    page = (repo / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert printed.endswith("dvc_plots/index.html")
    assert not re.findall(r"<script[^>]*\bsrc=", page, re.IGNORECASE) and "cdn.jsdelivr" not in page
    assert page.count("vegaEmbed('#") == 7 and 'data-library="vega-embed"' in page
    assert len(list((repo / "dvc_plots" / "static").glob("*.png"))) == 2  # the contact sheets, beside the page


@needs_dvc
def test_make_exp_shows_headline_metrics_and_changed_params_in_120_columns(repo):
    repo, _ = repo
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(re.sub(r"(?ms)(^train:\n.*?^  epochs: )\d+", r"\g<1>3", params, count=1))
    table = run([DVC, "exp", "show", "--no-pager", "--only-changed", "--keep", make_variable("EXP_KEEP"),
                 "--drop", make_variable("EXP_DROP")], repo, COLUMNS="120")
    lines = table.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 120, table
    header = next(line for line in lines if "Experiment" in line).split()
    assert header == ["Experiment", *HEADLINE, "cam_in", "train.epochs"], table  # unchanged params are left out
    assert "…" not in table
