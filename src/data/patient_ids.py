"""Patient ids from file names: which regular expression, if any, the names suggest.

Without a manifest, a folder such as `P0042_2019.jpg, P0042_2021.jpg, P0043_2020.jpg` holds
several images per patient, and counting each image as its own patient would let one patient
sit in a training fold and its test fold.  A candidate is accepted only when it matches every
name and groups them plausibly: some patients with several images, none with very many.
Grouping too much makes folds stricter; grouping too little leaks, so the choice is shown.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# Tried in order; each needs a (?P<patient>...) group.  Separators: _ - space and dot.
CANDIDATES = (
    r"^(?P<patient>[A-Za-z]*\d+)[_\-\s.]",   # P0042_2019.jpg, 123-left.png, patient0042_1.jpg
    r"^(?P<patient>[^_\-\s.]+)[_\-\s.]",     # first token: AB12cd_x.png
    r"(?P<patient>\d{3,})",                  # the first number of 3+ digits anywhere
)
MAX_IMAGES_PER_PATIENT = 12  # more than this per "patient" means the regex caught something else


def groups(pattern: str, names: Iterable[str]) -> Counter | None:
    """Images per patient under `pattern`, or None when some name has no match."""
    rx = re.compile(pattern)
    counts: Counter = Counter()
    for name in names:
        m = rx.search(name)
        if not m or not m.group("patient"):
            return None
        counts[m.group("patient")] += 1
    return counts


def suggest_patient_regex(names: list[str]) -> str | None:
    """The first candidate that matches every name, gives some patient two or more images and
    none more than MAX_IMAGES_PER_PATIENT; None when the names show no shared ids."""
    if len(names) < 2:
        return None
    for pattern in CANDIDATES:
        counts = groups(pattern, names)
        if counts is None or len(counts) == len(names) or len(counts) < 2:
            continue
        if max(counts.values()) <= MAX_IMAGES_PER_PATIENT:
            return pattern
    return None
