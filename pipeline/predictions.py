"""Predictions: a model's probabilities (averaged over test-time flips) and the files that carry them between stages.

Every stage that trains a model writes `data/predictions/<name>.npz` (validation and test probabilities with their
labels); the ensemble, evaluate and report stages read them from here and nowhere else.
"""
from __future__ import annotations

import numpy as np

from pipeline import io, paths
from pipeline.loader import Batches


def probabilities(model, x, batch_size: int = 64, flips=((),)) -> np.ndarray:
    """P(class 1) as (N,) for two classes, else (N, C); x is an array or `loader.Batches`.

    With `flips` (see `models.flip_axes`), the mean over those flipped copies of every input (test-time
    augmentation)."""
    if isinstance(x, Batches):
        runs = [model.predict(x.flipped(axes), verbose=0) for axes in flips]
    else:
        runs = [model.predict(np.flip(x, axes) if axes else x, batch_size=batch_size, verbose=0) for axes in flips]
    prob = np.mean([np.asarray(r, dtype=np.float64) for r in runs], axis=0)
    return prob[:, 0] if prob.shape[1] == 1 else prob


def save(name: str, classes, val: tuple, test: tuple) -> None:
    """`data/predictions/<name>.npz` from (probabilities, labels) of the validation and test splits."""
    target = paths.PREDICTIONS_DIR / f"{name}.npz"
    with io.atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, val_prob=val[0], val_y=val[1], test_prob=test[0], test_y=test[1], classes=np.array(classes))


def load(name: str, fix: str = "rerun `dvc repro`") -> dict:
    """{val_prob, val_y, test_prob, test_y, classes} that `save` wrote for model `name`."""
    file = paths.PREDICTIONS_DIR / f"{name}.npz"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {fix}")
    with np.load(file) as f:
        return dict(f)


def same_rows(predictions: dict[str, dict]) -> None:
    """Every prediction file must hold the same validation and test rows (the current split): predictions from
    different splits can be neither averaged nor compared."""
    names = list(predictions)
    for name in names[1:]:
        for split in ("val_y", "test_y"):
            if not np.array_equal(predictions[name][split], predictions[names[0]][split]):
                raise ValueError(f"the predictions of {name} and {names[0]} hold different {split.split('_')[0]} "
                                 f"rows: they come from different splits; rerun `dvc repro`")
