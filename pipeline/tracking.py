"""MLflow runs: one parent run per pipeline run, one nested run per stage (`pipeline.registry` registers models).

With `pipeline.registry` and `pipeline.serving` (the model's pyfunc), the only modules that import mlflow. The
parent run is found by its
`pipeline_run_id` tag: Airflow sets PIPELINE_RUN_ID to its run id, `make run` to a timestamp; plain `dvc repro`
derives one from params.yaml, so the stages of one configuration share a parent.

- The parent carries every parameter of params.yaml (flattened keys: `head.dropout`), the git commit, the DVC
  experiment's name under `dvc exp run`, and the headline figures (`log_headline`: the delivered model, its CV and
  test figures, minutes per kind of stage): two pipeline runs line up in MLflow's compare view.
- History is never rewritten: a stage that reruns adds a nested run beside the old one.
- The parent's status follows its stages: FAILED while the latest run of any stage failed, FINISHED otherwise.
- Every run carries its lineage (`pipeline.lineage`: git commit, split table hash, dvc.lock hash of its inputs) as
  tags, and the split table as an MLflow dataset input (the runs table's Dataset column).
- The experiment is marked as model training, so the UI opens on its runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
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


def setup(t: params.Tracking):
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


def parent_run(client, exp_id: str, rid: str) -> str:
    """The pipeline run's parent run (created by its first stage): every parameter of params.yaml under its flattened
    key (`head.dropout`), the git commit and, under `dvc exp run`, the DVC experiment's name, so that MLflow's
    compare view lines up two pipeline runs; the evaluate stage adds the headline figures (`log_headline`)."""
    found = client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.role = 'parent'", max_results=1)
    experiment = {"dvc_experiment": os.environ["DVC_EXP_NAME"]} if os.environ.get("DVC_EXP_NAME") else {}
    if found:
        for k, v in experiment.items():
            client.set_tag(found[0].info.run_id, k, v)
        return found[0].info.run_id
    tags = {"pipeline_run_id": rid, "role": "parent", **experiment,
            **lineage_tags({**lineage.git_commit(), **lineage.describe()})}
    run_id = client.create_run(exp_id, run_name=f"pipeline {rid}", tags=tags).info.run_id
    from mlflow.entities import Param

    flat = flatten(params.load().model_dump(mode="json", by_alias=True))
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(flat.items())])
    return run_id


def log_headline(figures: dict[str, float], tags: dict[str, str]) -> None:
    """The pipeline run's headline figures on its parent run (the evaluate stage calls it): `figures`, plus the
    minutes each kind of stage has run so far (`minutes.cv` sums every cv@design-fold run) and in all."""
    if not enabled():
        return
    _, client, exp_id = setup(params.load().tracking)
    rid = pipeline_run_id()
    parent = parent_run(client, exp_id, rid)
    minutes = {}
    for r in client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.role = 'stage'",
                                max_results=5000):
        if r.info.end_time:
            kind = r.data.tags.get("stage", "?").split("@")[0]
            minutes[kind] = minutes.get(kind, 0.0) + (r.info.end_time - r.info.start_time) / 60000
    metrics = {**figures, **{f"minutes.{k}": round(v, 3) for k, v in minutes.items()},
               "minutes.all_stages": round(sum(minutes.values()), 3)}
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])
    for k, v in tags.items():
        client.set_tag(parent, k, v)


def _close_orphans(client, exp_id: str, rid: str, stage: str) -> None:
    """A try of this stage that died without closing its run (its worker was killed, say) left it RUNNING: mark
    it KILLED before the new try opens its own, so each stage of a pipeline run ends with one finished run."""
    for r in client.search_runs([exp_id], f"tags.pipeline_run_id = '{rid}' and tags.stage = '{stage}' "
                                          "and attributes.status = 'RUNNING'", max_results=100):
        client.set_terminated(r.info.run_id, status="KILLED")


def lineage_tags(info: dict) -> dict:
    return {f"lineage.{k}": str(v) for k, v in info.items() if v is not None}


def settle_parent(client, exp_id: str, rid: str, parent: str) -> str:
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
    mlflow, client, exp_id = setup(params.load().tracking)
    rid = pipeline_run_id()
    parent = parent_run(client, exp_id, rid)
    _close_orphans(client, exp_id, rid, stage)
    tags = {"stage": stage, "role": "stage", "pipeline_run_id": rid, "mlflow.parentRunId": parent,
            **lineage_tags({**lineage.git_commit(), **lineage.describe(stage)})}
    if worker := os.environ.get("PIPELINE_WORKER"):  # the cluster worker that ran it (pipeline.workspace)
        tags["worker"] = worker
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags):
            if section:
                mlflow.log_params({k: str(v)[:500] for k, v in flatten(section).items()})
            _log_split_dataset(mlflow, stage)
            yield mlflow
    finally:
        settle_parent(client, exp_id, rid, parent)


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
