"""K-fold stage: each fold scores on rows it never trained on; evaluate summarises mean and std."""
import numpy as np

from conftest import run_stages
from pipeline import evaluate, features, io, kfold, paths


def test_fold_data_is_disjoint_and_complete(trained_copy):
    (tx, ty), (hx, hy) = kfold.fold_data(0)
    (tx1, _), (hx1, _) = kfold.fold_data(1)
    n = sum(len(features.load_features(s)[1]) for s in ("train", "val"))
    assert len(ty) + len(hy) == n and len(hx) + len(hx1) == n
    assert len(hy) > 0 and len(tx) == len(hx1)  # two folds: fold 0's training rows are fold 1's held-out rows


def test_folds_are_disjoint_and_cover_train_and_val_exactly(trained_copy):
    import pandas as pd

    index = pd.read_csv(paths.FEATURES_DIR / "index.csv")
    table = pd.read_csv(paths.SPLIT_TABLE)
    pool = set(table.loc[table["split"].isin(["train", "val"]), "path"])
    held = [set(index.loc[index["fold"] == k, "path"]) for k in (0, 1)]
    assert not held[0] & held[1] and held[0] | held[1] == pool  # every train+val image in exactly one fold
    assert not pool & set(table.loc[table["split"] == "test", "path"])  # and no test image in any
    (_, _), (hx, _) = kfold.fold_data(0)
    assert len(hx) == len(held[0])


def test_fold_stage_and_summary(trained_copy):
    run_stages("kfold@0", "kfold@1")
    folds = [io.read_json(paths.METRICS / "kfold" / f"fold_{k}.json") for k in (0, 1)]
    assert [f["fold"] for f in folds] == [0, 1]
    assert all(0 <= f["accuracy"] <= 1 and f["n_val"] > 0 for f in folds)
    summary = evaluate.kfold_summary([paths.METRICS / "kfold" / f"fold_{k}.json" for k in (0, 1)])
    acc = [f["accuracy"] for f in folds]
    assert summary["folds"] == 2 and np.isclose(summary["accuracy_mean"], np.mean(acc))
    assert np.isclose(summary["accuracy_std"], np.std(acc))
