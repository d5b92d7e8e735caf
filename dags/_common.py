"""Helpers shared by the project's DAGs (`pipeline_dag.py`, `retrain_dag.py`, `score_dag.py`); not a DAG itself.

`.airflowignore` keeps the DAG processor from parsing this file as a DAG; the DAG files import it by name (their
folder is on `sys.path`: Airflow's DAG bundle puts it there, and the DAG files add it when loaded another way).

Kept light on purpose: a DAG file is parsed again and again by the DAG processor, so nothing here imports
TensorFlow, Keras, great_expectations, MLflow or DVC. Only the standard library, PyYAML and the project's
light modules (`pipeline.inventory`, `pipeline.io`, and `pipeline.params`, whose pydantic Airflow loads anyway),
plus the Airflow SDK inside `stage_tasks`. Heavy work happens in the stage subprocesses (`python -m pipeline.workspace
stage <stage>`), each in the project directory with the project's virtualenv first on PATH.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from pipeline import inventory, io
from pipeline.params import Schedule, Score

PROJECT = Path(__file__).resolve().parent.parent
SOURCE_HASH_FILE = Path("data") / "source_hash.txt"
START_DATE = datetime(2025, 1, 1, tzinfo=timezone.utc)

# Stages that need an accelerator: they queue on the `gpu` pool, whose slots (`schedule.gpu_slots`) are how many
# of them may run at once. `bin/ui-airflow` creates the pool: `airflow pools set gpu <slots> "<description>"`.
GPU_POOL = "gpu"
GPU_STAGES = frozenset({"extract", "cv", "learning_curve", "finetune", "bagging"})
GPU_POOL_DESCRIPTION = "GPU-heavy pipeline stages (extract, cv, learning_curve, finetune, bagging); slots = params.yaml schedule.gpu_slots"
# On a cluster they also go to the Celery queue `schedule.gpu_queue`: "gpu" sends them to the workers started with
# `--queues default,gpu` (those with a GPU); the default, "default", lets every worker take them.


def load_params(root: Path = PROJECT) -> dict:
    """params.yaml as a plain dict (validation is the stages' job, through pipeline.params)."""
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    return raw if isinstance(raw, dict) else {}


def schedule(params: dict) -> dict:
    """The `schedule` section, validated by the params schema, with its defaults filled in."""
    return Schedule.model_validate(params.get("schedule") or {}).model_dump()


def score_settings(params: dict) -> dict:
    """The `score` section (the scoring DAG's folder, schedule and thresholds), validated, defaults filled in."""
    return Score.model_validate(params.get("score") or {}).model_dump()


def default_args(params: dict) -> dict:
    """Retries with exponential backoff: with the default `schedule.retry_delay_seconds` (60), waits of 1-2, 2-4,
    4-8 ... minutes (Airflow adds per-task jitter up to the same again), capped at 30 minutes."""
    s = schedule(params)
    return {
        "retries": int(s["retries"]),
        "retry_delay": timedelta(seconds=s["retry_delay_seconds"]),
        "retry_exponential_backoff": 2.0,  # Airflow 3.3: a multiplier; the old `True` means 1.0, a constant delay
        "max_retry_delay": timedelta(minutes=30),
    }


def venv_bin(root: Path = PROJECT) -> Path:
    """The project's virtualenv `bin` (`.venv/bin`), else the one of the interpreter running Airflow."""
    candidate = root / ".venv" / "bin"
    return candidate if (candidate / "python").exists() else Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------- dvc.yaml

def _paths(entries) -> list[str]:
    """dvc.yaml outs/deps/metrics entries (a string or a one-key mapping of path -> options) as paths."""
    out = []
    for entry in entries or []:
        out += list(entry) if isinstance(entry, dict) else [entry]
    return [str(p).rstrip("/") for p in out]


def _lookup(params: dict, dotted: str):
    value = params
    for key in dotted.split("."):
        value = value[key]
    return value


def _resolve(params: dict, ref) -> list:
    """A foreach or matrix list: written out, or `${params.key}`."""
    match = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", ref) if isinstance(ref, str) else None
    return list(_lookup(params, match.group(1)) if match else ref)


def stage_graph(root: Path = PROJECT, params: dict | None = None) -> dict[str, dict]:
    """The stages of dvc.yaml in file order: {name: {"items", "item_outs", "outs", "upstream"}}.

    `items` is the list of instance suffixes a `foreach` or `matrix` stage expands over (resolved from params.yaml:
    `bagging@1-0` has the item "1-0") or None, `item_outs` maps each item (None for a plain stage) to its output
    paths; `upstream` holds the stages whose outputs this stage's deps
    name (the same rule DVC uses), minus those it also reaches through another stage.
    """
    params = load_params(root) if params is None else params
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    graph: dict[str, dict] = {}
    for name, spec in stages.items():
        items, subs = None, {None: {}}  # instance suffix -> {placeholder: value}
        if "foreach" in spec:
            items = [str(i) for i in _resolve(params, spec["foreach"])]
            subs = {i: {"${item}": i} for i in items}
            spec = spec["do"]
        elif "matrix" in spec:  # `cv@map_h-0`: one instance per combination, values joined by "-" (DVC's names)
            keys = list(spec["matrix"])
            combos = list(itertools.product(*(_resolve(params, v) for v in spec["matrix"].values())))
            items = ["-".join(str(v) for v in c) for c in combos]
            subs = {i: {f"${{item.{k}}}": str(v) for k, v in zip(keys, c)} for i, c in zip(items, combos)}
        if items is not None and not items:  # DVC has no instance of it (finetune while `finetune.start_from` is empty)
            continue

        def fill(path: str, item) -> str:
            for placeholder, value in subs[item].items():
                path = path.replace(placeholder, value)
            return path

        outs = _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
        deps = _paths(spec.get("deps"))
        by_item = {i: [fill(p, i) for p in outs] for i in subs}
        graph[name] = {"items": items, "item_outs": by_item, "outs": [p for ps in by_item.values() for p in ps],
                       "deps": [fill(p, i) for p in deps for i in subs]}

    def feeds(out: str, dep: str) -> bool:
        return out == dep or out.startswith(dep + "/") or dep.startswith(out + "/")

    direct = {name: [up for up in graph if up != name and any(feeds(o, d) for o in graph[up]["outs"]
                                                                for d in graph[name]["deps"])]
              for name in graph}

    def indirect(src: str, dst: str) -> bool:
        """Does `dst` depend on `src` through some other stage?"""
        todo = [u for u in direct[dst] if u != src]
        seen = set()
        while todo:
            up = todo.pop()
            if up == src:
                return True
            if up not in seen:
                seen.add(up)
                todo += direct[up]
        return False

    for name, info in graph.items():
        info["upstream"] = [up for up in direct[name] if not indirect(up, name)]
        del info["deps"]
    return graph


# ---------------------------------------------------------------------------------------------------- tasks

def with_venv(command: str, root: Path = PROJECT) -> str:
    """`command` in the project directory with the virtualenv first on PATH."""
    return f"export PATH={shlex.quote(str(venv_bin(root)))}:\"$PATH\" && cd {shlex.quote(str(root))} && {command}"


def in_project(command: str, outs: list[str], root: Path = PROJECT) -> str:
    """`with_venv(command)`; on success the last stdout line, the task's XCom, is the JSON list of files the
    command owns (tasks pass paths, never data)."""
    return with_venv(f"{command} && echo {shlex.quote(json.dumps(outs))}", root)


def stage_command(target: str, outs: list[str], root: Path = PROJECT) -> str:
    """Run one DVC stage (or foreach / matrix instance, `bagging@1-0`) through `pipeline.workspace`: here, under the working
    tree's lock (`dvc repro --single-item`); on a cluster worker, in the run's own clone with the data travelling
    through the DVC remote."""
    return in_project(f"python -m pipeline.workspace stage {shlex.quote(target)}", outs, root)


STAGE_ENV = {
    # One MLflow parent run per Airflow run: pipeline.tracking reads this; a retried task adds a nested run.
    "PIPELINE_RUN_ID": "{{ run_id }}",
    # Registration is the DAG's own `register` task, not a side effect of the evaluate stage.
    "PIPELINE_REGISTER": "off",
    # The git commit the run builds, resolved once by the `commit` task (cluster workers clone it).
    "PIPELINE_COMMIT": "{{ ti.xcom_pull(task_ids='commit') or '' }}",
    "PYTHONUNBUFFERED": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def bash_kwargs(root: Path = PROJECT) -> dict:
    """Common BashOperator settings: the worker's environment (MLFLOW_TRACKING_URI included, when set) plus
    STAGE_ENV; the XCom is the JSON list of paths printed last."""
    return {"env": dict(STAGE_ENV), "append_env": True, "cwd": str(root), "skip_on_exit_code": None,
            "output_processor": json.loads}


def stage_tasks(root: Path = PROJECT, params: dict | None = None) -> tuple[list, list]:
    """Create one task per dvc.yaml stage (foreach and matrix stages as mapped tasks) in the current DAG, wired like DVC's
    graph. Returns the (first, last) tasks, for the caller to attach upstream/downstream work.
    """
    from airflow.sdk import task

    params = load_params(root) if params is None else params
    graph = stage_graph(root, params)
    gpu = {"pool": GPU_POOL, "queue": schedule(params)["gpu_queue"]}
    tasks = {}
    for name, info in graph.items():
        extra = dict(gpu) if name in GPU_STAGES else {}
        below_mapped = any(graph[up]["items"] is not None for up in info["upstream"])
        if below_mapped:  # an empty foreach list skips its mapped task; that must not skip what follows
            extra["trigger_rule"] = "none_failed"
        doc = f"`dvc repro --single-item {name}` in {root.name}/; outputs: {', '.join(info['outs']) or '-'}"
        if info["items"] is None:
            def command(cmd=stage_command(name, info["outs"], root)):
                return cmd

            tasks[name] = task.bash(task_id=name, doc_md=doc, **bash_kwargs(root), **extra)(command)()
        else:
            def command(item, name=name, by_item=info["item_outs"]):
                return stage_command(f"{name}@{item}", by_item.get(item, []), root)

            mapped = task.bash(task_id=name, doc_md=doc, map_index_template=f"{name}@{{{{ task.op_kwargs['item'] }}}}",
                               **bash_kwargs(root), **extra)(command)
            tasks[name] = mapped.expand(item=info["items"])
    for name, info in graph.items():
        for up in info["upstream"]:
            tasks[up] >> tasks[name]
    downstream = {up for info in graph.values() for up in info["upstream"]}
    first = [tasks[n] for n, info in graph.items() if not info["upstream"]]
    last = [tasks[n] for n in graph if n not in downstream]
    return first, last


def register_task(root: Path = PROJECT):
    """The `register` task: the selected model into the registry if it passes the gate and beats the `champion`
    on the current test split (`python -m pipeline.registry register --if-better`; succeeds either way),
    run where the export stage's outputs are (`pipeline.workspace exec`), after the last stage."""
    from airflow.sdk import task

    @task.bash(task_id="register", **{**bash_kwargs(root), "env": {k: v for k, v in STAGE_ENV.items()
                                                                     if k != "PIPELINE_REGISTER"}})
    def register() -> str:
        return in_project("python -m pipeline.workspace exec export -- "
                          "python -m pipeline.registry register --if-better", [], root)

    return register()


def commit_task(root: Path = PROJECT):
    """The `commit` task, first of every run: the git commit the run builds (its XCom), from the trigger's conf
    `commit` or the repository's HEAD at the start of the run, so every task of the run, on any worker, builds the
    same code and params."""
    from airflow.sdk import task

    @task.bash(task_id="commit", env={"PIPELINE_COMMIT": "{{ dag_run.conf.get('commit', '') if dag_run.conf else '' }}"},
               append_env=True, cwd=str(root), retries=0)
    def commit() -> str:
        return with_venv("python -m pipeline.workspace commit", root)

    return commit()


# ---------------------------------------------------------------------------------------------------- data hash

def data_source(params: dict, root: Path = PROJECT) -> Path:
    """The folder (or CSV manifest) the split stage reads: `data.path`, or the installed ELPV package's data."""
    return inventory.source_path(params.get("data") or {}, root)


def content_hash(source: Path, data_root: str | None = None, root: Path = PROJECT) -> str:
    """SHA-256 over (relative path, content hash) of every non-hidden file: renames, edits, additions and
    removals all change it; timestamps do not. A CSV manifest hashes itself plus the files it lists (relative to
    params' `data.root` when set)."""
    return inventory.fingerprint(source, content=True, root=inventory.data_root(source, data_root, root))


def recorded_hash(root: Path = PROJECT) -> str | None:
    path = root / SOURCE_HASH_FILE
    return path.read_text().split()[0] if path.exists() and path.read_text().strip() else None


def record_hash(value: str, root: Path = PROJECT) -> Path:
    """Write the state file atomically (temp file beside it, then rename)."""
    io.write_text(root / SOURCE_HASH_FILE, value + "\n")
    return root / SOURCE_HASH_FILE
