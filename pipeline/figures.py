"""Figures: the one place that sets up matplotlib (headless) and writes a figure to disk.

Every picture the project draws (learning curves, ROC and confusion, the report's gallery and Grad-CAM, the
benchmark chart) starts with `pyplot()` and ends with `save()`: drawn without a display, written atomically as
PNG, then closed so that long runs do not pile up open figures.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import io


def pyplot():
    """`matplotlib.pyplot` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as PNG to `path` atomically, then close it."""
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
