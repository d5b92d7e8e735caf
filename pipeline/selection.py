"""Choosing among candidates by cross-validation: each candidate's out-of-fold predictions over train+val scored
fold by fold, and the one-standard-error rule (Breiman et al., 1984): of the candidates whose mean CV balanced
accuracy is within one standard error of the best mean, take the simplest.

The figure every choice compares (`FIGURE`) is balanced accuracy, the mean of the per-class recalls. With a rare
class, plain accuracy rewards a model that never predicts it (ELPV's 4 levels: 57.5 % for calling every cell
functional); balanced accuracy gives every class the same weight, so that model scores 1/K. It is what
`head.class_weight: balanced` trains for, equals accuracy when the classes are balanced (cats vs dogs), and its
chance level is 1/K for any number of classes K (the gate reads it rescaled so that chance is 0,
`adjusted_balanced_accuracy`).

Simplicity is a fixed order, written here once: the pooled top before a head on the feature map, fewer flips
before more (`params.DESIGNS`), fewer bagged members before more, the threshold 0.5 before one tuned on the
out-of-fold predictions. Only the scores of the folds decide, never which candidate happens to be a rounding error
ahead: candidates closer to the bar than `TOLERANCE` count as within it.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss

from pipeline import models
from pipeline.params import DESIGNS

FIGURE = "balanced_accuracy"
RULE = ("mean balanced accuracy (mean per-class recall) over the CV folds of train+val; of the candidates within "
        "one standard error of the best, "
        "the simplest (pooled before map, fewer flips, fewer members, threshold 0.5 before a tuned one)")
TOLERANCE = 1e-9  # far below one row's worth of accuracy (1 / n), far above float rounding


def design_rank(name: str) -> int:
    return DESIGNS.index(name)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y` (sklearn's), without its warning for a class only predicted."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)])) if len(y) else float("nan")


def fold_scores(y: np.ndarray, prob: np.ndarray, folds: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy and log loss of out-of-fold predictions, per fold (in fold order), at `threshold`."""
    prob = np.asarray(prob)
    n = 2 if prob.ndim == 1 else prob.shape[1]
    figures = {"accuracy": [], FIGURE: [], "log_loss": []}
    for k in np.unique(folds):
        rows = folds == k
        pred = models.labels(prob[rows], threshold)
        figures["accuracy"].append(float((pred == y[rows]).mean()))
        figures[FIGURE].append(balanced_accuracy(y[rows], pred))
        figures["log_loss"].append(float(log_loss(y[rows], np.clip(prob[rows], 1e-7, 1 - 1e-7), labels=np.arange(n))))
    return summary(figures)


def summary(per_fold: dict[str, list[float]]) -> dict:
    """`<figure>_mean`, `_sd` (ddof=1), `_se` and `fold_<figure>` of each figure's per-fold values, and `folds`."""
    out = {}
    for name, values in per_fold.items():
        v = np.asarray(values, float)
        sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.update({f"{name}_mean": float(v.mean()), f"{name}_sd": sd, f"{name}_se": sd / np.sqrt(len(v)),
                    f"fold_{name}": v.tolist()})
    return {**out, "folds": len(v)}


def one_standard_error(scores: dict[str, dict], simplest_first: list[str]) -> str:
    """The first of `simplest_first` whose mean `FIGURE` is within one standard error of the best mean."""
    best = max(scores.values(), key=lambda s: s[f"{FIGURE}_mean"])
    bar = best[f"{FIGURE}_mean"] - best[f"{FIGURE}_se"] - TOLERANCE
    return next(name for name in simplest_first if scores[name][f"{FIGURE}_mean"] >= bar)


def threshold_rule(y: np.ndarray, prob: np.ndarray, folds: np.ndarray) -> tuple[str, float, dict]:
    """0.5, or a threshold tuned for balanced accuracy (`models.choose_threshold`), for two classes: each fold is scored at
    the threshold tuned on the other folds' out-of-fold predictions, and the one-standard-error rule picks.
    Returns (rule, threshold on all out-of-fold rows, {rule: scores}); more than two classes take the argmax."""
    prob = np.asarray(prob)
    if prob.ndim > 1:
        return "argmax", float("nan"), {}
    tuned = {"accuracy": [], FIGURE: [], "log_loss": []}
    for k in np.unique(folds):
        rows = folds == k
        pred = models.labels(prob[rows], models.choose_threshold(y[~rows], prob[~rows]))
        tuned["accuracy"].append(float((pred == y[rows]).mean()))
        tuned[FIGURE].append(balanced_accuracy(y[rows], pred))
    fixed = fold_scores(y, prob, folds)
    tuned["log_loss"] = fixed["fold_log_loss"]  # the log loss takes no threshold
    scores = {"0.5": fixed, "tuned": summary(tuned)}
    rule = one_standard_error(scores, ["0.5", "tuned"])
    return rule, 0.5 if rule == "0.5" else models.choose_threshold(y, prob), scores


def best_epochs(epochs: list[int]) -> int:
    """The epoch count a refit on all of train+val trains for: the median of the folds' best epochs (rounded up)."""
    return int(np.ceil(np.median(epochs)))
