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


def image_grid(rows: list[tuple[str, list[tuple]]], cols: int, title: str = ""):
    """Rows of pictures: each row is (label, [(image, caption, highlighted), ...]) and shows at most `cols` of
    them; a highlighted caption is red."""
    plt = pyplot()
    fig, axes = plt.subplots(max(1, len(rows)), cols, figsize=(1.9 * cols, 2.3 * max(1, len(rows))), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, (label, cells) in enumerate(rows):
        for ax, (image, caption, highlighted) in zip(axes[r], cells):
            ax.imshow(image)
            ax.set_title(caption, fontsize=7, color="firebrick" if highlighted else "black")
        axes[r][0].text(-0.08, 0.5, label, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=7)
    if not rows:
        axes[0][0].text(0.5, 0.5, "none found", ha="center", va="center", transform=axes[0][0].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
