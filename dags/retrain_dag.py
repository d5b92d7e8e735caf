"""`retrain_on_new_data`: retrain when the data changes, and register the model only if it is better.

1. `new_data` (a sensor, every 30 minutes in reschedule mode, so it holds no worker slot while waiting) hashes
   the content of the data source: params.yaml `data.path` (a folder, or a CSV manifest plus the files it
   lists) or, for `data.source: elpv`, the data folder of the installed `elpv_dataset` package. It succeeds when
   the hash differs from the one recorded at the last successful run (`data/source_hash.txt`), or when the run
   was triggered with the `force` param. With no change all day it ends as skipped, not failed.
2. The pipeline, the same tasks as `transfer_pipeline`, with `split` run as `dvc repro --single-item --force
   split`: split does not declare the external source folder as a DVC dependency, so only a forced split sees
   new images. The other stages rerun only where the new split changed their inputs.
3. `register`: `python -m pipeline.tracking register --if-better` registers this run's model only if it beats
   the currently registered one on the same test split (it exits 0 either way).
4. `record_hash`: writes the hash to `data/source_hash.txt` (atomically), so the same data is not retrained on.

GPU pool, retries and the MLflow run id work as in `transfer_pipeline` (see its docs).
"""
from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import DAG, Param, PokeReturnValue, get_current_context, task

if (_here := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.append(_here)  # Airflow's DAG bundles add it; a bare DagBag (tests) does not
from _common import (  # noqa: E402
    START_DATE, SOURCE_HASH_FILE, bash_kwargs, content_hash, data_source, default_args, in_project, load_params,
    record_hash, recorded_hash, stage_tasks,
)

params = load_params()

with DAG(
    dag_id="retrain_on_new_data",
    description="Retrain on new data; register the model only if it beats the registered one",
    schedule="@daily",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,  # runs share one working tree
    default_args=default_args(params),
    params={"force": Param(False, type="boolean", description="retrain even if the data did not change")},
    doc_md=__doc__,
    tags=["transfer-learning", "dvc", "mlflow"],
):

    @task.sensor(task_id="new_data", poke_interval=30 * 60, timeout=23 * 60 * 60, mode="reschedule",
                 soft_fail=True, retries=0)
    def new_data() -> PokeReturnValue:
        """Hash the data source (content, not timestamps) and compare it with the last successful run's."""
        current = content_hash(data_source(load_params()))
        last = recorded_hash()
        force = bool(get_current_context()["params"].get("force"))
        print(f"data hash {current}; recorded in {SOURCE_HASH_FILE}: {last or 'none'}; force: {force}")
        return PokeReturnValue(is_done=force or current != last, xcom_value=current)

    @task.bash(task_id="register", **bash_kwargs())
    def register() -> str:
        return in_project("python -m pipeline.tracking register --if-better", [])

    @task(task_id="record_hash")
    def record(value: str) -> str:
        """Remember the data this run trained on; returns the state file's path."""
        return str(record_hash(value))

    sensed = new_data()
    first, last = stage_tasks(params=params, force=frozenset({"split"}))
    registered = register()
    sensed >> first
    last >> registered >> record(sensed)
