"""`transfer_pipeline`: the DVC pipeline on a schedule, one Airflow task per DVC stage.

Each task runs `dvc repro --single-item <stage>` (foreach instances: `bagging@<i>`, `kfold@<k>`) in the
project directory with the project's virtualenv first on PATH. DVC owns caching (an unchanged stage is skipped
in a second); Airflow owns ordering, retries and the schedule. Tasks hand each other nothing but the files
dvc.yaml declares; each task's XCom is the list of paths its stage wrote.

- Order: the dvc.yaml graph: split -> validate -> cache -> extract -> head -> finetune, bagging members and
  k-fold folds (mapped tasks, one per id in params.yaml `bagging.members` / `kfold.folds`) -> evaluate.
- Schedule: params.yaml `schedule.cron` (default weekly, Monday 03:00 UTC), no catch-up, one run at a time.
- GPU: extract, finetune and bagging take a slot of the Airflow pool `gpu`, created by `bin/ui-airflow` with
  `airflow pools set gpu <schedule.gpu_slots> "..."`, so at most that many of them share the accelerator.
  Each stage logs whether it runs on GPU or CPU.
- Retries: params.yaml `schedule.retries`, exponential backoff from 1 minute (capped at 30).
- Working tree: every task holds the tree's lock (`_common.locked`), so runs of this DAG and of
  `retrain_on_new_data` never work in it at the same time.
- Registry: the last task, `register`, registers the model evaluate selected on validation if it passes
  `evaluate.gate` and beats the registered version on the current test split.
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
from _common import START_DATE, default_args, load_params, register_task, schedule, stage_tasks  # noqa: E402

params = load_params()

with DAG(
    dag_id="transfer_pipeline",
    description="DVC stages of the transfer-learning pipeline, one task each",
    schedule=schedule(params)["cron"],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(params),
    doc_md=__doc__,
    tags=["transfer-learning", "dvc"],
):
    _, last = stage_tasks(params=params)
    last >> register_task()
