"""Evaluate stage: metrics match sklearn on the same predictions; the threshold comes from validation."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import run_stages
from pipeline import evaluate, paths


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    prob = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    got = evaluate.score(y, prob, 0.5)
    pred = (prob >= 0.5).astype(int)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, prob))
    assert got["log_loss"] == pytest.approx(skm.log_loss(y, prob))
    assert got["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2, 1, 0])
    prob = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    got = evaluate.score(y, prob, evaluate.choose_threshold(y, prob))
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert got["f1"] == pytest.approx(skm.f1_score(y, prob.argmax(1), average="macro"))


def test_threshold_is_chosen_on_validation_not_test():
    val_y = np.array([0, 0, 0, 1, 1, 1])
    val_prob = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])  # best split between 0.3 and 0.35
    t = evaluate.choose_threshold(val_y, val_prob)
    assert 0.3 < t <= 0.35
    test_y = np.array([1, 1])
    test_prob = np.array([0.34, 0.6])  # a threshold chosen on test (<= 0.34) would score 1.0
    results = evaluate.evaluate({"m": {"val_y": val_y, "val_prob": val_prob, "test_y": test_y, "test_prob": test_prob}})
    assert results["m"]["threshold"] == t and results["m"]["accuracy"] == 0.5


def test_stage_writes_metrics_and_plots(trained_copy):
    run_stages("finetune", "bagging@0", "bagging@1", "kfold@0", "kfold@1", "evaluate")
    results = json.loads((paths.METRICS / "evaluate.json").read_text())
    assert set(results) == {"head", "finetune", "bagging"}
    for r in results.values():
        assert {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "threshold", "confusion_matrix"} <= set(r)
    assert len(results["bagging"]["members"]) == 2
    assert json.loads((paths.METRICS / "kfold.json").read_text())["folds"] == 2
    for f in ("roc.csv", "confusion.csv", "calibration.csv", "roc_calibration.png", "confusion.png"):
        assert (paths.PLOTS / "evaluate" / f).stat().st_size > 0, f
