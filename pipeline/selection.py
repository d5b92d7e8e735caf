"""Choosing among candidates by cross-validation: each candidate's out-of-fold predictions over train+val scored
fold by fold, and the one-standard-error rule (Breiman et al., 1984): of the candidates whose mean CV accuracy is
within one standard error of the best mean, take the simplest.

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

RULE = ("mean accuracy over the CV folds of train+val; of the candidates within one standard error of the best, "
        "the simplest (pooled before map, fewer flips, fewer members, threshold 0.5 before a tuned one)")
TOLERANCE = 1e-9  # far below one row's worth of accuracy (1 / n), far above float rounding


def design_rank(name: str) -> int:
    return DESIGNS.index(name)


def fold_scores(y: np.ndarray, prob: np.ndarray, folds: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy and log loss of out-of-fold predictions, per fold (in fold order), at `threshold`."""
    prob = np.asarray(prob)
    n = 2 if prob.ndim == 1 else prob.shape[1]
    acc, loss = [], []
    for k in np.unique(folds):
        rows = folds == k
        acc.append(float((models.labels(prob[rows], threshold) == y[rows]).mean()))
        loss.append(float(log_loss(y[rows], np.clip(prob[rows], 1e-7, 1 - 1e-7), labels=np.arange(n))))
    return summary(acc, loss)


def summary(acc, loss) -> dict:
    """Mean, standard deviation (ddof=1) and standard error of the per-fold figures."""
    acc, loss = np.asarray(acc, float), np.asarray(loss, float)
    sd = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
    return {"accuracy_mean": float(acc.mean()), "accuracy_sd": sd, "accuracy_se": sd / np.sqrt(len(acc)),
            "log_loss_mean": float(loss.mean()), "log_loss_sd": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
            "folds": len(acc), "fold_accuracy": acc.tolist(), "fold_log_loss": loss.tolist()}


def one_standard_error(scores: dict[str, dict], simplest_first: list[str]) -> str:
    """The first of `simplest_first` whose mean accuracy is within one standard error of the best mean."""
    best = max(scores.values(), key=lambda s: s["accuracy_mean"])
    bar = best["accuracy_mean"] - best["accuracy_se"] - TOLERANCE
    return next(name for name in simplest_first if scores[name]["accuracy_mean"] >= bar)


def threshold_rule(y: np.ndarray, prob: np.ndarray, folds: np.ndarray) -> tuple[str, float, dict]:
    """0.5, or a threshold tuned for accuracy (`models.choose_threshold`), for two classes: each fold is scored at
    the threshold tuned on the other folds' out-of-fold predictions, and the one-standard-error rule picks.
    Returns (rule, threshold on all out-of-fold rows, {rule: scores}); more than two classes take the argmax."""
    prob = np.asarray(prob)
    if prob.ndim > 1:
        return "argmax", float("nan"), {}
    tuned = []
    for k in np.unique(folds):
        rows = folds == k
        t = models.choose_threshold(y[~rows], prob[~rows])
        tuned.append(float((models.labels(prob[rows], t) == y[rows]).mean()))
    fixed = fold_scores(y, prob, folds)
    scores = {"0.5": fixed, "tuned": summary(tuned, fixed["fold_log_loss"])}  # the log loss takes no threshold
    rule = one_standard_error(scores, ["0.5", "tuned"])
    return rule, 0.5 if rule == "0.5" else models.choose_threshold(y, prob), scores


def best_epochs(epochs: list[int]) -> int:
    """The epoch count a refit on all of train+val trains for: the median of the folds' best epochs (rounded up)."""
    return int(np.ceil(np.median(epochs)))
