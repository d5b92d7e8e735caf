"""K-fold stage, one DVC stage instance per fold: the head cross-validated over the split stage's folds.

Fold k trains on the train+val rows of every other fold (a tenth of them held back for early stopping) and scores
on fold k; the evaluate stage reports the mean
and standard deviation over folds.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, roc_auc_score

from pipeline import curves, features, heads, io, models, params, paths, predictions, tracking


def fold_data(fold: int, pooled: bool = False):
    """(train, held-out) feature/label pairs for `fold`, from the train and val splits (pooled: the pooled top)."""
    index = pd.read_csv(paths.FEATURES_DIR / "index.csv")
    xs, ys, folds = [], [], []
    for split in ("train", "val"):
        x, y = features.load_features(split, pooled)
        xs.append(x), ys.append(y), folds.append(index.loc[index["split"] == split, "fold"].to_numpy())
    x, y, f = np.concatenate(xs), np.concatenate(ys), np.concatenate(folds)
    if len(f) != len(y):
        raise ValueError(f"{paths.FEATURES_DIR}/index.csv does not match the features: rerun `dvc repro extract`")
    if not (f == fold).any():
        raise ValueError(f"fold {fold} holds no rows: check split.folds and kfold.folds in params.yaml")
    return (x[f != fold], y[f != fold]), (x[f == fold], y[f == fold])


def score(y: np.ndarray, prob: np.ndarray) -> dict:
    pred = models.labels(prob, 0.5)
    auc = roc_auc_score(y, prob, multi_class="ovr") if len(np.unique(y)) > 1 else float("nan")
    return {"accuracy": float(accuracy_score(y, pred)), "roc_auc": float(auc)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.kfold")
    ap.add_argument("--fold", type=int, required=True)
    fold = ap.parse_args(argv).fold
    prm = params.load()
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    p = heads.chosen(prm.head)  # the design the head stage chose on validation
    (train_xy, held_xy) = fold_data(fold, pooled=p.design == "pooled")
    # early stopping watches a slice of the training folds, never the fold being scored
    order = np.random.default_rng(prm.seed + fold).permutation(len(train_xy[1]))
    inner, fit_rows = order[: max(1, len(order) // 10)], order[max(1, len(order) // 10):]
    with tracking.stage_run(f"kfold@{fold}", {"head": p.model_dump(), "epochs": prm.kfold.epochs}) as run:
        model, history = heads.train_head((train_xy[0][fit_rows], train_xy[1][fit_rows]),
                                          (train_xy[0][inner], train_xy[1][inner]), len(meta["classes"]), p,
                                         prm.seed + fold, name=f"fold_{fold}", epochs=prm.kfold.epochs, verbose=0)
        prob = predictions.probabilities(model, held_xy[0], flips=heads.flips_of(p))
        result = {"fold": fold, **score(held_xy[1], prob),
                  "n_train": len(fit_rows), "n_val": len(held_xy[1])}
        if run:
            run.log_metrics({k: result[k] for k in ("accuracy", "roc_auc")})
        tracking.log_files(run, *curves.save(history, f"kfold/fold_{fold}", run,
                                                   train_xy[1][fit_rows]))
    io.write_json(paths.METRICS / "kfold" / f"fold_{fold}.json", result)
    print(f"kfold {fold}: accuracy {result['accuracy']:.4f}, ROC AUC {result['roc_auc']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
