"""MLflow: one parent run per pipeline run, one nested run per stage, and the gated model registry.

With `pipeline.serving` (the model's pyfunc), the only module that imports mlflow. The parent run is found by its
`pipeline_run_id` tag: Airflow sets PIPELINE_RUN_ID to its run id, `make run` to a timestamp; plain `dvc repro`
derives one from params.yaml, so the stages of one configuration share a parent.

- History is never rewritten: a stage that reruns adds a nested run beside the old one.
- The parent's status follows its stages: FAILED while the latest run of any stage failed, FINISHED otherwise.
- Every run carries its lineage (`pipeline.lineage`: git commit, split table hash, dvc.lock hash of its inputs) as
  tags, and the split table as an MLflow dataset input (the runs table's Dataset column).
- The experiment is marked as model training, so the UI opens on its runs.

CLI: `python -m pipeline.tracking register [--if-better]` registers the model evaluate selected (on validation)
if it passes `evaluate.gate` and, with --if-better, scores better than the registered version on the current test
split (both loaded as pyfunc models, scored on the same images).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
from pathlib import Path

from pipeline import io, lineage, params, paths

DISABLE_ENV = "PIPELINE_TRACKING"  # set to "off" to run stages without MLflow
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI lands on runs, not GenAI traces


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "on").lower() not in {"off", "0", "false"}


def registering() -> bool:
    """Does the evaluate stage register? Not when tracking is off, nor under Airflow (its own `register` task)."""
    return enabled() and os.environ.get("PIPELINE_REGISTER", "on").lower() not in {"off", "0", "false"}


def pipeline_run_id() -> str:
    if rid := os.environ.get("PIPELINE_RUN_ID"):
        return rid
    digest = hashlib.sha256(Path(params.PARAMS_FILE).read_bytes()).hexdigest()[:12]
    return f"params-{digest}"


def tracking_uri(t: params.Tracking) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", t.uri)


def _setup(t: params.Tracking):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(t))
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(t.experiment)
    if exp is None:  # a tracking server stores artifacts where it was told to (proxied); a local store, here
        served = tracking_uri(t).startswith(("http://", "https://"))
        artifacts = None if served else Path("mlartifacts").resolve().as_uri()
        exp_id = mlflow.create_experiment(t.experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    else:
        exp_id = exp.experiment_id
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:
                client.set_experiment_tag(exp_id, k, v)
    return mlflow, client, exp_id


def _parent(client, exp_id: str, rid: str) -> str:
    found = client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.role = 'parent'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {"pipeline_run_id": rid, "role": "parent", **_lineage_tags({**lineage.git_commit(), **lineage.describe()})}
    return client.create_run(exp_id, run_name=f"pipeline {rid}", tags=tags).info.run_id


def _close_orphans(client, exp_id: str, rid: str, stage: str) -> None:
    """A try of this stage that died without closing its run (its worker was killed, say) left it RUNNING: mark
    it KILLED before the new try opens its own, so each stage of a pipeline run ends with one finished run."""
    for r in client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.stage = '{stage}' "
                                          "and attributes.status = 'RUNNING'", max_results=100):
        client.set_terminated(r.info.run_id, status="KILLED")


def _lineage_tags(info: dict) -> dict:
    return {f"lineage.{k}": str(v) for k, v in info.items() if v is not None}


def _settle_parent(client, exp_id: str, rid: str, parent: str) -> str:
    """FAILED while the latest run of any stage (or registration) of this pipeline run failed, else FINISHED."""
    latest, token = {}, None
    while True:  # newest first, every page: the first run seen of each stage (or register) is its latest
        page = client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.role != 'parent'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        for r in page:
            latest.setdefault(r.data.tags.get("stage"), r.info.status)
        token = page.token
        if not token:
            break
    status = "FAILED" if "FAILED" in latest.values() else "FINISHED"
    client.set_terminated(parent, status=status)
    return status


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _log_split_dataset(mlflow, stage: str) -> None:
    """The split table as the run's dataset input (name `split`, digest = its content)."""
    if not paths.SPLIT_TABLE.exists():
        return
    import pandas as pd

    table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False)
    dataset = mlflow.data.from_pandas(table, source=str(paths.SPLIT_TABLE.resolve()), name="split", targets="label")
    mlflow.log_input(dataset, context=stage)


@contextlib.contextmanager
def stage_run(stage: str, section: dict | None = None):
    """Open a nested MLflow run for `stage` (yields the mlflow module, or None when tracking is off).

    An exception inside marks the run, and so the parent, FAILED; `fail()` does the same for a stage that ends
    with an error code instead."""
    if not enabled():
        yield None
        return
    mlflow, client, exp_id = _setup(params.load().tracking)
    rid = pipeline_run_id()
    parent = _parent(client, exp_id, rid)
    _close_orphans(client, exp_id, rid, stage)
    tags = {"stage": stage, "role": "stage", "pipeline_run_id": rid, "mlflow.parentRunId": parent,
            **_lineage_tags({**lineage.git_commit(), **lineage.describe(stage)})}
    if worker := os.environ.get("PIPELINE_WORKER"):  # the cluster worker that ran it (pipeline.workspace)
        tags["worker"] = worker
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags):
            if section:
                mlflow.log_params({k: str(v)[:500] for k, v in flatten(section).items()})
            _log_split_dataset(mlflow, stage)
            yield mlflow
    finally:
        _settle_parent(client, exp_id, rid, parent)


def fail(mlflow) -> None:
    """Mark the open stage run FAILED (for a stage that reports failure by its exit code)."""
    if mlflow is not None:
        mlflow.end_run("FAILED")


def keras_callback(mlflow):
    """Per-epoch metrics into the active run (a no-op callback when tracking is off)."""
    import keras

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if mlflow is not None and logs:
                mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)

    return EpochMetrics()


def log_history(mlflow, history) -> None:
    """A finished fit's per-epoch metrics (`train.fit`'s history) into the run, as `keras_callback` logs them live:
    for a model chosen among several after they were all trained."""
    if mlflow is None:
        return
    for row in history.to_dict("records"):
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]) - 1)


def log_files(mlflow, *files, artifact_path: str | None = None) -> None:
    if mlflow is None:
        return
    for f in files:
        if Path(f).exists():
            mlflow.log_artifact(str(f), artifact_path=artifact_path)


# ------------------------------------------------------------------------------------------------ registry

def gate_failures(scores: dict, gate: params.Gate) -> list[str]:
    """Why `scores` fail the gate (empty: it passes). A missing or NaN metric fails."""
    out = []
    for key, minimum in (("accuracy", gate.min_accuracy), ("roc_auc", gate.min_roc_auc)):
        value = scores.get(key)
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            out.append(f"{key} is {'missing' if value is None else value}")
        elif value < minimum:
            out.append(f"{key} {value:.4f} < {minimum}")
    return out


def current_test_split():
    """(images uint8 (N,S,S,3), true class names) of the current cache's test split."""
    import numpy as np

    x, y = io.load_pair(paths.CACHE_DIR / "test")
    classes = io.read_json(paths.CACHE_DIR / "meta.json")["classes"]
    return x, np.array(classes, dtype=object)[y]


def _accuracy(table, truth) -> float:
    """Share of rows of a prediction table (`label` column) that match the true class names."""
    import numpy as np

    return float(np.mean(table["label"].to_numpy() == truth))


def latest_version(client, name: str):
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register(if_better: bool = False) -> str:
    """Log the model evaluate selected as a pyfunc (`pipeline.serving`); register it if it passes the gate on its
    validation figures and, with `if_better`, beats the registered version on the current test split."""
    from pipeline import models, serving

    prm = params.load()
    report = io.read_json(paths.METRICS / "evaluate.json")
    name = report.get("selected")
    if not name or name not in report.get("models", {}):
        return f"not registered: {paths.METRICS / 'evaluate.json'} names no selected model (rerun `dvc repro evaluate`)"
    scores = report["models"][name]
    failures = gate_failures(scores["val"], prm.evaluate.gate)
    if failures:
        return (f"not registered: {name} fails evaluate.gate on validation: {'; '.join(failures)} "
                f"(the gate asks accuracy >= {prm.evaluate.gate.min_accuracy}, ROC AUC >= {prm.evaluate.gate.min_roc_auc})")
    mlflow, client, exp_id = _setup(prm.tracking)
    registered_as = prm.tracking.register_as
    comparison = {}
    if if_better and (current := latest_version(client, registered_as)) is not None:
        images, truth = current_test_split()
        new_acc = _accuracy(serving.local(models.path(name)).classify(images), truth)
        try:
            old_acc = _accuracy(mlflow.pyfunc.load_model(f"models:/{registered_as}/{current.version}").predict(images),
                                truth)
        except Exception as e:  # noqa: BLE001 - e.g. a version logged before models took images
            print(f"register: version {current.version} cannot score images ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); it counts as no comparison")
            old_acc = float("nan")
        comparison = {"compared_with_version": current.version, "current_test_accuracy_new": new_acc,
                      "current_test_accuracy_registered": old_acc, "current_test_n": len(truth)}
        if not math.isnan(old_acc) and new_acc <= old_acc:
            return (f"not registered: version {current.version} scores {old_acc:.4f} on the current test split "
                    f"({len(truth)} images), {name} {new_acc:.4f}")
    rid = pipeline_run_id()
    # the data and code the model came from (by content, from its JSON), and the commit that registers it
    info = {**lineage.git_commit(), **(models.read_meta(name).get("lineage") or {})}
    parent = _parent(client, exp_id, rid)
    tags = {"stage": "register", "role": "register", "pipeline_run_id": rid, "model": name,
            "selected_by": report.get("selected_by", ""), "mlflow.parentRunId": parent, **_lineage_tags(info)}
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register {name}", tags=tags):
            mlflow.log_metrics({f"{split}_{k}": float(v) for split in ("val", "test")
                                for k, v in scores[split].items() if isinstance(v, (int, float))})
            if comparison:
                mlflow.log_metrics({k: float(v) for k, v in comparison.items()
                                    if k != "compared_with_version" and not math.isnan(v)})
            logged = serving.log_model(mlflow, models.path(name), registered_model_name=registered_as)
    finally:
        _settle_parent(client, exp_id, rid, parent)
    version = str(logged.registered_model_version)
    for k, v in {**_lineage_tags(info), "model": name, "selected_by": report.get("selected_by", ""),
                 "val_accuracy": f"{scores['val']['accuracy']:.4f}", "test_accuracy": f"{scores['test']['accuracy']:.4f}"}.items():
        client.set_model_version_tag(registered_as, version, k, v)
    return (f"registered {name} as '{registered_as}' version {version} (val accuracy "
            f"{scores['val']['accuracy']:.4f}, test {scores['test']['accuracy']:.4f}): {logged.model_uri}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="register the selected model if it passes evaluate.gate")
    reg.add_argument("--if-better", action="store_true",
                     help="only if it beats the registered version on the current test split")
    args = ap.parse_args(argv)
    print(register(if_better=args.if_better))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
