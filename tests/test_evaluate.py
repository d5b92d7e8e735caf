"""Evaluate stage: metrics match sklearn on the same predictions; the threshold and the selected model come from
validation, never from test; exactly the models, members and folds params name are read."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import run_stages, set_params
from pipeline import evaluate, models, paths


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
    got = evaluate.score(y, prob, models.choose_threshold(y, prob))
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert got["f1"] == pytest.approx(skm.f1_score(y, prob.argmax(1), average="macro"))


def test_threshold_is_chosen_on_validation_not_test():
    val_y = np.array([0, 0, 0, 1, 1, 1])
    val_prob = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])  # best split between 0.3 and 0.35
    t = models.choose_threshold(val_y, val_prob)
    assert 0.3 < t <= 0.35
    test_y = np.array([1, 1])
    test_prob = np.array([0.34, 0.6])  # a threshold chosen on test (<= 0.34) would score 1.0
    results = evaluate.evaluate({"m": {"val_y": val_y, "val_prob": val_prob, "test_y": test_y, "test_prob": test_prob}})
    assert results["m"]["threshold"] == t and results["m"]["test"]["accuracy"] == 0.5


def test_selection_reads_validation_only():
    """The test-best and the validation-best model differ: the validation one is selected, whatever test says."""
    y = np.array([0, 0, 1, 1])
    good_on_val = {"val_y": y, "val_prob": np.array([0.1, 0.2, 0.8, 0.9]),
                   "test_y": y, "test_prob": np.array([0.9, 0.2, 0.1, 0.9])}  # 50 % on test
    good_on_test = {"val_y": y, "val_prob": np.array([0.9, 0.2, 0.8, 0.1]),   # 50 % on val
                    "test_y": y, "test_prob": np.array([0.1, 0.2, 0.8, 0.9])}
    results = evaluate.evaluate({"a": good_on_val, "b": good_on_test})
    assert results["b"]["test"]["accuracy"] > results["a"]["test"]["accuracy"]
    assert evaluate.select(results) == "a"
    poisoned = {k: {**v, "test": {**v["test"], "accuracy": 1.0, "log_loss": 0.0}} for k, v in results.items()}
    assert evaluate.select(poisoned) == "a"  # test figures cannot move it
    tie = {"a": good_on_val, "c": {**good_on_val, "val_prob": np.array([0.4, 0.45, 0.55, 0.6])}}
    assert evaluate.select(evaluate.evaluate(tie)) == "a"  # same val accuracy: lower val log loss wins


def test_stage_writes_metrics_and_plots(trained_copy):
    run_stages("finetune", "bagging@0", "bagging@1", "ensemble", "kfold@0", "kfold@1", "evaluate")
    report = json.loads((paths.METRICS / "evaluate.json").read_text())
    results = report["models"]
    assert set(results) == {"head", "finetune", "bagging"}
    assert report["selected"] == evaluate.select(results) and report["selected_by"] == evaluate.SELECTED_BY
    for name, r in results.items():
        for split in ("val", "test"):
            assert {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "confusion_matrix", "n"} <= set(r[split])
        assert r["threshold"] == models.read_meta(name)["threshold"]  # the model's own, chosen on validation
    assert [m["member"] for m in results["bagging"]["members"]] == [0, 1]
    assert json.loads((paths.METRICS / "kfold.json").read_text())["folds"] == 2
    for f in ("roc.csv", "confusion.csv", "calibration.csv", "roc_calibration.png", "confusion.png"):
        assert (paths.PLOTS / "evaluate" / f).stat().st_size > 0, f


def test_reads_exactly_the_folds_and_models_params_name(trained_copy):
    run_stages("kfold@0", "kfold@1")
    (paths.METRICS / "kfold" / "fold_7.json").write_text(json.dumps({"fold": 7, "accuracy": 0.0, "roc_auc": 0.0}))
    set_params({"evaluate": {"models": ["head"]}, "kfold": {"folds": [1]}})
    run_stages("evaluate")
    report = json.loads((paths.METRICS / "evaluate.json").read_text())
    assert set(report["models"]) == {"head"} and report["selected"] == "head"
    kfold = json.loads((paths.METRICS / "kfold.json").read_text())
    assert kfold["folds"] == 1
    assert kfold["accuracy_mean"] == json.loads((paths.METRICS / "kfold" / "fold_1.json").read_text())["accuracy"]


def test_models_scored_on_different_rows_are_not_compared():
    from pipeline import predictions

    a = {"val_y": np.array([0, 1]), "test_y": np.array([0, 1, 1]), "val_prob": np.array([.2, .8]),
         "test_prob": np.array([.1, .9, .7])}
    b = {**a, "test_y": np.array([1, 1, 0])}  # trained and scored on another split
    predictions.same_rows({"head": a, "finetune": dict(a)})
    with pytest.raises(ValueError, match="different test rows"):
        predictions.same_rows({"head": a, "finetune": b})
