"""Loading features: where the extract stage's bottleneck features of a backbone are, reading a split of them, and
the frozen backbone they came from (for the image-in models), and train+val cut into the split stage's folds. The
cv, head, bagging and ensemble stages read features only through here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import backbones, io, params, paths


def extra_backbones(prm: params.Params) -> list[str]:
    """The backbones that bagging members train on besides `backbone.name` (`bagging.backbones`)."""
    return [b for b in prm.bagging.backbones if b != prm.backbone.name]


def features_dir(backbone: str | None = None) -> Path:
    """Where the features of `backbone` are: `data/features` for `backbone.name` (None), else a folder of the same
    layout, `data/features_by_backbone/<backbone>`."""
    return paths.FEATURES_DIR if backbone is None else paths.FEATURES_BY_BACKBONE / backbone


def load_features(split: str, pooled: bool = False, root: Path = paths.FEATURES_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one split, as this stage wrote them into `root` (read into memory): the maps, or
    with `pooled` the pooled top vectors."""
    if not pooled:
        return io.load_pair(root / split, mmap=False)
    x = io.load_npy(root / f"{split}_pooled.npy", mmap=False)  # not the maps: they are not needed
    y = io.load_npy(root / f"{split}_y.npy", mmap=False)
    if len(x) != len(y):
        raise ValueError(f"{root}/{split}_pooled.npy and {split}_y.npy disagree: rerun `dvc repro extract`")
    return x, y


def train_val(pooled: bool = False, root: Path = paths.FEATURES_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, fold) of every train+val row, train rows first, in the order of `data/features/index.csv`
    (every backbone's features are in that order): all that cross-validation and the refit read (never a test row)."""
    index = pd.read_csv(paths.FEATURES_DIR / "index.csv")
    xs, ys, folds = [], [], []
    for split in ("train", "val"):
        x, y = load_features(split, pooled, root)
        xs.append(x), ys.append(y), folds.append(index.loc[index["split"] == split, "fold"].to_numpy())
    x, y, f = np.concatenate(xs), np.concatenate(ys), np.concatenate(folds)
    if len(f) != len(y):
        raise ValueError(f"{paths.FEATURES_DIR}/index.csv does not match the features in {root}: rerun `dvc repro extract`")
    return x, y, f


def fold_rows(folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of `fold`, as indices into `train_val`'s rows."""
    held = folds == fold
    if not held.any():
        raise ValueError(f"fold {fold} holds no rows: check split.folds and cv.folds in params.yaml")
    return np.flatnonzero(~held), np.flatnonzero(held)


def features_model(meta: dict, pooled: bool = False):
    """The frozen backbone that the features in `meta` (features/meta.json) came from: image in, map (or pooled
    top vector) out."""
    return backbones.build_base(meta["name"], meta["weights"], meta["image_size"], meta["cut_layer"], pooled=pooled)
