"""A hash of the project's own source: resume state records it, so finished work made by other
code (`dvc repro` after an edit) is redone rather than reused."""
from __future__ import annotations

import hashlib
from pathlib import Path

SRC_ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint(root: Path = SRC_ROOT, packages: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> str:
    """sha256 over the source of `packages` (folders) and `modules` (files) under `root`, paths
    and bytes."""
    paths = [p for package in packages for p in sorted((root / package).rglob("*.py"))]
    paths += [root / m for m in modules]
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
