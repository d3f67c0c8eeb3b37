"""Editing params files in place and layering them: a fragment ({'train': {'lr': ...}}) merged
into a dict, written into a params file with its comments kept (ruamel round-trip), or turned
into the `dvc exp run -S` command that sets the same values."""
from __future__ import annotations

import io
from pathlib import Path

from src.core.config import flatten, load_params
from src.core.fileio import atomic_write_text


def merge_fragment(base: dict, fragment: dict) -> dict:
    for key, value in fragment.items():
        if isinstance(value, dict):
            base[key] = merge_fragment(base.get(key) or {}, value)
        else:
            base[key] = value
    return base


def dvc_command(fragment: dict) -> str:
    flat = flatten(fragment)
    return "dvc exp run " + " ".join(f"-S {k}={v}" for k, v in flat.items())


def apply_to_params_file(path: str | Path, fragment: dict) -> None:
    """Write the best values into params.yaml, keeping its comments and order (ruamel round-trip)."""
    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    path = Path(path)
    doc = ry.load(path.read_text())
    for key, value in flatten(fragment).items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    buf = io.StringIO()
    ry.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    load_params(path)  # the written file must still validate
