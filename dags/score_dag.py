"""`score_new_images`: the registry's champion model over the images that arrived since the last run.

1. `score`: `python -m pipeline.scoring --folder <folder>` in the project (see `pipeline.scoring`). The folder is
   the trigger's `folder` param, by default params.yaml `score.inbox`. It scores the images not scored before with
   the version the MLflow alias `champion` points at (`register` and the retrain DAG move it), appends them to
   `data/scored/predictions.csv` (file, label, probabilities, model version, time), lists images that cannot be
   decoded in `data/scored/skipped.csv` (never fatal), and logs the batch to MLflow (experiment
   `<tracking.experiment>-scoring`): counts per predicted class, the share of low-confidence predictions, and the
   drift figure against the training images' features. Its XCom is that summary.
2. `check_drift`: fails when the drift figure is above `score.drift_threshold` (for a batch of at least
   `score.drift_min_images`), so the run shows red in the UI (and any failure alert fires) while the predictions
   stay written: a person looks before they are trusted.

Schedule: params.yaml `score.cron` (default daily, 06:00 UTC), no catch-up, one run at a time. Trigger it from
the UI with `{"folder": "/path/to/images"}` to score another folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

from airflow.sdk import DAG, Param, task

if (_here := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.append(_here)  # Airflow's DAG bundles add it; a bare DagBag (tests) does not
from _common import START_DATE, PROJECT, bash_kwargs, load_params, score_settings, with_venv  # noqa: E402

params = load_params()
settings = score_settings(params)

with DAG(
    dag_id="score_new_images",
    description="Score new images with the registry's champion model; record counts, confidence and drift",
    schedule=settings["cron"],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    params={"folder": Param(settings["inbox"], type="string", description="the folder of images to score")},
    doc_md=__doc__,
    tags=["transfer-learning", "mlflow", "scoring"],
):

    @task.bash(task_id="score", **{**bash_kwargs(), "env": {"SCORE_FOLDER": "{{ params.folder }}",
                                                            "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
               retries=1)
    def score() -> str:
        """Score the folder's new images; the XCom is the batch's summary (the last line printed, JSON)."""
        return with_venv('python -m pipeline.scoring --folder "$SCORE_FOLDER"', PROJECT)

    @task(task_id="check_drift", retries=0)
    def check_drift(summary: dict) -> dict:
        """Fail when the batch's drift figure is above its threshold (the predictions are already written)."""
        from airflow.sdk.exceptions import AirflowFailException

        print(f"{summary['scored']} scored by version {summary['model_version']}, {summary['skipped']} skipped "
              f"{summary['skipped_files']}; counts {summary['counts']}; low-confidence "
              f"{summary['low_confidence_share']:.1%}; drift {summary['drift']} (threshold {summary['drift_threshold']}, "
              f"{'judged' if summary['drift_judged'] else 'not judged: a small batch'})")
        if summary["drift_above_threshold"]:
            raise AirflowFailException(
                f"drift {summary['drift']:.3f} is above score.drift_threshold {summary['drift_threshold']}: these "
                f"{summary['scored']} images look unlike the training images; check them (MLflow: experiment "
                f"'*-scoring') before trusting their predictions, and retrain with them labelled")
        return summary

    check_drift(score())
