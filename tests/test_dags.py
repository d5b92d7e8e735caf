"""Airflow DAGs: structure (DagBag), thin parse (no heavy imports), the data-change sensor's hash, and both DAGs
end to end with `airflow dags test` on a tiny copy of the project (real DVC, TensorFlow, MLflow).

Airflow runs in subprocesses with a temporary AIRFLOW_HOME, so it never configures logging or reads a home
directory inside the test process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_PARAMS, copy_project, make_folder, make_image, merge

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
BIN = Path(sys.executable).parent
HEAVY = ("tensorflow", "keras", "great_expectations", "mlflow", "dvc", "torch")
# with the project's params.yaml: fine-tuning is opt-in (`finetune.start_from: []`), so DVC has no finetune stage
STAGES = ("sources", "split", "validate", "cache", "extract", "near_copies", "cv", "choose", "label_issues",
          "learning_curve", "head", "bagging", "ensemble", "evaluate", "export")

# The tiny project's params: TINY_PARAMS (conftest) with 1-2 epochs everywhere and no retries, so a failing
# stage fails the DAG run at once.
DAG_PARAMS = merge(TINY_PARAMS, {
    "head": {"epochs": 2, "patience": 1},
    "finetune": {"epochs": 1},
    "bagging": {"members": [1]},
    "schedule": {"retries": 0, "gpu_slots": 1},
})


def airflow_env(home: Path, dags: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") and k not in {"MLFLOW_TRACKING_URI", "PIPELINE_RUN_ID"}}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run(cmd, env, cwd, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}"
    return proc


def load_common(dags: Path = DAGS):
    """dags/_common.py as a module (yaml and stdlib only, safe to import here)."""
    spec = importlib.util.spec_from_file_location(f"_dag_common_{abs(hash(str(dags)))}", dags / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------- (a) DagBag

DAGBAG_PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v)[-2000:] for k, v in bag.import_errors.items()},
       "files": sorted(s.file for s in bag.dagbag_stats), "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "schedule": getattr(dag.timetable, "expression", None) or str(dag.timetable),
        "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
        "tasks": {t.task_id: {"upstream": sorted(t.upstream_task_ids), "pool": t.pool, "queue": t.queue,
                              "mapped": type(t).__name__.endswith("MappedOperator"),
                              "retries": t.retries, "backoff": t.retry_exponential_backoff,
                              "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule)} for t in dag.tasks},
        "expand": {t.task_id: dict(t.op_kwargs_expand_input.value)["item"] for t in dag.tasks
                   if hasattr(t, "op_kwargs_expand_input")},
    }
print("DAGBAG_JSON" + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home_dagbag")
    proc = run([sys.executable, "-c", DAGBAG_PROBE, str(DAGS)], airflow_env(home, DAGS), ROOT, timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DAGBAG_JSON"))
    return json.loads(line.removeprefix("DAGBAG_JSON"))


def test_dagbag_imports_both_dags_and_skips_the_helper(dagbag):
    assert dagbag["errors"] == {}
    assert set(dagbag["dags"]) == {"transfer_pipeline", "retrain_on_new_data", "score_new_images"}
    assert not any(f.endswith("_common.py") for f in dagbag["files"]), ".airflowignore should keep the helper out"


def assert_acyclic(tasks: dict) -> None:
    up = {t: set(v["upstream"]) for t, v in tasks.items()}
    while up:
        ready = {t for t, u in up.items() if not u}
        assert ready, f"cycle among {sorted(up)}"
        up = {t: u - ready for t, u in up.items() if t not in ready}


def test_pipeline_dag_structure(dagbag):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dag = dagbag["dags"]["transfer_pipeline"]
    tasks = dag["tasks"]
    assert list(tasks) == ["commit", *STAGES, "register"]  # the run's commit, dvc.yaml order, then the registry
    assert_acyclic(tasks)
    assert dag["schedule"] == params["schedule"]["cron"] and dag["catchup"] is False
    assert dag["max_active_runs"] == params["schedule"]["max_active_runs"] == 1
    up = {t: set(v["upstream"]) for t, v in tasks.items()}
    assert up == {"commit": set(), "sources": {"commit"}, "split": {"sources"}, "validate": {"split"}, "cache": {"validate"},
                  "extract": {"cache"}, "near_copies": {"extract"}, "cv": {"extract"}, "choose": {"cv"},
                  "label_issues": {"choose"}, "learning_curve": {"choose"}, "head": {"choose"}, "bagging": {"choose"},
                  "ensemble": {"bagging", "head"}, "evaluate": {"ensemble", "near_copies", "label_issues", "learning_curve"},
                  "export": {"evaluate"}, "register": {"export"}}
    assert {t for t, v in tasks.items() if v["mapped"]} == {"cv", "bagging"}
    folds = params["cv"]["folds"]  # a matrix stage: one mapped task instance per combination, as DVC names them
    assert dag["expand"] == {"cv": [f"{d}-{k}" for d in params["head"]["designs"] for k in folds],
                             "bagging": [f"{m}-{k}" for m in params["bagging"]["members"] for k in folds]}
    assert {t for t, v in tasks.items() if v["pool"] == "gpu"} == {"extract", "cv", "learning_curve", "bagging"}
    assert {tasks[t]["queue"] for t in ("extract", "cv", "learning_curve", "bagging")} == {params["schedule"]["gpu_queue"]}
    assert all(v["retries"] == params["schedule"]["retries"] and v["backoff"] == 2.0 for t, v in tasks.items()
               if t != "commit")
    # an empty foreach list skips its mapped task; that must not skip what follows
    assert tasks["choose"]["trigger_rule"] == tasks["ensemble"]["trigger_rule"] == "none_failed"


def test_score_dag_structure(dagbag):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dag = dagbag["dags"]["score_new_images"]
    assert dag["schedule"] == params["score"]["cron"] and dag["catchup"] is False and dag["max_active_runs"] == 1
    assert {t: v["upstream"] for t, v in dag["tasks"].items()} == {"score": [], "check_drift": ["score"]}


def test_retrain_dag_structure(dagbag):
    dag = dagbag["dags"]["retrain_on_new_data"]
    tasks = dag["tasks"]
    assert list(tasks) == ["new_data", "commit", *STAGES, "register", "record_hash"]
    assert_acyclic(tasks)
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    assert tasks["commit"]["upstream"] == ["new_data"] and tasks["sources"]["upstream"] == ["commit"]
    assert tasks["register"]["upstream"] == ["export"]
    assert set(tasks["record_hash"]["upstream"]) == {"new_data", "register"}
    assert {t for t, v in tasks.items() if v["pool"] == "gpu"} == {"extract", "cv", "learning_curve", "bagging"}


def test_stage_commands_run_one_dvc_stage_with_the_venv_first(tmp_path):
    common = load_common()
    cmd = common.stage_command("bagging@3-0", ["data/cv/bagging/member_3/fold_0.npz"], ROOT)
    assert f"export PATH={common.venv_bin(ROOT)}:" in cmd and f"cd {ROOT}" in cmd
    assert "python -m pipeline.workspace stage bagging@3-0 && echo" in cmd
    graph = common.stage_graph(ROOT)
    assert graph["bagging"]["item_outs"]["1-0"][:2] == ["data/cv/bagging/member_1/fold_0.npz",
                                                        "plots/cv/bagging/member_1/fold_0/history.csv"]
    assert graph["cv"]["item_outs"]["map_hv-4"][0] == "data/cv/designs/map_hv/fold_4.npz"
    assert "finetune" not in graph  # opt-in: no instance while finetune.start_from is empty, as in DVC
    params = merge(common.load_params(ROOT), {"finetune": {"start_from": ["head"]}})
    graph = common.stage_graph(ROOT, params)
    assert graph["finetune"]["item_outs"]["head"][0] == "models/finetune.keras"
    assert graph["finetune"]["upstream"] == ["head"] and "finetune" in graph["evaluate"]["upstream"]


# ---------------------------------------------------------------------------------------------------- (b) thin parse

PARSE_PROBE = r"""
import json, runpy, sys, time
t0 = time.perf_counter()
import airflow.sdk  # the DAG processor has this loaded already
t1 = time.perf_counter()
runpy.run_path(sys.argv[1], run_name="dag_probe")
t2 = time.perf_counter()
print("PARSE_JSON" + json.dumps({"sdk": t1 - t0, "file": t2 - t1, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("dag_file", ["pipeline_dag.py", "retrain_dag.py", "score_dag.py"])
def test_dag_files_import_nothing_heavy(dag_file, tmp_path):
    proc = run([sys.executable, "-c", PARSE_PROBE, str(DAGS / dag_file)], airflow_env(tmp_path, DAGS), ROOT,
               timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PARSE_JSON"))
    probe = json.loads(line.removeprefix("PARSE_JSON"))
    heavy = sorted({m.split(".")[0] for m in probe["modules"]} & set(HEAVY))
    assert heavy == [], f"{dag_file} imports {heavy} at parse time; keep DAG files to yaml + stdlib"
    print(f"{dag_file}: 'import airflow.sdk' {probe['sdk']:.2f} s, then the file {probe['file']:.2f} s")


# ---------------------------------------------------------------------------------------------------- sensor state

def test_content_hash_follows_content_not_timestamps(tmp_path):
    common = load_common()
    root = make_folder(tmp_path / "images", per_class=2)
    first = common.content_hash(root)
    target = next((root / "cats").iterdir())
    os.utime(target, (1, 1))
    (root / ".DS_Store").write_text("ignored")
    assert common.content_hash(root) == first
    target.write_bytes(target.read_bytes() + b"\0")
    assert common.content_hash(root) != first
    target.rename(target.with_name("renamed.png"))
    renamed = common.content_hash(root)
    make_folder(root, per_class=3)  # one more image per class
    assert len({first, renamed, common.content_hash(root)}) == 3

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nimages/dogs/dogs_000.png,dogs\n")
    before = common.content_hash(manifest)
    (root / "dogs" / "dogs_000.png").write_bytes(b"changed")
    assert common.content_hash(manifest) != before


def test_recorded_hash_is_written_atomically(tmp_path):
    common = load_common()
    assert common.recorded_hash(tmp_path) is None
    path = common.record_hash("abc123", tmp_path)
    assert path == tmp_path / "data" / "source_hash.txt" and common.recorded_hash(tmp_path) == "abc123"
    common.record_hash("def456", tmp_path)
    assert common.recorded_hash(tmp_path) == "def456"
    assert [p.name for p in path.parent.iterdir()] == ["source_hash.txt"]  # no temp files left behind


def test_elpv_source_is_found_without_importing_it():
    common = load_common()
    imported_before = "elpv_dataset" in sys.modules
    folder = common.data_source({"data": {"source": "elpv"}})
    assert folder.name == "data" and folder.parent.name == "elpv_dataset" and (folder / "labels.csv").exists()
    assert ("elpv_dataset" in sys.modules) == imported_before


# ---------------------------------------------------------------------------------------------------- (c) end to end

def build_airflow_project(dest: Path) -> SimpleNamespace:
    """A tiny runnable copy of the project for Airflow: 12 generated 24-px PNGs per class of 2 classes, 32-px
    cache, `small_cnn`, 1-2 epochs, 2 bagging members, 2 folds; its own git + DVC repo, the real virtualenv
    linked in as `.venv`, and a fresh AIRFLOW_HOME (database migrated, `gpu` pool created)."""
    images = make_folder(dest / "images", per_class=12)
    project = copy_project(dest / "project", DAG_PARAMS, images)
    (project / "dags").mkdir(exist_ok=True)
    for f in [DAGS / ".airflowignore", *DAGS.glob("*.py")]:  # DAG files not yet committed while developing
        shutil.copy2(f, project / "dags" / f.name)
    (project / ".venv").symlink_to(BIN.parent, target_is_directory=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    env = airflow_env(dest / "airflow_home", project / "dags")
    run([BIN / "airflow", "db", "migrate"], env, project, timeout=300)
    slots = str(DAG_PARAMS["schedule"]["gpu_slots"])
    description = load_common(project / "dags").GPU_POOL_DESCRIPTION
    run([BIN / "airflow", "pools", "set", "gpu", slots, description], env, project)
    return SimpleNamespace(root=project, images=images, env=env, mlflow_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture(scope="module")
def airflow_project(tmp_path_factory):
    return build_airflow_project(tmp_path_factory.mktemp("dags_e2e"))


def mlflow_runs(uri: str) -> dict:
    """{"runs": [{run_id, tags}] (active runs of the project's experiment), "versions": [registered versions]},
    read in a subprocess so mlflow stays out of the test process."""
    probe = ("import json, sys, mlflow\n"
             "c = mlflow.MlflowClient(tracking_uri=sys.argv[1])\n"
             "e = c.get_experiment_by_name(sys.argv[2])\n"
             "runs = c.search_runs([e.experiment_id], max_results=1000) if e else []\n"
             "versions = [v.version for v in c.search_model_versions(f\"name = '{sys.argv[3]}'\")] if e else []\n"
             "print('RUNS_JSON' + json.dumps({'runs': [{'run_id': r.info.run_id, 'tags': r.data.tags} for r in runs],"
             " 'versions': versions}))\n")
    tracking = yaml.safe_load((ROOT / "params.yaml").read_text())["tracking"]
    proc = subprocess.run([sys.executable, "-c", probe, uri, tracking["experiment"], tracking["register_as"]],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RUNS_JSON")).removeprefix("RUNS_JSON"))


def test_stage_subprocesses_import_the_copy_not_the_installed_checkout(airflow_project):
    """The package is installed editable from the real checkout; `python -m` (like `-c`) puts the working
    directory first on sys.path, so stages run in the copy import the copy's `pipeline`."""
    origin = subprocess.run([airflow_project.root / ".venv" / "bin" / "python", "-c",
                             "import pipeline.params as p; print(p.__file__)"],
                            cwd=airflow_project.root, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(origin).resolve().is_relative_to(airflow_project.root.resolve()), origin


def test_pipeline_dag_end_to_end(airflow_project):
    p = airflow_project
    proc = run([BIN / "airflow", "dags", "test", "transfer_pipeline", "-f", p.root / "dags" / "pipeline_dag.py"],
               p.env, p.root, timeout=1500)
    for out in ["data/split.csv", "data/validate/report.json", "data/cache/train_x.npy", "data/features/train_x.npy",
                "data/cv/designs/map/fold_1.npz", "data/cv/recipe.json", "data/cv/oof.csv", "models/head.keras",
                "models/finetune.keras", "data/cv/bagging/member_1/fold_0.npz", "models/bagging.keras",
                "metrics/cv.json", "metrics/cv_bagging.json", "metrics/evaluate.json"]:
        assert (p.root / out).exists(), f"{out} missing after the DAG run:\n{proc.stdout[-4000:]}"
    assert "device: CPU" in proc.stdout or "device: GPU" in proc.stdout  # stages say where they ran

    found = mlflow_runs(p.mlflow_uri)["runs"]
    parents = [r for r in found if r["tags"].get("role") == "parent"]
    assert len(parents) == 1, [r["tags"] for r in found]
    parent = parents[0]
    assert parent["tags"]["pipeline_run_id"].startswith("manual__")  # the Airflow run id
    nested = [r["tags"]["stage"] for r in found if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
    expected = {"extract", "cv@pooled-0", "cv@map-1", "choose", "head", "finetune", "bagging@1-0", "bagging@1-1",
                "ensemble", "evaluate", "export"}
    assert expected <= set(nested), nested
    assert len(nested) == len(set(nested)), f"duplicate nested runs: {nested}"
    states = task_states(p, "transfer_pipeline")[-1]
    assert set(states.values()) == {"success"} and "register" in states, states
    # the `register` task registered the model once; the export stage did not (PIPELINE_REGISTER=off)
    registered = [r for r in found if r["tags"].get("role") == "register"]
    assert [r["tags"]["pipeline_run_id"] for r in registered] == [parent["tags"]["pipeline_run_id"]]
    assert len(mlflow_runs(p.mlflow_uri)["versions"]) == 1


def test_score_dag_end_to_end(airflow_project, tmp_path):
    """After the pipeline DAG registered version 1 (the champion): a run scores the folder's images and lists the
    corrupt one; a version 2 is registered but the alias moved back to 1; a second run scores only the new files,
    with version 1."""
    p = airflow_project
    inbox = make_folder(tmp_path / "inbox", per_class=2, seed=5)
    (inbox / "dogs" / "corrupt.png").write_bytes(b"\x89PNG broken")
    dag = [BIN / "airflow", "dags", "test", "score_new_images", "-f", p.root / "dags" / "score_dag.py",
           "-c", json.dumps({"folder": str(inbox)})]
    run(dag, p.env, p.root, timeout=600)
    table = p.root / "data" / "scored" / "predictions.csv"
    first = pd.read_csv(table)
    assert len(first) == 4 and set(first["model_version"]) == {1}
    assert pd.read_csv(p.root / "data" / "scored" / "skipped.csv")["file"].tolist() == ["dogs/corrupt.png"]

    alias = ("import mlflow, sys; c = mlflow.MlflowClient(sys.argv[1]); "
             "c.set_registered_model_alias('image-classifier', 'champion', '1')")
    run([p.root / ".venv" / "bin" / "python", "-m", "pipeline.registry", "register"],
        {**p.env, "MLFLOW_TRACKING_URI": p.mlflow_uri}, p.root)  # version 2, now the champion ...
    run([sys.executable, "-c", alias, p.mlflow_uri], p.env, p.root)  # ... until a person moves it back
    shutil.copy2(next((inbox / "cats").glob("*.png")), inbox / "cats" / "arrived_later.png")  # same bytes: seen
    make_image(inbox / "cats" / "really_new.png", 0, np.random.default_rng(9))
    run(dag, p.env, p.root, timeout=600)
    second = pd.read_csv(table)
    assert len(second) == 5 and second["file"].iloc[-1] == "cats/really_new.png"
    assert second["model_version"].iloc[-1] == 1 and len(mlflow_runs(p.mlflow_uri)["versions"]) == 2
    assert [set(s.values()) for s in task_states(p, "score_new_images")] == [{"success"}, {"success"}]


def task_states(p, dag_id: str) -> list[dict[str, str]]:
    """The task-instance states of each run of `dag_id`, oldest first, from Airflow's CLI: [{"split": "success",
    "bagging@0": "success", ...}, ...] (mapped tasks by their map index)."""
    def cli(*args):  # the JSON is the last line; Airflow may log warnings before it
        lines = run([BIN / "airflow", *args, "-o", "json"], p.env, p.root).stdout.splitlines()
        return json.loads(next(x for x in reversed(lines) if x.startswith(("[", "{"))))

    out = []
    for r in sorted(cli("dags", "list-runs", dag_id), key=lambda r: r["start_date"] or ""):
        rows = cli("tasks", "states-for-dag-run", dag_id, r["run_id"])
        out.append({row["task_id"] + ("" if str(row.get("map_index", "")) in ("", "-1") else f"@{row['map_index']}"):
                    row["state"] for row in rows})
    return out


def test_retrain_dag_end_to_end(airflow_project):
    """First run (no hash recorded yet): every task succeeds, the hash is recorded. Second run, same data: the
    sensor short-circuits and every task after it is skipped, whatever its trigger rule."""
    p = airflow_project
    common = load_common(p.root / "dags")
    assert common.recorded_hash(p.root) is None
    dag = ["airflow", "dags", "test", "retrain_on_new_data", "-f", p.root / "dags" / "retrain_dag.py"]
    run([BIN / dag[0], *dag[1:]], p.env, p.root, timeout=1500)
    assert common.recorded_hash(p.root) == common.content_hash(p.images)
    assert len(mlflow_runs(p.mlflow_uri)["versions"]) >= 1  # the gate is open: a model is registered
    versions = mlflow_runs(p.mlflow_uri)["versions"]

    run([BIN / dag[0], *dag[1:]], p.env, p.root, timeout=600)  # nothing changed since
    first, second = task_states(p, "retrain_on_new_data")
    assert set(first.values()) == {"success"}, first
    assert {"register", "record_hash", "evaluate", "split", "bagging@1", "cv@0", "choose"} <= set(first)
    assert second.pop("new_data") == "success"
    assert set(second.values()) == {"skipped"} and {"evaluate", "register", "record_hash"} <= set(second), second
    assert mlflow_runs(p.mlflow_uri)["versions"] == versions


def test_the_workspace_lock_keeps_tasks_apart(tmp_path):
    """Three commands run by `pipeline.workspace exec` in one working tree (as tasks of both DAGs would be) never
    overlap: each holds the tree's lock."""
    body = "echo start >> log; sleep 1; echo end >> log"
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_WORKSPACES"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.workspace", "exec", "evaluate", "--", "bash", "-c", body],
                              cwd=tmp_path, env=env) for _ in range(3)]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0]
    assert (tmp_path / "log").read_text().split() == ["start", "end"] * 3


# ---------------------------------------------------------------------------------- `make airflow`: loopback only

def _listening(procs) -> set[tuple[str, int]]:
    import psutil

    out = set()
    for p in procs:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_make_airflow_listens_on_loopback_only_and_stops_cleanly(tmp_path):
    """`bin/ui-airflow` (what `make airflow` runs): once every component reports healthy, every socket its
    processes listen on is on 127.0.0.1 (no `serve-logs` on 0.0.0.0:8793/8794); SIGTERM (as Ctrl-C) leaves no
    process and no listener behind."""
    import socket
    import time
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**airflow_env(tmp_path / "airflow_home", DAGS), "AIRFLOW_PORT": str(port)}
    log = open(tmp_path / "airflow.log", "w")
    proc = subprocess.Popen([str(ROOT / "bin" / "ui-airflow")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    script = psutil.Process(proc.pid)
    try:
        health, deadline = {}, time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as r:
                    health = json.loads(r.read())
                if all(health.get(c, {}).get("status") == "healthy" for c in ("scheduler", "triggerer", "dag_processor")):
                    break
            except OSError:
                pass
            time.sleep(3)
        assert health.get("scheduler", {}).get("status") == "healthy", \
            f"Airflow did not become healthy: {health}\n{(tmp_path / 'airflow.log').read_text()[-3000:]}"
        procs = [script, *script.children(recursive=True)]
        names = " ".join(" ".join(p.cmdline()) for p in procs if p.is_running())  # the API server retitles itself
        assert all(c in names for c in ("api_server", "scheduler", "dag-processor", "triggerer")), names
        listening = _listening(procs)
        assert ("127.0.0.1", port) in listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, f"listening beyond loopback: {sorted(listening)}"
    finally:
        children = script.children(recursive=True)
        proc.terminate()
        try:
            proc.wait(timeout=90)
        finally:
            log.close()
            gone, alive = psutil.wait_procs(children, timeout=30)
            for p in alive:
                p.kill()
    assert proc.returncode == 130
    assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after stopping"
