"""`retrain_on_new_data`: retrain when the data changes, and register the model only if it is better.

1. `new_data` (every 30 minutes) hashes the content of the data source: params.yaml `data.path` (a folder, or a CSV
   manifest plus the files it lists) or, for `data.source: elpv`, the data folder of the installed `elpv_dataset`
   package. It goes on when the hash differs from the one recorded at the last successful run
   (`data/source_hash.txt`), or when the run was triggered with the `force` param; otherwise it short-circuits:
   every task after it is skipped, whatever its trigger rule.
2. The pipeline, the same tasks as `transfer_pipeline`. The `sources` stage lists the data folder on every run, so
   split and what follows rerun exactly where the new data changed their inputs.
3. `register`: `python -m pipeline.registry register --if-better` loads the `champion` version from the MLflow
   registry and scores it and this run's selected model on the same images (the current test split); this run's
   model is registered, and becomes the champion, only if its balanced accuracy is better or the champion was
   trained on another split (the task succeeds either way).
4. `record_hash`: writes the hash to `data/source_hash.txt` (atomically), so the same data is not retrained on.

Stage tasks and `register` run through `pipeline.workspace`, as in `transfer_pipeline`: under the working tree's
lock on one machine, in per-run clones on a cluster. GPU pool, retries and the MLflow run id work as in
`transfer_pipeline` (see its docs).
"""
from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import DAG, Param, get_current_context, task

if (_here := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.append(_here)  # Airflow's DAG bundles add it; a bare DagBag (tests) does not
from _common import (  # noqa: E402
    START_DATE, SOURCE_HASH_FILE, commit_task, content_hash, data_source, default_args, load_params, record_hash, recorded_hash,
    register_task, schedule, stage_tasks,
)

params = load_params()

with DAG(
    dag_id="retrain_on_new_data",
    description="Retrain on new data; register the model only if it beats the registered one",
    schedule="*/30 * * * *",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=schedule(params)["max_active_runs"],
    default_args=default_args(params),
    params={"force": Param(False, type="boolean", description="retrain even if the data did not change")},
    doc_md=__doc__,
    tags=["transfer-learning", "dvc", "mlflow"],
):

    @task.short_circuit(task_id="new_data", retries=0)
    def new_data():
        """The data source's content hash if it changed since the last successful run (or `force`), else False."""
        prm = load_params()
        current = content_hash(data_source(prm), (prm.get("data") or {}).get("root"))
        last = recorded_hash()
        force = bool(get_current_context()["params"].get("force"))
        print(f"data hash {current}; recorded in {SOURCE_HASH_FILE}: {last or 'none'}; force: {force}")
        return current if force or current != last else False

    @task(task_id="record_hash")
    def record(value: str) -> str:
        """Remember the data this run trained on; returns the state file's path."""
        return str(record_hash(value))

    sensed = new_data()
    commit = commit_task()
    first, last = stage_tasks(params=params)
    registered = register_task()
    sensed >> commit >> first
    last >> registered >> record(sensed)
