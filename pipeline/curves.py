"""Learning curves: every training stage's per-epoch history as `history.csv` (for `dvc plots`) and a picture,
with the diagnosis of the curves (`pipeline.diagnose`) printed and set as tags of the stage's MLflow run."""
from __future__ import annotations

import pandas as pd

from pipeline import diagnose, figures, io, paths


def save(history: pd.DataFrame, stage: str, run=None, y_train=None) -> list:
    """`plots/<stage>/history.csv` and `learning_curves.png` (loss and accuracy per epoch); returns both paths."""
    findings = diagnose.diagnose(history, None if y_train is None else diagnose.majority_share(y_train))
    for f in findings:
        print(f"diagnosis {stage}: {f.line()}")
    if run is not None:
        run.set_tags(diagnose.tags(findings))

    out = paths.PLOTS / stage
    io.write_csv(out / "history.csv", history)
    fig, axes = figures.pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(history["epoch"], history[key], style, marker="o", label=key)
        ax.set(xlabel="epoch", title=f"{stage}: {metric}")
        ax.legend()
    fig.tight_layout()
    return [out / "history.csv", figures.save(fig, out / "learning_curves.png")]
