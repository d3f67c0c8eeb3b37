"""params.yaml and its overlays as files: the shipped params.yaml rendered from the schema's
defaults and descriptions (`make params`), fragments merged into a dict or written into a params
file with its comments kept (ruamel round-trip), and the `dvc exp run -S` command that sets the
same values, so an overlay (a GPU profile, a tuned fragment) can become a DVC experiment.

    python -m src.core.params_file --write params.yaml          # regenerate from the schema
    python -m src.core.params_file --dvc params/gpu-lab-crop.yaml  # print the dvc exp run command
"""
from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from src.core.cli import run_main
from src.core.config import (
    DEFAULT_PARAMS,
    Params,
    flatten,
    load_params,
    read_params_file,
)
from src.core.fileio import atomic_write_text

COMMENT_COLUMN = 37  # where the comments of params.yaml start
HEADER = """\
# bone-health: every setting, one section per stage; validated on load by src/core/config.py.
# Generated from that schema's defaults and descriptions (`make params`): change a default there.
# For one run: `--set section.key=value` or `dvc exp run -S section.key=value`; for a set of changes,
# an overlay file: `--params params.yaml --params params/gpu-lab-crop.yaml` (later files win).
"""


def merge_fragment(base: dict, fragment: dict) -> dict:
    for key, value in fragment.items():
        if isinstance(value, dict):
            base[key] = merge_fragment(base.get(key) or {}, value)
        else:
            base[key] = value
    return base


# ----------------------------------------------------------------------- YAML text
def yaml_value(value: Any) -> str:
    """One value in flow style, as it reads back with yaml.safe_load (floats keep a decimal
    point: PyYAML reads `1e-06` as a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "E" in text:
            text = f"{value:.12f}".rstrip("0")
            text = text + "0" if text.endswith(".") else text
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = (text and text == text.strip() and ": " not in text and " #" not in text and "," not in text
             and text[0] not in "-?:#{}[]&*!|>'\"%@`" and yaml.safe_load(text) == text)
    return text if plain else json.dumps(text)


def _line(indent: int, key: str, value: str | None, description: str | None) -> list[str]:
    head = f"{' ' * indent}{key}:" + ("" if value is None else f" {value}")
    if not description:
        return [head]
    first, *rest = description.splitlines()
    out = [f"{head.ljust(COMMENT_COLUMN - 2)}  # {first}"]
    out += [f"{' ' * COMMENT_COLUMN}# {more}" for more in rest]
    return out


def _render_model(model: BaseModel, indent: int) -> list[str]:
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines += _line(indent, name, None, info.description)
            lines += _render_model(value, indent + 2)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            lines += _line(indent, name, None, info.description)  # tune.space: one flow mapping per entry
            for key, entry in value.items():
                dumped = entry.model_dump(mode="json", exclude_defaults=True)
                dumped = {"type": entry.type, **dumped}
                lines += _line(indent + 2, key, yaml_value(dumped), None)
        else:
            dumped = info.annotation and model.model_dump(mode="json", include={name})[name]
            lines += _line(indent, name, yaml_value(dumped), info.description)
    return lines


def render_defaults(params: Params | None = None) -> str:
    """params.yaml text for `params` (default: the schema's defaults), with the descriptions as comments."""
    params = params or Params()
    lines = HEADER.splitlines()
    for name, info in Params.model_fields.items():
        lines.append("")
        lines += _line(0, name, None, info.description)
        lines += _render_model(getattr(params, name), 2)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- editing
def dvc_command(fragment: dict, digits: int | None = None) -> str:
    """`dvc exp run -S k=v ...` that sets the fragment's values, quoted for a POSIX shell; with
    `digits`, floats are rounded to that many significant digits (a tuned lr of
    0.0031622776601683794 reads, and works, as 0.003162)."""
    flat = flatten(fragment)
    if digits:
        flat = {k: float(f"{v:.{digits}g}") if isinstance(v, float) else v for k, v in flat.items()}
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={yaml_value(v)}')}" for k, v in flat.items())


def apply_to_params_file(path: str | Path, fragment: dict) -> None:
    """Write a fragment's values into a params file, keeping its comments and order (ruamel round-trip)."""
    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    path = Path(path)
    doc = ry.load(path.read_text())
    for key, value in flatten(fragment).items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    buf = io.StringIO()
    ry.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    load_params(path)  # the written file must still validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.core.params_file", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FILE", help=f"write the schema's defaults (e.g. {DEFAULT_PARAMS})")
    group.add_argument("--dvc", metavar="OVERLAY", help="print the `dvc exp run -S ...` command of an overlay file")
    args = parser.parse_args(argv)
    if args.write:
        atomic_write_text(args.write, render_defaults())
        print(f"wrote {args.write}")
    else:
        fragment = read_params_file(args.dvc)
        load_params([DEFAULT_PARAMS, args.dvc])  # the overlay must validate on top of params.yaml
        print(dvc_command(fragment))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
