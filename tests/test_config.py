"""params.yaml loading: defaults validate, overrides apply, and every mistake is one clear line."""
from pathlib import Path

import pytest
import yaml

from src.core.config import Params, ParamsError, flatten, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_file_validates_and_matches_sections():
    params = load_params(ROOT / "params.yaml")
    assert set(Params.model_fields) == {
        "data", "phantom", "prepare", "train", "evaluate", "gradcam", "tune", "register", "mlflow"}
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
    path = write(tmp_path, {})
    with pytest.raises(ParamsError) as exc:
        load_params(path, [override])
    msg = str(exc.value)
    assert fragment in msg and str(path) in msg and "\n" not in msg


def test_cross_check_positive_class(tmp_path):
    path = write(tmp_path, {"data": {"classes": ["A", "B"], "positive_class": "C3"}})
    with pytest.raises(ParamsError, match="positive_class"):
        load_params(path)


def test_full_mode_needs_a_size(tmp_path):
    path = write(tmp_path, {"prepare": {"full": {"downscale": None, "size": None}}})
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


def test_schema_defaults_are_the_params_yaml_values():
    """params.yaml is the one place settings live: the code's defaults must not drift from it."""
    ours = flatten(load_params(ROOT / "params.yaml"))
    schema = flatten(Params())
    drift = {k: (schema.get(k), v) for k, v in ours.items()
             if not k.startswith("tune.space") and schema.get(k) != v}
    assert drift == {}
