"""Predictions: a model's probabilities (averaged over test-time flips) and the files that carry them between stages.

Every cross-validation stage writes a candidate's probabilities for the rows one fold held out
(`data/cv/<candidate>/fold_<k>.npz`); every stage that delivers a model writes `data/predictions/<name>.npz` (its
recipe's out-of-fold probabilities over train+val and the model's test probabilities, with their labels). The
choose, ensemble, evaluate and report stages read them from here and nowhere else.
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


def save(name: str, classes, cv: tuple | None, test: tuple) -> None:
    """`data/predictions/<name>.npz`: the recipe's out-of-fold predictions over train+val, (probabilities, labels,
    fold) in `features.train_val` order (None for a model that was not cross-validated), and the delivered model's
    (probabilities, labels) of the test split."""
    target = paths.PREDICTIONS_DIR / f"{name}.npz"
    arrays = {} if cv is None else {"cv_prob": cv[0], "cv_y": cv[1], "cv_fold": cv[2]}
    with io.atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, **arrays, test_prob=test[0], test_y=test[1], classes=np.array(classes))


def save_fold(name: str, fold: int, prob: np.ndarray, rows: np.ndarray, **extra) -> None:
    """`data/cv/<name>/fold_<k>.npz`: a candidate's probabilities for the rows fold k held out (indices into
    `features.train_val`), with what else its training found (its best epoch)."""
    target = paths.CV_DIR / name / f"fold_{fold}.npz"
    with io.atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, prob=prob, rows=rows, **extra)


def load_fold(name: str, fold: int) -> dict:
    file = paths.CV_DIR / name / f"fold_{fold}.npz"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: run `dvc repro` (fold {fold} of candidate {name} has not run)")
    with np.load(file) as f:
        return dict(f)


def out_of_fold(name: str, folds: np.ndarray, which) -> np.ndarray:
    """A candidate's out-of-fold probabilities for every train+val row (`folds`: the fold of each row), from its
    fold files for the folds in `which`; rows of other folds are NaN."""
    out = None
    for k in which:
        f = load_fold(name, k)
        if out is None:
            out = np.full((len(folds),) + f["prob"].shape[1:], np.nan)
        if not np.array_equal(np.flatnonzero(folds == k), f["rows"]):
            raise ValueError(f"{paths.CV_DIR / name}/fold_{k}.npz holds other rows than fold {k} of the current "
                             f"features: rerun `dvc repro`")
        out[f["rows"]] = f["prob"]
    return out


def load(name: str, fix: str = "rerun `dvc repro`") -> dict:
    """{cv_prob, cv_y, cv_fold (when cross-validated), test_prob, test_y, classes} that `save` wrote for `name`."""
    file = paths.PREDICTIONS_DIR / f"{name}.npz"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {fix}")
    with np.load(file) as f:
        return dict(f)


def same_rows(predictions: dict[str, dict]) -> None:
    """Every prediction file must hold the same train+val and test rows (the current split): predictions from
    different splits can be neither averaged nor compared."""
    names = list(predictions)
    for name in names[1:]:
        for split in ("cv_y", "test_y"):
            if split in predictions[name] and split in predictions[names[0]] and \
                    not np.array_equal(predictions[name][split], predictions[names[0]][split]):
                raise ValueError(f"the predictions of {name} and {names[0]} hold different {split.split('_')[0]} "
                                 f"rows: they come from different splits; rerun `dvc repro`")
