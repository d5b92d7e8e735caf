"""`make cluster-check`: the whole pipeline through a temporary cluster (`pipeline.cluster`), with a worker killed.

1. A snapshot of this project (tracked and new files, as committed or not) with tiny params (24 ELPV cells,
   `small_cnn`, 48 px, 1-2 epochs, 2 bagging members, 2 folds; `schedule`: 1 retry after 2 s, 2 GPU slots) becomes a
   git repository of its own: the one the workers clone.
2. A cluster comes up in a temporary state folder, with a 20-second task heartbeat timeout; meanwhile a plain
   `dvc repro` of the same commit runs on this machine: the reference.
3. `transfer_pipeline` is triggered through the Airflow API. Once `evaluate` (a late stage) has opened its MLflow
   run, its worker is SIGKILLed with every process under it, as a machine would die.
4. From the Airflow API: both workers ran tasks, mapped tasks (bagging members, folds) overlapped in time, the
   killed task was retried once on the other worker, the run succeeded. From the MLflow API: each stage of the run
   has exactly one finished run (the killed try's is marked KILLED). Then a fresh clone pulls the run's results
   (`pipeline.cluster.pull`): its `metrics/evaluate.json` equals the reference's, `dvc status` has nothing to
   rerun, and every object on the DVC remote matches its hash (nothing half-written got there).
5. Every listening socket of the cluster was on 127.0.0.1; `down` leaves no process and no open port.

The report (`metrics/cluster.json`) holds each of those findings and `ok`, their conjunction.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
from datetime import datetime
from pathlib import Path

import yaml
from tqdm import tqdm

from pipeline import cluster, io
from pipeline.params import merge
from pipeline.cluster import DAG_ID, airflow_url, http, mlflow_uri

CHECK_PARAMS = {
    "data": {"source": "elpv", "limit_per_class": 12},
    "split": {"ratios": [0.5, 0.25, 0.25], "folds": 2, "stratify": []},
    "validate": {"min_side": 8},
    "cache": {"image_size": 48, "workers": 1},
    "backbone": {"name": "small_cnn", "weights": "none"},
    "extract": {"batch_size": 16},
    "head": {"designs": ["pooled", "map"], "conv_filters": 8, "hidden": 16, "epochs": 2, "patience": 1,
             "batch_size": 8, "learning_rate": 0.01},
    "bagging": {"members": [1], "backbones": []},
    "cv": {"folds": [0, 1]},
    "evaluate": {"gate": {"min_adjusted_balanced_accuracy": -1.0, "min_roc_auc": 0.0}},
    "schedule": {"cron": None, "retries": 1, "retry_delay_seconds": 2, "gpu_slots": 2, "max_active_runs": 2},
}
# outputs of the project's own last run: not the snapshot's
GENERATED = ("dvc.lock", "metrics/", "plots/", "data/split_summary.json")
KILL_TASK = "evaluate"
MAPPED = ("cv", "bagging")
HEARTBEAT_TIMEOUT = 20
GIT_ID = ["-c", "user.name=cluster-check", "-c", "user.email=cluster-check@localhost"]


def copy_project(src: Path, dest: Path, params_over: dict) -> Path:
    """`src`'s files (tracked, and new ones git does not ignore; not the results of its own run) in `dest`, with
    params.yaml overridden by `params_over` (the tests' tiny projects are made this way too)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=src,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for f in (f for f in files if not f.startswith(GENERATED) and (src / f).is_file()):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dest / f)
    params = merge(yaml.safe_load((src / "params.yaml").read_text()), params_over)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def snapshot(src: Path, dest: Path, params_over: dict) -> str:
    """`copy_project`, committed in a new git repository at `dest`; returns the commit."""
    copy_project(src, dest, params_over)
    for cmd in (["init", "-q"], ["add", "-A"], [*GIT_ID, "commit", "-q", "-m", "cluster check"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True,
                          check=True).stdout.strip()


def rounded(value, digits: int = 4):
    """A metrics JSON to its printed precision; NaN (a figure a slice cannot have, such as ROC AUC over one class) as
    None, so that two equal reports compare equal."""
    if isinstance(value, float):
        return None if value != value else round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def when(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else None


def task_key(ti: dict) -> str:
    return ti["task_id"] + ("" if ti.get("map_index", -1) in (-1, None) else f"@{ti['map_index']}")


def task_instances(state: dict, run_id: str) -> list[dict]:
    url = f"{airflow_url(state)}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=200"
    return http("GET", url, token=cluster.token(state))["task_instances"]


def tries(state: dict, run_id: str, ti: dict) -> list[dict]:
    mapped = "" if ti.get("map_index", -1) in (-1, None) else f"/{ti['map_index']}"
    url = f"{airflow_url(state)}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{ti['task_id']}{mapped}/tries"
    return http("GET", url, token=cluster.token(state))["task_instances"]


def max_overlap(tis: list[dict]) -> float:
    """The longest time two mapped task instances (bagging members, folds) ran at the same time, in seconds."""
    spans = [(when(t["start_date"]), when(t["end_date"])) for t in tis
             if t["task_id"] in MAPPED and t["start_date"] and t["end_date"]]
    return max([min(a[1], b[1]) - max(a[0], b[0]) for a, b in itertools.combinations(spans, 2)] + [0.0])


def mlflow_stage_runs(state: dict, run_id: str, experiment: str) -> dict[str, list[str]]:
    """{stage: [status of each of its MLflow runs]} for one pipeline run, from the MLflow REST API."""
    base = f"{mlflow_uri(state)}/api/2.0/mlflow"
    try:
        exp = http("GET", f"{base}/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    except urllib.error.HTTPError:  # no stage ever reached MLflow
        return {}
    out: dict[str, list[str]] = {}
    token = None
    while True:
        page = http("POST", f"{base}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
                                                    "filter": f"tags.pipeline_run_id = '{run_id}'",
                                                    **({"page_token": token} if token else {})})
        for r in page.get("runs", []):
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            if tags.get("role") in ("stage", "register"):
                out.setdefault(tags.get("stage") or tags["role"], []).append(r["info"]["status"])
        token = page.get("next_page_token")
        if not token:
            return out


def kill_worker(state: dict, worker: str) -> list[int]:
    """SIGKILL a worker and every process under it (its task's supervisor and the task), as if its machine died."""
    procs = cluster.tree(state["pids"][f"worker-{worker}"])
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()
    cluster.reap()
    return [p.pid for p in procs]


def remote_intact(remote: Path) -> bool:
    """Every object on a folder DVC remote hashes to its name (content-addressed: a torn write would not)."""
    objects = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file()]
    return bool(objects) and all(
        hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name.removesuffix(".dir") for p in objects)


def run_pipeline(state: dict, report: dict, experiment: str, timeout: float = 1500) -> str:
    """Trigger the DAG; once KILL_TASK's stage has opened its MLflow run, kill the worker running it; wait for the
    end. Returns the run id."""
    base, tok = f"{airflow_url(state)}/api/v2/dags/{DAG_ID}", cluster.token(state)
    http("PATCH", base, {"is_paused": False}, token=tok)
    run_id = http("POST", f"{base}/dagRuns", {"logical_date": None}, token=tok)["dag_run_id"]
    deadline, bar, dag_state = time.time() + timeout, None, "queued"
    with tqdm(desc="DAG run", unit="task") as bar:
        while time.time() < deadline:
            dag_state = http("GET", f"{base}/dagRuns/{run_id}", token=cluster.token(state))["state"]
            tis = task_instances(state, run_id)
            bar.total = len(tis)
            bar.n = sum(t["state"] in ("success", "skipped") for t in tis)
            bar.refresh()
            if dag_state in ("success", "failed"):
                break
            target = next((t for t in tis if t["task_id"] == KILL_TASK and t["state"] == "running"), None)
            if "killed" not in report and target and target.get("hostname") in state["workers"] \
                    and "RUNNING" in mlflow_stage_runs(state, run_id, experiment).get(KILL_TASK, []):
                report["listening"] = cluster.listening(state)  # every component is up and busy now
                worker = target["hostname"]
                kill_worker(state, worker)
                report["killed"] = {"worker": worker, "task": KILL_TASK, "try": target["try_number"],
                                    "after_task_start_s": round(time.time() - when(target["start_date"]), 1),
                                    "its_mlflow_run": "RUNNING"}
                tqdm.write(f"SIGKILLed worker {worker} while it ran {KILL_TASK}")
            time.sleep(1)
    report["dag_run"] = {"run_id": run_id, "state": dag_state}
    return run_id


def check(out: Path | None = Path("metrics/cluster.json"), home: Path | None = None, keep: bool = False) -> dict:
    """Run the scenario; returns the report (also written to `out`). With `keep`, the cluster is left running
    (the caller stops it with `cluster.down(home)`)."""
    project = Path.cwd().resolve()
    home = (home or Path(tempfile.mkdtemp(prefix="cluster-check-"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)  # PostgreSQL's own user keeps its data inside (pipeline.cluster.pg_data_dir)
    t0 = time.time()
    repo = home / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    commit = snapshot(project, repo, CHECK_PARAMS)
    report: dict = {"commit": commit, "params": CHECK_PARAMS, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT}

    # the reference: plain `dvc repro` of the same commit on this machine, while the cluster starts
    reference = home / "single-machine"
    subprocess.run(["git", "clone", "-q", str(repo), str(reference)], check=True)
    ref_log = open(home / "single-machine.log", "w")
    ref_proc = subprocess.Popen(["dvc", "repro"], cwd=reference, stdout=ref_log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PIPELINE_TRACKING": "off"})
    env_before = {k: os.environ.get(k) for k in ("CLUSTER_AIRFLOW_PORT", "CLUSTER_MLFLOW_PORT", "PIPELINE_DVC_REMOTE")}
    os.environ.update(CLUSTER_AIRFLOW_PORT=str(cluster.free_port()), CLUSTER_MLFLOW_PORT=str(cluster.free_port()))
    os.environ.pop("PIPELINE_DVC_REMOTE", None)  # the check's remote is its own folder
    try:
        t_up = time.time()
        state = cluster.up(home / "cluster", repo, workers=2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
        report["seconds"] = {"up": round(time.time() - t_up, 1)}
    finally:
        for k, v in env_before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        t_run = time.time()
        experiment = yaml.safe_load((repo / "params.yaml").read_text())["tracking"]["experiment"]
        run_id = run_pipeline(state, report, experiment)
        report["seconds"]["dag_run"] = round(time.time() - t_run, 1)
        findings(state, run_id, experiment, home, report)
        if ref_proc.wait(timeout=1800) != 0:
            raise SystemExit(f"the single-machine `dvc repro` failed; see {home / 'single-machine.log'}")
        if report["dag_run"]["state"] == "success":
            ours = io.read_json(home / "user" / "metrics" / "evaluate.json")
            theirs = io.read_json(reference / "metrics" / "evaluate.json")
            report["metrics_equal"] = rounded(ours) == rounded(theirs)
            report["evaluate"] = {"cluster": rounded(ours), "single_machine": rounded(theirs)}
    finally:
        ref_proc.kill()
        ref_log.close()
        if not keep:
            stopped = cluster.down(home / "cluster")
            report["down_clean"] = not stopped["left"] and not stopped["open_ports"]
    report["seconds"]["total"] = round(time.time() - t0, 1)
    retried = report.get("killed_task_tries", [])
    report["ok"] = bool(
        report["dag_run"]["state"] == "success" and set(report["workers_used"]) == set(state["workers"])
        and report["overlap_seconds"] > 0 and "killed" in report and len(retried) == 2
        and retried[0]["worker"] == report["killed"]["worker"] != retried[1]["worker"]
        and retried[1]["state"] == "success" and report["mlflow_one_finished_run_per_stage"]
        and "KILLED" in report["mlflow_runs"].get(KILL_TASK, [])
        and report.get("metrics_equal") and report.get("pull_then_repro_noop") and report.get("remote_intact")
        and report["loopback_only"] and report.get("down_clean", True))
    if out is not None:
        io.write_json(out, report)
        print(f"wrote {out}: ok={report['ok']}")
    if not keep and report["ok"]:
        cluster.purge(home / "cluster")
        shutil.rmtree(home, ignore_errors=True)
    elif not report["ok"]:
        print(f"kept for a look: {home} (logs in cluster/logs and cluster/airflow/logs)")
    return report


def findings(state: dict, run_id: str, experiment: str, home: Path, report: dict) -> None:
    """What the Airflow and MLflow APIs say of the run; then the user's side: a fresh clone pulls the results."""
    tis = task_instances(state, run_id)
    report["task_workers"] = {task_key(t): t.get("hostname") for t in tis}
    report["workers_used"] = sorted({h for h in report["task_workers"].values() if h})
    report["retries"] = sum(max(0, (t.get("try_number") or 1) - 1) for t in tis)
    killed_ti = next((t for t in tis if t["task_id"] == KILL_TASK), None)
    report["killed_task_tries"] = [{"try": t["try_number"], "worker": t.get("hostname"), "state": t["state"]}
                                   for t in tries(state, run_id, killed_ti)] if killed_ti else []
    report["overlap_seconds"] = round(max_overlap(tis), 1)
    runs = mlflow_stage_runs(state, run_id, experiment)
    report["mlflow_runs"] = runs
    report["mlflow_one_finished_run_per_stage"] = bool(runs) and all(
        s.count("FINISHED") == 1 and set(s) <= {"FINISHED", "KILLED"} for s in runs.values())
    report["listening"] = report.get("listening") or cluster.listening(state)
    report["loopback_only"] = all(ip == cluster.HOST for ip, _ in report["listening"])
    if report["dag_run"]["state"] != "success":
        return
    user = home / "user"  # a fresh clone pulls the run's results; `dvc repro` then has nothing to do
    subprocess.run(["git", "clone", "-q", str(home / "repo"), str(user)], check=True)
    cluster.pull(state["dvc_remote"], user)
    dvc_status = json.loads(subprocess.run(["dvc", "status", "--json"], cwd=user, capture_output=True,
                                           text=True, check=True).stdout or "{}")
    report["pull_then_dvc_status"] = dvc_status
    report["pull_then_repro_noop"] = set(dvc_status) <= {"sources"}  # `sources` lists the data: always runs
    report["remote_intact"] = remote_intact(Path(state["dvc_remote"]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.cluster_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("metrics/cluster.json"))
    report = check(out=ap.parse_args(argv).out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
