"""Console output of library code: module loggers (`logging.getLogger(__name__)`) under the
`src` logger, shown by stage entries as plain lines on stderr (stdout stays for results)."""
from __future__ import annotations

import logging
import os
import sys

ROOT = "src"
LEVEL_ENV = "BONE_HEALTH_LOG_LEVEL"


class _StderrNow(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(level: str | int | None = None) -> None:
    """One handler on the `src` logger: the message alone, INFO by default (or
    $BONE_HEALTH_LOG_LEVEL: DEBUG, WARNING...).  Safe to call more than once."""
    logger = logging.getLogger(ROOT)
    level = level or os.environ.get(LEVEL_ENV, "INFO")
    logger.setLevel(level if isinstance(level, int) else str(level).upper())
    if not any(isinstance(h, _StderrNow) for h in logger.handlers):
        handler = _StderrNow()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
