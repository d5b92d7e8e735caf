"""MLflow: one parent run per pipeline run, one nested run per stage (replaced on rerun), gated registry."""
import json

import mlflow

from conftest import run_stages, set_params
from pipeline import paths, tracking


def runs(**tags):
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(experiment_names=["transfer-learning"], filter_string=query, output_format="list")


def test_parent_and_nested_runs(trained_copy):
    run_stages("head", "head", "kfold@0")
    mlflow.set_tracking_uri(tracking.os.environ["MLFLOW_TRACKING_URI"])
    parents = runs(pipeline_run_id="test-run", role="parent")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = runs(pipeline_run_id="test-run")
    stages = sorted(r.data.tags["stage"] for r in nested if "stage" in r.data.tags)
    assert stages == ["head", "kfold@0"]  # the second head run replaced the first
    head = next(r for r in nested if r.data.tags.get("stage") == "head")
    assert head.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert head.data.params["head.epochs"] == "6" and "val_loss" in head.data.metrics
    history = mlflow.MlflowClient().get_metric_history(head.info.run_id, "loss")
    assert len(history) >= 2  # per-epoch metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(head.info.run_id)}
    assert {"head.json", "learning_curves.png", "history.csv"} <= artifacts


def test_run_id_defaults_to_the_params(trained_copy, monkeypatch):
    monkeypatch.delenv("PIPELINE_RUN_ID")
    first = tracking.pipeline_run_id()
    set_params({"head": {"epochs": 7}})
    assert first.startswith("params-") and tracking.pipeline_run_id() != first


def test_registry_gate(trained_copy):
    run_stages("finetune", "bagging@0", "bagging@1", "evaluate")  # evaluate offers the best model to the registry
    mlflow.set_tracking_uri(tracking.os.environ["MLFLOW_TRACKING_URI"])
    versions = mlflow.MlflowClient().search_model_versions("name = 'image-classifier'")
    assert len(versions) == 1
    register_run = mlflow.get_run(versions[0].run_id)
    assert register_run.data.tags["mlflow.parentRunId"] == runs(pipeline_run_id="test-run", role="parent")[0].info.run_id
    assert tracking.register(if_better=True).startswith("not registered: version 1 already has")
    scores = json.loads((paths.METRICS / "evaluate.json").read_text())
    for s in scores.values():
        s.update(accuracy=0.80, roc_auc=0.95)
    (paths.METRICS / "evaluate.json").write_text(json.dumps(scores))
    set_params({"evaluate": {"gate": {"min_accuracy": 0.85, "min_roc_auc": 0.9}}})
    message = tracking.register()
    assert message.startswith("not registered") and "accuracy 0.8000" in message and "evaluate.gate" in message
    assert len(mlflow.MlflowClient().search_model_versions("name = 'image-classifier'")) == 1


def test_tracking_can_be_switched_off(trained_copy, monkeypatch):
    monkeypatch.setenv("PIPELINE_TRACKING", "off")
    with tracking.stage_run("head", {"a": 1}) as run:
        assert run is None
