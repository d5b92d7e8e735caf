"""K-fold stage: each fold scores on rows it never trained on; evaluate summarises mean and std."""
import numpy as np

from conftest import run_stages
from pipeline import evaluate, io, kfold, paths, train


def test_fold_data_is_disjoint_and_complete(trained_copy):
    (tx, ty), (hx, hy) = kfold.fold_data(0)
    (tx1, _), (hx1, _) = kfold.fold_data(1)
    n = sum(len(train.load_features(s)[1]) for s in ("train", "val"))
    assert len(ty) + len(hy) == n and len(hx) + len(hx1) == n
    assert len(hy) > 0 and len(tx) == len(hx1)  # two folds: fold 0's training rows are fold 1's held-out rows


def test_fold_stage_and_summary(trained_copy):
    run_stages("kfold@0", "kfold@1")
    folds = [io.read_json(paths.METRICS / "kfold" / f"fold_{k}.json") for k in (0, 1)]
    assert [f["fold"] for f in folds] == [0, 1]
    assert all(0 <= f["accuracy"] <= 1 and f["n_val"] > 0 for f in folds)
    summary = evaluate.kfold_summary((paths.METRICS / "kfold").glob("fold_*.json"))
    acc = [f["accuracy"] for f in folds]
    assert summary["folds"] == 2 and np.isclose(summary["accuracy_mean"], np.mean(acc))
    assert np.isclose(summary["accuracy_std"], np.std(acc))
