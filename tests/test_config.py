"""params.yaml loading: defaults validate, overrides apply, and every mistake is one clear line."""
import argparse
import shlex
from pathlib import Path

import pytest
import yaml

from src.core.config import (
    DEFAULT_PARAMS,
    Params,
    ParamsError,
    add_params_args,
    apply_overrides,
    flatten,
    load_params,
    params_from_args,
    params_from_dict,
    parse_override,
)
from src.core.params_file import dvc_command, render_defaults

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refusal(tmp_path, override: str) -> tuple[Path, str]:
    """(the params file, the ParamsError's message) for the default params with one --set."""
    path = write(tmp_path, {})
    with pytest.raises(ParamsError) as exc:
        load_params(path, [override])
    return path, str(exc.value)


def test_repo_params_file_validates_and_matches_sections():
    params = load_params(ROOT / "params.yaml")
    assert set(Params.model_fields) == {
        "data", "phantom", "prepare", "locate", "train", "evaluate", "gradcam", "tune", "register", "mlflow"}
    assert params.prepare.folds == 5
    assert params.data.positive_class in params.phantom.classes


def test_override_spelling_matches_dvc_exp_run_s(tmp_path):
    path = write(tmp_path, {"train": {"lr": 0.001}})
    params = load_params(path, ["train.lr=0.01", "train.augment.strength=0.5", "prepare.full.size=[449, 954]",
                                "params.yaml:train.epochs=3"])
    assert params.train.lr == 0.01
    assert params.train.augment.strength == 0.5
    assert params.prepare.full.size == (449, 954)
    assert params.train.epochs == 3


def test_typo_in_key_names_key_and_suggests(tmp_path):
    path = write(tmp_path, {"train": {"learning_rate": 0.1, "lr": 0.1}})
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "train.learning_rate" in msg and "unknown key" in msg and "lr" in msg


def test_typo_in_section_name(tmp_path):
    path = write(tmp_path, {"trian": {"lr": 0.1}})
    with pytest.raises(ParamsError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_params(path)


def test_typo_in_nested_key(tmp_path):
    path = write(tmp_path, {"prepare": {"crop": {"sidee": 600}}})
    with pytest.raises(ParamsError, match=r"prepare\.crop\.sidee.*did you mean 'side'"):
        load_params(path)


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=-1", "train.lr"),
    ("prepare.folds=1", "prepare.folds"),
    ("train.optimizer=rmsprop", "train.optimizer"),
    ("train.epochs=many", "train.epochs"),
    ("prepare.mode=tiles", "prepare.mode"),
    ("data.on_bad_file=ignore", "data.on_bad_file"),
])
def test_wrong_type_or_range_names_key_and_value(tmp_path, override, fragment):
    path, msg = refusal(tmp_path, override)
    assert fragment in msg and str(path) in msg and "\n" not in msg


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=fast", "train.ema_decay: got 'fast'; expected auto or a number (--set train.ema_decay=0.5), "
                             "or null (--set train.ema_decay=null)"),
    ("train.ema_decay=1.0", "train.ema_decay: expected auto, null or a number between 0 and 1 (exclusive) (got 1.0)"),
])
def test_a_union_setting_says_every_accepted_form_in_one_line(tmp_path, override, message):
    path, msg = refusal(tmp_path, override)
    assert msg == f"{path}: {message}"


@pytest.mark.parametrize("override, message", [
    ("locate.size=[100,200]", "locate.size: expected [height, width], each a multiple of 16 and at least 32 "
                              "(got [100, 200])"),
    ("locate.negatives=2", "locate.negatives: Input should be less than or equal to 1"),
    ("locate.unseen_phantom.enabled=sometimes", "locate.unseen_phantom.enabled: got 'sometimes'"),
    ("locate.refine.window=[320,96]", ("locate.refine: window [320, 96] is larger than the finer view [256, 512]; "
                                       "expected a window inside it")),
    ("locate.refine.size=[100,200]", "locate.refine.size: expected [height, width], each a multiple of 16"),
    ("locate.refine.jitter=0.5", "locate.refine.jitter: Input should be less than or equal to 0.4"),
])
def test_locate_settings_are_checked_in_one_line(tmp_path, override, message):
    path, msg = refusal(tmp_path, override)
    assert msg.startswith(f"{path}: {message}") and "\n" not in msg


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_from=1.0", "train.checkpoint_from: Input should be less than 1"),
    ("train.checkpoint_from=-0.1", "train.checkpoint_from: Input should be greater than or equal to 0"),
    ("train.checkpoint=best", "train.checkpoint: Input should be 'val_auc', 'val_loss' or 'last'"),
])
def test_checkpoint_settings_are_checked_in_one_line(tmp_path, override, message):
    path, msg = refusal(tmp_path, override)
    assert msg.startswith(f"{path}: {message}") and "\n" not in msg


def test_early_stopping_without_a_criterion_is_refused(tmp_path):
    path = write(tmp_path, {})
    with pytest.raises(ParamsError) as exc:
        load_params(path, ["train.checkpoint=last", "train.early_stopping_patience=3"])
    assert str(exc.value) == (f"{path}: train.early_stopping_patience=3 needs train.checkpoint val_auc or val_loss: "
                              "with last, no epoch counts as an improvement")
    assert load_params(path, ["train.checkpoint=val_loss", "train.early_stopping_patience=3"]).train.checkpoint == "val_loss"


def test_cross_check_positive_class(tmp_path):
    path = write(tmp_path, {"data": {"classes": ["A", "B"], "positive_class": "C3"}})
    with pytest.raises(ParamsError, match="positive_class"):
        load_params(path)


def test_full_mode_needs_a_size(tmp_path):
    path = write(tmp_path, {"prepare": {"full": {"downscale": None, "size": None, "long_side": None}}})
    with pytest.raises(ParamsError, match="prepare.full"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_bad_override_syntax():
    with pytest.raises(ParamsError, match="section.key=value"):
        parse_override("train.lr")
    with pytest.raises(ParamsError, match="section.key=value"):
        parse_override("lr=0.1")


def test_flatten_gives_dotted_keys():
    flat = flatten(Params())
    assert flat["train.augment.strength"] == 0.5
    assert flat["prepare.crop.side"] == 600
    assert "train" not in flat


def test_params_yaml_is_rendered_from_the_schema():
    """One source of truth: the schema's defaults and descriptions make params.yaml (`make params`),
    so a default cannot drift between the code and the shipped file."""
    shipped = (ROOT / "params.yaml").read_text()
    assert shipped == render_defaults(), (
        "params.yaml differs from src/core/config.py's defaults: change the default in the schema and run "
        "`make params`; a setting for your own runs belongs in an overlay (--params params.yaml --params mine.yaml)")
    assert load_params(ROOT / "params.yaml") == Params()
    assert "# K of the K-fold CV" in shipped  # the descriptions are the comments


def test_overlays_layer_key_by_key_and_errors_name_their_file(tmp_path):
    base = ROOT / "params.yaml"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train:\n  lr: 0.01\n  augment: {strength: 1.5}\n")
    params = load_params([base, overlay], ["train.epochs=3"])
    assert (params.train.lr, params.train.augment.strength, params.train.epochs) == (0.01, 1.5, 3)
    assert params.train.augment.vflip == Params().train.augment.vflip  # the rest of the section stays
    assert params.train.model == Params().train.model
    overlay.write_text("train:\n  lrr: 0.01\n")
    with pytest.raises(ParamsError, match=r"overlay\.yaml: unknown key 'train\.lrr' \(did you mean 'lr'\?\)"):
        load_params([base, overlay])
    # the CLI spelling: --params repeated, later files win
    parser = add_params_args(argparse.ArgumentParser())
    overlay.write_text("train:\n  lr: 0.02\n")
    args = parser.parse_args(["--params", str(base), "--params", str(overlay), "--set", "train.seed=7"])
    assert params_from_args(args).train.lr == 0.02 and params_from_args(args).train.seed == 7
    assert params_from_args(parser.parse_args([])) == load_params(DEFAULT_PARAMS)


@pytest.mark.parametrize("profile", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_profiles_are_overlays_and_become_dvc_experiments(profile):
    fragment = yaml.safe_load(profile.read_text())
    params = load_params([ROOT / "params.yaml", profile])
    assert params.train.device == "auto" and params.prepare.out != Params().prepare.out
    # `dvc exp run -S ...` sets exactly the overlay's values (quoted for the shell, read back as YAML)
    words = shlex.split(dvc_command(fragment))
    assert words[:3] == ["dvc", "exp", "run"]
    pairs = [parse_override(w) for flag, w in zip(words[3::2], words[4::2]) if flag == "-S"]
    assert len(pairs) == len(flatten(fragment))
    got = params_from_dict(apply_overrides(Params().model_dump(mode="json"), words[4::2]))
    assert got == params


def test_a_moved_key_says_where_it_went(tmp_path):
    with pytest.raises(ParamsError, match=r"key 'train\.folds' moved to prepare\.folds"):
        load_params(write(tmp_path, {"train": {"folds": 5}}))


def test_a_repeated_key_or_section_is_refused_not_merged(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.01\nevaluate:\n  threshold: 0.4\ntrain:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: line 5 not valid YAML \(duplicate key 'train'"):
        load_params(path)
    path.write_text("train:\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ParamsError, match=r"line 3 .*duplicate key 'lr'"):
        load_params(path)
