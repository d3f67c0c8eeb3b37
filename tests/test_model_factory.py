"""Weights come from a local file or the local cache, never from the network by default; a file
that is not a checkpoint is one line, not a pickle traceback."""
from __future__ import annotations

import pytest
import torch

from src.core.cli import run_main
from src.model.factory import WeightsUnavailable, create_model
from src.train import main as train_main
from tests.train_helpers import TINY_MODEL, make_tiny_store, tiny_params, write_params


def test_pretrained_without_a_cache_fails_with_where_to_put_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match=r"train\.pretrained: weights for 'test_efficientnet' are not in "
                                                 r"the local cache .* downloads are off \(HF_HUB_OFFLINE=1\).*train\.weights"):
        create_model(TINY_MODEL, num_classes=2, in_chans=1, pretrained=True)


def test_a_local_weights_file_loads_and_a_wrong_one_is_one_line(tmp_path):
    torch.manual_seed(3)
    source = create_model(TINY_MODEL, num_classes=2, in_chans=1)
    good = tmp_path / "weights.pth"
    torch.save(source.state_dict(), good)
    loaded = create_model(TINY_MODEL, num_classes=2, in_chans=1, weights=str(good))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        # timm keeps a file's classifier only when its class count is the pretrained config's (1000)
        assert torch.equal(a, b) or name.startswith("classifier."), name
    with pytest.raises(WeightsUnavailable, match=r"train\.weights: file not found"):
        create_model(TINY_MODEL, num_classes=2, weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "notes.pth"
    junk.write_bytes(b"these are my notes, not a checkpoint\n" * 10)
    with pytest.raises(WeightsUnavailable, match=r"notes\.pth is not a weights file for 'test_efficientnet'"):
        create_model(TINY_MODEL, num_classes=2, weights=str(junk))


def test_train_with_a_junk_weights_file_is_one_line_exit_2(tmp_path, capsys):
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x00" * 64)
    store = make_tiny_store(tmp_path / "s", n_per_class=12, folds=2)
    pfile = write_params(tiny_params(tmp_path, store, epochs=1, weights=str(junk)), tmp_path / "params.yaml")
    assert run_main(train_main, ["--params", pfile]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "train.weights" in err[0] and "model.safetensors" in err[0]
