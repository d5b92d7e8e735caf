"""The cluster (`make cluster`, `pipeline.cluster`): PostgreSQL, Redis, an MLflow server, Airflow with the
CeleryExecutor and two Celery workers that share no disk, all on 127.0.0.1, in a temporary state folder.

`pipeline.cluster_check` (what `make cluster-check` runs) brings it up, triggers `transfer_pipeline` through the
Airflow API on tiny data (`small_cnn`, 24 ELPV cells) and SIGKILLs the worker running `evaluate` once that stage
has opened its MLflow run. The
cluster is kept up here so the test reads the outcome itself from the Airflow and MLflow APIs, then tears it down.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from conftest import chdir
from pipeline import cluster, cluster_check

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("cluster")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{BIN}{os.pathsep}{old_path}"  # dvc, git hooks, airflow: the project's virtualenv
    try:
        with chdir(ROOT):
            report = cluster_check.check(out=home / "cluster.json", home=home / "check", keep=True)
        state = cluster.load_state(home / "check" / "cluster")
        yield report, state
    finally:
        os.environ["PATH"] = old_path
        if (home / "check" / "cluster" / cluster.STATE_FILE).exists():
            cluster.down(home / "check" / "cluster")
            cluster.purge(home / "check" / "cluster")


def test_the_run_spreads_over_both_workers_in_parallel(run):
    report, state = run
    tis = cluster_check.task_instances(state, report["dag_run"]["run_id"])
    assert report["dag_run"]["state"] == "success", report
    assert {t["state"] for t in tis} == {"success"}, [(cluster_check.task_key(t), t["state"]) for t in tis]
    # each task instance records the worker that ran it (Airflow's hostname_callable): both did work
    assert {t["hostname"] for t in tis} == {"w1", "w2"}
    # designs x folds and bagging members x folds are mapped tasks; two of them ran at the same time
    mapped = [t for t in tis if t["task_id"] in cluster_check.MAPPED]
    assert len(mapped) == 4 + 2 and {t["map_index"] for t in mapped} == {0, 1, 2, 3}
    assert cluster_check.max_overlap(mapped) > 0


def test_a_killed_worker_costs_one_retry_on_the_other(run):
    report, state = run
    killed = report["killed"]["worker"]
    evaluate = next(t for t in cluster_check.task_instances(state, report["dag_run"]["run_id"])
                    if t["task_id"] == "evaluate")
    tries = cluster_check.tries(state, report["dag_run"]["run_id"], evaluate)
    assert [t["try_number"] for t in tries] == [1, 2]
    assert tries[0]["hostname"] == killed and tries[0]["state"] == "failed"
    assert tries[1]["hostname"] not in (None, killed) and tries[1]["state"] == "success"
    # nothing else was retried
    others = [t for t in cluster_check.task_instances(state, report["dag_run"]["run_id"]) if t["task_id"] != "evaluate"]
    assert {t["try_number"] for t in others} == {1}
    assert not cluster.alive(state["pids"][f"worker-{killed}"])


def test_mlflow_holds_one_finished_run_per_stage(run):
    report, state = run
    runs = cluster_check.mlflow_stage_runs(state, report["dag_run"]["run_id"], "transfer-learning")
    stages = {"split", "validate", "extract", "cv@pooled-0", "cv@map-1", "choose", "head", "bagging@1-0",
              "bagging@1-1", "ensemble", "evaluate", "export", "register"}
    assert stages <= set(runs), sorted(runs)
    for stage, statuses in runs.items():
        assert statuses.count("FINISHED") == 1 and set(statuses) <= {"FINISHED", "KILLED"}, (stage, statuses)
    # the killed try had opened its run; the retry marked it KILLED and opened the one that finished
    assert sorted(runs["evaluate"]) == ["FINISHED", "KILLED"]


def test_same_metrics_as_one_machine_and_nothing_left_to_rerun(run):
    report, _ = run
    assert report["metrics_equal"], report["evaluate"]
    assert report["evaluate"]["cluster"]["selected"]
    assert report["pull_then_repro_noop"], report["pull_then_dvc_status"]
    assert report["remote_intact"]
    assert report["ok"] is True  # the report `make cluster-check` writes agrees


def test_loopback_only_and_down_leaves_nothing(run):
    report, state = run
    assert report["listening"] and {ip for ip, _ in report["listening"]} == {"127.0.0.1"}, report["listening"]
    live = cluster.listening(state)
    assert ("127.0.0.1", state["ports"]["airflow"]) in live and {ip for ip, _ in live} == {"127.0.0.1"}, live
    stopped = cluster.down(Path(state["home"]))
    assert stopped == {"left": [], "open_ports": []}
    assert not any(cluster.alive(pid) for pid in state["pids"].values())
    for port in state["ports"].values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
