"""MLflow: one parent run per pipeline run, one nested run per stage run (reruns add runs), the parent failing with
a stage, lineage on every run and version, and the gated registry comparing models on the current test split."""
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import make_folder, run_stages, set_params
from pipeline import diagnose, io, models, params, paths, registry, tracking


def runs(**tags):
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(experiment_names=["transfer-learning"], filter_string=query, output_format="list")


def use_store():
    mlflow.set_tracking_uri(tracking.os.environ["MLFLOW_TRACKING_URI"])


def test_parent_and_nested_runs(trained_copy):
    run_stages("head", "head", "cv@map-0")
    use_store()
    parents = runs(pipeline_run_id="test-run", role="parent")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = runs(pipeline_run_id="test-run", role="stage")
    stages = sorted(r.data.tags["stage"] for r in nested)
    assert stages == ["cv@map-0", "head", "head"]  # a rerun adds a run: history is never deleted
    assert mlflow.search_runs(experiment_names=["transfer-learning"], run_view_type=mlflow.entities.ViewType.DELETED_ONLY,
                              output_format="list") == []
    head = next(r for r in nested if r.data.tags.get("stage") == "head")
    assert head.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert head.data.params["head.epochs"] == str(io.read_json(paths.RECIPE)["epochs"]) and "loss" in head.data.metrics
    y = io.load_npy(paths.FEATURES_DIR / "train_y.npy", mmap=False)
    found = diagnose.diagnose(pd.read_csv(paths.PLOTS / "head" / "history.csv"), diagnose.majority_share(y))
    assert {k: v for k, v in head.data.tags.items() if k.startswith("diagnosis")} == diagnose.tags(found)
    history = mlflow.MlflowClient().get_metric_history(head.info.run_id, "loss")
    assert len(history) >= 2  # per-epoch metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(head.info.run_id)}
    assert {"head.json", "learning_curves.png", "history.csv"} <= artifacts


def test_lineage_dataset_and_experiment_kind(trained_copy):
    run_stages("head")
    use_store()
    head = runs(pipeline_run_id="test-run", stage="head")[0]
    assert head.data.tags["lineage.split_sha256"] == io.sha256_file(paths.SPLIT_TABLE)
    assert "lineage.git_commit" not in head.data.tags  # the copy is no git repository: nothing is guessed
    inputs = head.inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["split"] and inputs[0].tags[0].value == "head"
    experiment = mlflow.get_experiment_by_name("transfer-learning")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_split_validate_and_cache_have_runs(project):
    run_stages("split", "validate", "cache")
    use_store()
    by_stage = {r.data.tags["stage"]: r for r in runs(pipeline_run_id="test-run", role="stage")}
    assert set(by_stage) == {"split", "validate", "cache"}
    assert by_stage["split"].data.metrics["n_train"] > 0 and by_stage["cache"].data.metrics["n_test"] > 0
    assert by_stage["validate"].data.metrics["n_skipped"] == 0
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(by_stage["validate"].info.run_id)}
    assert {"report.json", "summary.md"} <= names


def test_a_failed_stage_fails_the_parent_until_it_succeeds(trained_copy):
    (paths.MODELS / "head.keras").unlink()
    with pytest.raises(Exception):
        run_stages("finetune")  # no head: the phase-order error
    use_store()
    assert runs(pipeline_run_id="test-run", stage="finetune")[0].info.status == "FAILED"
    assert runs(pipeline_run_id="test-run", role="parent")[0].info.status == "FAILED"
    run_stages("head", "finetune")  # the retry succeeds
    assert runs(pipeline_run_id="test-run", role="parent")[0].info.status == "FINISHED"
    assert sorted(r.info.status for r in runs(pipeline_run_id="test-run", stage="finetune")) == ["FAILED", "FINISHED"]


def test_run_id_defaults_to_the_params(trained_copy, monkeypatch):
    monkeypatch.delenv("PIPELINE_RUN_ID")
    first = tracking.pipeline_run_id()
    set_params({"head": {"epochs": 7}})
    assert first.startswith("params-") and tracking.pipeline_run_id() != first


def test_gate_refuses_missing_and_nan_metrics():
    gate = params.Gate(min_adjusted_balanced_accuracy=0.5, min_roc_auc=0.5)
    good = {"adjusted_balanced_accuracy": 0.9, "roc_auc": 0.9}
    assert registry.gate_failures(good, gate) == []
    assert registry.gate_failures({**good, "roc_auc": float("nan")}, gate) == ["roc_auc is nan"]
    assert registry.gate_failures({"adjusted_balanced_accuracy": 0.9}, gate) == ["roc_auc is missing"]
    assert registry.gate_failures({**good, "adjusted_balanced_accuracy": 0.4}, gate) == \
        ["adjusted_balanced_accuracy 0.4000 < 0.5"]


def test_the_imbalance_aware_figures_do_not_reward_the_majority_class():
    """On 90 % of one class, calling everything that class has accuracy 0.9 but balanced accuracy 1/2 and adjusted
    balanced accuracy 0: the selection rule, the gate and the registry's comparison read those."""
    from pipeline import evaluate, selection

    y = np.array([0] * 90 + [1] * 10)
    majority = np.full(100, 0.1)  # P(class 1): everything called class 0
    fair = np.where(y == 1, 0.7, 0.3)
    fair[:15] = 0.7  # 15 of the majority wrong, every rare row right
    scores = {"majority": evaluate.score(y, majority, 0.5), "fair": evaluate.score(y, fair, 0.5)}
    assert scores["majority"]["accuracy"] == 0.9 > scores["fair"]["accuracy"] == 0.85
    assert scores["majority"]["balanced_accuracy"] == 0.5 and scores["majority"]["adjusted_balanced_accuracy"] == 0.0
    assert registry.gate_failures({**scores["majority"], "roc_auc": 0.9}, params.Gate()) != []
    folds = np.arange(100) % 5
    by_fold = {n: selection.fold_scores(y, p, folds) for n, p in (("majority", majority), ("fair", fair))}
    assert selection.one_standard_error(by_fold, ["majority", "fair"]) == "fair"


def invert(name: str = "head") -> None:
    """Turn the model into its opposite (negated output layer): a worse model with the same files."""
    model, meta = models.load(name)
    out = model.get_layer("classifier").get_layer("head").get_layer("head_output")
    kernel, bias = out.get_weights()
    out.set_weights([-kernel, -bias])
    models.save(model, name, meta)


def registered(name="image-classifier"):
    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def test_registry_gate_and_retrain_comparison_on_new_data(trained_copy, tmp_path):
    set_params({"evaluate": {"models": ["head"]}})
    good = tmp_path / "good"
    shutil.copytree(paths.MODELS, good)
    invert()
    run_stages("evaluate", "export")  # registers the (inverted, poor) model: nothing registered yet
    use_store()
    assert sorted(str(v.version) for v in registered()) == ["1"]
    version = registered()[0]
    assert version.tags["model"] == "head" and version.tags["lineage.split_sha256"] == io.sha256_file(paths.SPLIT_TABLE)
    register_run = mlflow.get_run(version.run_id)
    assert register_run.data.tags["mlflow.parentRunId"] == runs(pipeline_run_id="test-run", role="parent")[0].info.run_id

    # new data arrives: more images, a new split and test split; the registered model is scored on it too
    make_folder(Path(params.load().data.path), per_class=24, seed=1)
    run_stages("split", "validate", "cache")
    shutil.rmtree(paths.MODELS)
    shutil.copytree(good, paths.MODELS)  # the good model
    message = registry.register(if_better=True)
    assert message.startswith("registered head") and sorted(str(v.version) for v in registered()) == ["1", "2"], message
    invert()  # a worse model than version 2 on the same current test split
    message = registry.register(if_better=True)
    assert message.startswith("not registered: the champion, version 2, scores"), message
    assert len(registered()) == 2
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("image-classifier", registry.CHAMPION).version) == "2"
    # a champion trained on another split is not compared with: the worse model is registered and becomes champion
    client.set_model_version_tag("image-classifier", "2", "lineage.split_sha256", "another-split")
    message = registry.register(if_better=True)
    assert message.startswith("registered head") and len(registered()) == 3, message
    assert str(client.get_model_version_by_alias("image-classifier", registry.CHAMPION).version) == "3"

    report = json.loads((paths.METRICS / "evaluate.json").read_text())
    report["models"]["head"]["cv"]["roc_auc"] = float("nan")  # the gate reads the out-of-fold figures
    io.write_json(paths.METRICS / "evaluate.json", report)
    message = registry.register()
    assert message.startswith("not registered: head fails evaluate.gate") and "roc_auc is nan" in message
    assert len(registered()) == 3


def test_tracking_can_be_switched_off(trained_copy, monkeypatch):
    monkeypatch.setenv("PIPELINE_TRACKING", "off")
    with tracking.stage_run("head", {"a": 1}) as run:
        assert run is None
    assert not tracking.registering()
    monkeypatch.setenv("PIPELINE_TRACKING", "on")
    monkeypatch.setenv("PIPELINE_REGISTER", "off")
    assert tracking.enabled() and not tracking.registering()
    assert np.isnan(models.choose_threshold(np.array([0, 1]), np.eye(2)))
