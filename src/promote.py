"""Gated promotion: `python -m src.promote [--force] [--rollback]`.

The gate, and how every move is recorded: src/serving/promotion.py.
"""
from __future__ import annotations

import argparse

from src.core.cli import run_main
from src.core.config import add_params_args, params_from_args
from src.serving.promotion import promote, rollback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.promote",
                                     description="Move the champion alias to the challenger if it passes register.gate.")
    add_params_args(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="promote the challenger even if the gate refuses")
    group.add_argument("--rollback", action="store_true", help="give champion back to its previous holder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = params_from_args(args)
    outcome = rollback(params) if args.rollback else promote(params, force=args.force)
    name, alias = params.register.name, params.register.champion_alias
    print(outcome.table)
    print()
    for reason in outcome.reasons:
        print(f"  - {reason}")
    if outcome.moved:
        was = f" (was version {outcome.previous})" if outcome.previous else ""
        print(f"{name}: {alias} -> version {outcome.champion}{was} [{outcome.action}]")
    elif outcome.action == "refused":
        held = f"stays at version {outcome.champion}" if outcome.champion else "stays unassigned"
        print(f"{name}: challenger NOT promoted; {alias} {held} (override with --force)")
    else:
        print(f"{name}: nothing to do; {alias} is version {outcome.champion}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
