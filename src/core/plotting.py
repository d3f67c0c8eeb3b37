"""Headless matplotlib for every figure the pipeline writes (stages run under DVC, CI and SSH).
Selecting the backend is a process-wide change, so it happens on first use, not on import."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
