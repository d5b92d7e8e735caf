"""`transfer_pipeline`: the DVC pipeline on a schedule, one Airflow task per DVC stage.

Each task runs `dvc repro --single-item <stage>` (matrix and foreach instances: `cv@map_h-0`, `bagging@1-0`) in the
project directory with the project's virtualenv first on PATH. DVC owns caching (an unchanged stage is skipped
in a second); Airflow owns ordering, retries and the schedule. Tasks hand each other nothing but the files
dvc.yaml declares; each task's XCom is the list of paths its stage wrote.

- Order: the dvc.yaml graph: split -> validate -> cache -> extract -> cv (every head design x fold) -> choose ->
  head (the refit) and bagging (every member x fold) -> ensemble -> evaluate -> export, with (opt-in, `finetune.start_from:
  [head]`) finetune after head. cv, bagging and finetune are mapped tasks, one per instance DVC has (`head.designs`
  x `cv.folds`, `bagging.members` x `cv.folds`, `finetune.start_from`; a stage whose list is empty has no task, as
  DVC has no stage).
- Schedule: params.yaml `schedule.cron` (default weekly, Monday 03:00 UTC), no catch-up, `schedule.max_active_runs`
  runs at once (1).
- GPU: extract, cv, finetune and bagging take a slot of the Airflow pool `gpu`, created by `bin/ui-airflow` with
  `airflow pools set gpu <schedule.gpu_slots> "..."`, so at most that many of them share the accelerator.
  Each stage logs whether it runs on GPU or CPU.
- Retries: params.yaml `schedule.retries`, exponential backoff from `schedule.retry_delay_seconds` (capped at 30
  minutes).
- Where: `python -m pipeline.workspace` (see its docs). On one machine every task holds the working tree's lock,
  so runs of this DAG and of `retrain_on_new_data` never work in it at the same time. On a cluster (`make cluster`)
  each Celery worker builds the run's commit (the first task, `commit`) in a clone of its own, and the stages'
  outputs travel through the DVC remote; runs may then overlap (`schedule.max_active_runs`).
- Registry: the last task, `register`, registers the model cross-validation chose if it passes
  `evaluate.gate` and beats the `champion` (trained on the same split) on the current test split, and moves the
  alias `champion` to it.
- MLflow: every task gets `PIPELINE_RUN_ID` = the Airflow run id, so the run's stages become nested runs of one
  parent run, and a retried task adds a nested run (the failed try stays, marked FAILED). `MLFLOW_TRACKING_URI`, when set in the Airflow
  worker's environment, reaches the stages too; otherwise they use params.yaml `tracking.uri`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import DAG

if (_here := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.append(_here)  # Airflow's DAG bundles add it; a bare DagBag (tests) does not
from _common import (  # noqa: E402
    START_DATE, commit_task, default_args, load_params, register_task, schedule, stage_tasks,
)

params = load_params()

with DAG(
    dag_id="transfer_pipeline",
    description="DVC stages of the transfer-learning pipeline, one task each",
    schedule=schedule(params)["cron"],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=schedule(params)["max_active_runs"],
    default_args=default_args(params),
    doc_md=__doc__,
    tags=["transfer-learning", "dvc"],
):
    commit = commit_task()
    first, last = stage_tasks(params=params)
    commit >> first
    last >> register_task()
