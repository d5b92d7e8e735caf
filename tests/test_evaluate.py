"""Evaluate stage: metrics match sklearn on the same predictions; the threshold and the delivered model come from
cross-validation, never from test; exactly the models params name are read; every metric per slice; the headline
figures on the pipeline run's parent."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn import metrics as skm

from conftest import MEMBERS, run_stages, set_params
from pipeline import evaluate, features, models, paths


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


def test_each_model_is_scored_at_its_recorded_threshold_out_of_fold_and_on_test():
    cv_y, cv_fold = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 0, 1])
    cv_prob = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.9])
    test_y, test_prob = np.array([1, 1]), np.array([0.34, 0.6])  # a threshold chosen on test (<= 0.34) would score 1.0
    scored = {"m": {"cv_y": cv_y, "cv_prob": cv_prob, "cv_fold": cv_fold, "test_y": test_y, "test_prob": test_prob},
              "f": {"test_y": test_y, "test_prob": test_prob}}  # not cross-validated (fine-tuning)
    results = evaluate.evaluate(scored, {"m": 0.35, "f": 0.5})
    m = results["m"]
    assert m["threshold"] == 0.35 and m["test"]["accuracy"] == 0.5 and m["cv"]["accuracy"] == 1.0
    assert m["cv"]["accuracy_mean"] == 1.0 and m["cv"]["folds"] == 2
    assert results["f"]["cv"] is None and results["f"]["test"]["n"] == 2


def test_the_delivered_model_follows_the_cv_choice_never_test():
    """Delivered: bagging when cross-validation kept members beside the head, else the head, whatever test says."""
    y = np.array([0, 0, 1, 1])
    good_on_test = {"test_y": y, "test_prob": np.array([0.1, 0.2, 0.8, 0.9])}
    bad_on_test = {"test_y": y, "test_prob": np.array([0.9, 0.2, 0.1, 0.9])}
    results = evaluate.evaluate({"head": good_on_test, "bagging": bad_on_test}, {"head": 0.5, "bagging": 0.5})
    assert results["head"]["test"]["accuracy"] > results["bagging"]["test"]["accuracy"]
    assert evaluate.select(results, bagged=2) == "bagging"
    assert evaluate.select(results, bagged=0) == "head"
    assert evaluate.select({"head": results["head"]}, bagged=None) == "head"


def test_stage_writes_metrics_and_plots(trained_copy):
    run_stages("finetune", *MEMBERS, "ensemble", "evaluate")
    report = json.loads((paths.METRICS / "evaluate.json").read_text())
    results = report["models"]
    assert set(results) == {"head", "finetune", "bagging"}
    bagged = json.loads((paths.METRICS / "cv_bagging.json").read_text())["members"]
    assert report["selected"] == ("bagging" if bagged else "head") and report["selected_by"] == evaluate.SELECTED_BY
    for name, r in results.items():
        for split in ("cv", "test") if name != "finetune" else ("test",):
            assert {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "confusion_matrix", "n"} <= set(r[split])
        assert r["threshold"] == models.read_meta(name)["threshold"]  # the model's own, chosen by CV
    assert results["finetune"]["cv"] is None
    assert results["head"]["cv"]["n"] == results["bagging"]["cv"]["n"] == len(features.train_val(pooled=True)[1])
    for f in ("roc.csv", "confusion.csv", "calibration.csv", "roc_calibration.png", "confusion.png"):
        assert (paths.PLOTS / "evaluate" / f).stat().st_size > 0, f


def test_reads_exactly_the_models_params_name(trained_copy):
    set_params({"evaluate": {"models": ["head"]}})
    run_stages("evaluate")
    report = json.loads((paths.METRICS / "evaluate.json").read_text())
    assert set(report["models"]) == {"head"} and report["selected"] == "head"


def test_models_scored_on_different_rows_are_not_compared():
    from pipeline import predictions

    a = {"cv_y": np.array([0, 1]), "test_y": np.array([0, 1, 1]), "cv_prob": np.array([.2, .8]),
         "test_prob": np.array([.1, .9, .7])}
    b = {**a, "test_y": np.array([1, 1, 0])}  # trained and scored on another split
    predictions.same_rows({"head": a, "finetune": dict(a)})
    with pytest.raises(ValueError, match="different test rows"):
        predictions.same_rows({"head": a, "finetune": b})


def test_every_metric_per_slice_and_the_headline_on_the_parent_run(trained_copy):
    import mlflow

    set_params({"evaluate": {"models": ["head"], "slice_by": ["class_name", "no_such_column"]}})
    run_stages("evaluate")
    report = json.loads((paths.METRICS / "evaluate.json").read_text())
    head = report["models"]["head"]
    assert set(head["slices"]) == {"class_name"}  # a column the split table lacks is left out, as in split.stratify
    for split in ("cv", "test"):
        by = {value: r[split] for value, r in head["slices"]["class_name"].items()}
        assert sum(r["n"] for r in by.values()) == head[split]["n"]
        for value, r in by.items():  # a slice by class: its accuracy is that class's recall
            assert r["accuracy"] == pytest.approx(head[split]["per_class"][value]["recall"])
    assert "Per slice" in Path("reports/index.html").read_text()
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("transfer-learning")
    (parent,) = client.search_runs([exp.experiment_id], "tags.pipeline_run_id = 'test-run' and tags.role = 'parent'")
    m = parent.data.metrics
    assert m["test_accuracy"] == pytest.approx(head["test"]["accuracy"])
    assert m["cv_accuracy"] == pytest.approx(head["cv"]["accuracy_mean"]) and "test_macro_f1" in m
    assert m["minutes.all_stages"] == 0  # no stage had finished before evaluate here (test_dvc counts real ones)
    assert parent.data.tags["selected_model"] == "head"
    assert parent.data.params["evaluate.slice_by"] == str(["class_name", "no_such_column"])
    assert parent.data.params["head.dropout"] == str(yaml.safe_load(Path("params.yaml").read_text())["head"]["dropout"])
    assert any(k.startswith("head_test_class_name.") for k in client.get_run(
        client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")[0].info.run_id).data.metrics)
