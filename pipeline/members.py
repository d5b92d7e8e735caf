"""The bagging members: their names, the backbone each trains on, how one is trained (a head of the chosen recipe on
a bootstrap resample, for the recipe's epoch count) and their predictions averaged. The bagging stage
cross-validates them, the ensemble stage refits the ones cross-validation keeps, evaluate scores them."""
from __future__ import annotations

import numpy as np

from pipeline import heads, params


def member_name(member: int) -> str:
    return f"bagging/member_{member}"


def member_backbone(prm: params.Params, member: int) -> str | None:
    """The backbone member `member` trains on: None for `backbone.name` (features in `data/features`), else the
    name of one of `bagging.backbones` (features in `data/features_by_backbone/<name>`, `features.features_dir`)."""
    names = prm.bagging.backbones
    name = names[member % len(names)] if names else prm.backbone.name
    return None if name == prm.backbone.name else name


def bootstrap(n: int, fraction: float, seed: int) -> np.ndarray:
    """Row indices drawn with replacement: round(fraction * n) of them, sorted."""
    return np.sort(np.random.default_rng(seed).integers(0, n, size=max(1, round(fraction * n))))


def fit(prm: params.Params, member: int, p: heads.Recipe, x: np.ndarray, y: np.ndarray, n_classes: int,
        fold: int | None = None, callbacks=()):
    """Member `member` trained on a bootstrap resample of (x, y) for `p.epochs` epochs (no rows held back: the
    count came from cross-validation). `fold` seeds a cross-validation copy differently from the refit.
    Returns (model, history, resampled rows)."""
    seed = prm.seed + 1000 * (member + 1) + (0 if fold is None else 100 * (fold + 1))
    rows = bootstrap(len(y), prm.bagging.sample_fraction, seed)
    model, history = heads.train_head((x[rows], y[rows]), None, n_classes, p, seed, name=f"member_{member}",
                                      callbacks=callbacks, verbose=0)
    return model, history, rows


def combine(probs: list[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the mean of its parts'."""
    return np.mean(probs, axis=0)
