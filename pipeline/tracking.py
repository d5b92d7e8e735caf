"""MLflow: one parent run per pipeline run, one nested run per stage, and the gated model registry.

The only module that imports mlflow. The parent run is found by its `pipeline_run_id` tag: Airflow sets
PIPELINE_RUN_ID to its run id, `make run` to a timestamp; plain `dvc repro` derives one from params.yaml, so the
stages of one configuration share a parent. A stage that reruns under the same parent replaces its nested run.

CLI: `python -m pipeline.tracking register [--if-better]` registers the best evaluated model if it passes
`evaluate.gate` (and, with --if-better, beats the registered version on the same test split).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
from pathlib import Path

from pipeline import io, params, paths

DISABLE_ENV = "PIPELINE_TRACKING"  # set to "off" to run stages without MLflow


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in {"off", "0", "false"}


def pipeline_run_id() -> str:
    if rid := os.environ.get("PIPELINE_RUN_ID"):
        return rid
    digest = hashlib.sha256(Path(params.PARAMS_FILE).read_bytes()).hexdigest()[:12]
    return f"params-{digest}"


def _setup(t: params.Tracking):
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", t.uri))
    exp = mlflow.get_experiment_by_name(t.experiment)
    if exp is None:
        artifacts = Path("mlartifacts").resolve().as_uri()
        exp_id = mlflow.create_experiment(t.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    return mlflow, mlflow.MlflowClient(), exp_id


def _parent(client, exp_id: str, rid: str) -> str:
    found = client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.role = 'parent'", max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=f"pipeline {rid}", tags={"pipeline_run_id": rid, "role": "parent"}).info.run_id


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@contextlib.contextmanager
def stage_run(stage: str, section: dict | None = None):
    """Open the nested MLflow run of `stage` (yields the mlflow module, or None when tracking is off)."""
    if not enabled():
        yield None
        return
    mlflow, client, exp_id = _setup(params.load().tracking)
    rid = pipeline_run_id()
    parent = _parent(client, exp_id, rid)
    for old in client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.stage = '{stage}'"):
        client.delete_run(old.info.run_id)  # a rerun replaces its nested run
    tags = {"stage": stage, "pipeline_run_id": rid, "mlflow.parentRunId": parent}
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags):
            if section:
                mlflow.log_params({k: str(v)[:500] for k, v in flatten(section).items()})
            yield mlflow
    finally:
        client.set_terminated(parent)  # the parent spans its stages: finished as of the latest one


def keras_callback(mlflow):
    """Per-epoch metrics into the active run (a no-op callback when tracking is off)."""
    import keras

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if mlflow is not None and logs:
                mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)

    return EpochMetrics()


def log_files(mlflow, *files, artifact_path: str | None = None) -> None:
    if mlflow is None:
        return
    for f in files:
        if Path(f).exists():
            mlflow.log_artifact(str(f), artifact_path=artifact_path)


def _test_split_id() -> str:
    return io.sha256_file(paths.CACHE_DIR / "test_y.npy")[:16] + io.sha256_file(paths.CACHE_DIR / "index.csv")[:16]


def register(if_better: bool = False) -> str:
    """Log the best evaluated single-file model with the keras flavour; register it if it passes the gate."""
    prm = params.load()
    metrics = io.read_json(paths.METRICS / "evaluate.json")
    candidates = {m: v for m, v in metrics.items() if (paths.MODELS / f"{m}.keras").exists()}
    if not candidates:
        return "no evaluated model file to register"
    best = max(candidates, key=lambda m: (candidates[m]["accuracy"], candidates[m]["roc_auc"]))
    score, gate = candidates[best], prm.evaluate.gate
    if score["accuracy"] < gate.min_accuracy or score["roc_auc"] < gate.min_roc_auc:
        return (f"not registered: {best} has accuracy {score['accuracy']:.4f}, ROC AUC {score['roc_auc']:.4f}; "
                f"the gate asks {gate.min_accuracy} and {gate.min_roc_auc} (evaluate.gate)")
    mlflow, client, exp_id = _setup(prm.tracking)
    split_id, name = _test_split_id(), prm.tracking.register_as
    if if_better:
        for v in client.search_model_versions(f"name = '{name}'"):
            old = client.get_run(v.run_id)
            if old.data.tags.get("test_split") == split_id and old.data.metrics.get("test_accuracy", -1) >= score["accuracy"]:
                return f"not registered: version {v.version} already has test accuracy {old.data.metrics['test_accuracy']:.4f}"
    import keras

    from pipeline import augment  # noqa: F401 - registers the augmentation layer a fine-tuned model holds

    model = keras.saving.load_model(paths.MODELS / f"{best}.keras", compile=False)
    rid = pipeline_run_id()
    tags = {"stage": "register", "pipeline_run_id": rid, "test_split": split_id, "model": best,
            "mlflow.parentRunId": _parent(client, exp_id, rid)}
    with mlflow.start_run(experiment_id=exp_id, run_name=f"register {best}", tags=tags):
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in score.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(paths.MODELS / f"{best}.json"))
        info = mlflow.keras.log_model(model, name="model", registered_model_name=name)
    return f"registered {best} as '{name}' (accuracy {score['accuracy']:.4f}, ROC AUC {score['roc_auc']:.4f}): {info.model_uri}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="register the best evaluated model if it passes evaluate.gate")
    reg.add_argument("--if-better", action="store_true", help="only if it beats the registered version on this test split")
    args = ap.parse_args(argv)
    print(register(if_better=args.if_better))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
