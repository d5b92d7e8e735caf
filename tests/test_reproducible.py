"""Same commit, same model, on any machine: two clones of the project that differ in everything a machine may
differ in (clone path, data path, virtualenv path, CPU instruction-set cap, cores) run `dvc repro` and write
byte-identical outputs; a third restores every stage from the first one's DVC remote without running any."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_PARAMS, copy_project, make_folder
from pipeline.params import merge

# lean: the stages and their fan-out, without the opt-in fine-tune
PARAMS = merge(TINY_PARAMS, {"finetune": {"start_from": []}, "evaluate": {"models": ["head", "bagging"]}})
GIT = "git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init"


def machine(home: Path, images: Path, data_path: str, env: dict) -> tuple[Path, dict]:
    """A clone of the project at `home/project` whose params name the data as `data_path`."""
    dest = copy_project(home / "project", merge(PARAMS, {"data": {"path": data_path}}))
    subprocess.run(GIT, cwd=dest, shell=True, check=True, env=env)
    return dest, env


def base_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "TF_NUM_INTRAOP_THREADS",
                                                             "PIPELINE_RUN_ID", "PIPELINE_PYTHON")}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "3",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}


def dvc(args: str, cwd: Path, env: dict, prefix: str = "") -> str:
    out = subprocess.run(f"{prefix}dvc {args}", cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    assert out.returncode == 0, f"dvc {args} failed in {cwd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def outs(project: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} from dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {s: {o["path"]: o.get("md5") for o in e.get("outs", [])} for s, e in lock.items()}


def results(project: Path) -> dict[str, bytes]:
    return {str(f.relative_to(project)): f.read_bytes() for f in sorted((project / "metrics").rglob("*.json"))}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Machine A: the project and its images side by side, data named relatively; two cores, no ISA cap set."""
    tmp = tmp_path_factory.mktemp("machine_a")
    make_folder(tmp / "images", per_class=10)
    project, env = machine(tmp, tmp / "images", "../images", base_env(tmp))
    dvc("repro", project, env)
    return project, env, tmp


def test_another_machine_gets_byte_identical_outputs(first, tmp_path):
    project_a, _, tmp_a = first
    # machine B: another clone path, the images copied elsewhere and named absolutely, the virtualenv reached by
    # another path, oneDNN capped at AVX-512 (machine A: at what the CPU has), one core instead of two
    data = tmp_path / "srv" / "datasets" / "solar"
    shutil.copytree(tmp_a / "images", data)
    venv = tmp_path / "opt" / "env"
    venv.parent.mkdir(parents=True)
    venv.symlink_to(Path(sys.prefix))
    env = {**base_env(tmp_path), "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "PIPELINE_PYTHON": str(venv / "bin" / "python")}
    project_b, env = machine(tmp_path / "home" / "someone" / "work", data, str(data), env)
    cores = "taskset -c 0 " if shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1 else ""
    dvc("repro", project_b, env, prefix=cores)
    a, b = outs(project_a), outs(project_b)
    assert a.keys() == b.keys()
    differ = {s: sorted(p for p in a[s] if a[s][p] != b[s].get(p)) for s in a}
    assert not {s: d for s, d in differ.items() if d}, f"outputs that differ between the machines: {differ}"
    assert results(project_a) == results(project_b)
    for table in ("data/split.csv", "data/cache/index.csv", "data/source_index.csv"):
        text = (project_b / table).read_text()
        assert str(tmp_path) not in text and str(tmp_a) not in text, table


def test_another_machine_restores_every_stage_from_the_remote(first, tmp_path):
    """What A pushed (outputs and run-cache), C pulls: `dvc repro --pull` runs no stage command but `sources`
    (which lists the data on every repro), and C's dvc.lock and metrics are A's."""
    project_a, env_a, tmp_a = first
    remote = tmp_path / "remote"
    dvc(f"remote add -f -d shared {remote}", project_a, env_a)
    subprocess.run([sys.executable, "-m", "pipeline.workspace", "publish"], cwd=project_a, env=env_a, check=True)
    shutil.copytree(tmp_a / "images", tmp_path / "images")
    ran = tmp_path / "commands_run.txt"
    recorder = tmp_path / "python"  # every stage command goes through it: it records which stage ran, then runs it
    recorder.write_text(f'#!/bin/sh\necho "$2" >> {ran}\nexec {sys.executable} "$@"\n')
    recorder.chmod(0o755)
    env = {**base_env(tmp_path), "PIPELINE_PYTHON": str(recorder)}
    project_c, env = machine(tmp_path, tmp_path / "images", "../images", env)
    dvc(f"remote add -f -d shared {remote}", project_c, env)
    dvc("repro --pull", project_c, env)
    assert ran.read_text().split() == ["pipeline.sources"]
    assert outs(project_c) == outs(project_a) and results(project_c) == results(project_a)
    assert json.loads(dvc("status --json", project_c, env)) == {"sources": ["always changed"]}  # up to date
