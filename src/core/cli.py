"""Shared entry-point plumbing: every stage's `main` runs through `run_main`."""
from __future__ import annotations

import sys
from typing import Callable

from src.core.diskspace import as_output_error
from src.core.errors import BoneHealthError
from src.core.logs import setup_logging
from src.core.offline import offline_defaults
from src.core.redact import redact_url


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a stage's main with the process defaults (offline, console logging); a
    BoneHealthError becomes one line on stderr and exit status 2."""
    offline_defaults()
    setup_logging()
    try:
        code = main(argv)
    except BoneHealthError as exc:
        print(f"error: {redact_url(str(exc))}", file=sys.stderr)  # an echoed URL may carry a password
        return 2
    except OSError as exc:  # a full disk, a read-only or forbidden output, wherever it was hit
        converted = as_output_error(exc)
        if converted is exc:
            raise
        print(f"error: {redact_url(str(converted))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
