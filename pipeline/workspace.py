"""Where an Airflow task of the pipeline runs: this machine's working tree, or a cluster worker's own clone.

Every stage task of the DAGs is `python -m pipeline.workspace stage <target>` (a dvc.yaml stage, or a foreach
instance such as `bagging@1`); the `register` task is `... exec export -- <command>`. Two modes, chosen by the
worker's environment:

- **One machine** (`PIPELINE_WORKSPACES` unset): the project's own working tree, holding its lock (`flock` on
  `.dvc/tmp/workspace.lock`, released by the kernel even when the task is SIGKILLed), so tasks of both DAGs never
  work in the tree at once; the stage runs with `dvc repro --single-item`.
- **A cluster worker** (`PIPELINE_WORKSPACES` set, as `make cluster` does; see `pipeline.cluster`): workers share no
  disk. Each DAG run gets its own workspace on each worker, `$PIPELINE_WORKSPACES/<run id>`: a clone of
  `PIPELINE_REPO` at the run's commit (`PIPELINE_COMMIT`, resolved once by the DAG's `commit` task), whose DVC
  remote is `PIPELINE_DVC_REMOTE` (a folder, or any DVC remote URL: `s3://...`, `ssh://...`) and whose DVC cache is
  the worker's own (shared by its runs). Then
    1. `dvc repro --pull <target>`: the upstream stages, run by other tasks on any worker, come back from DVC's
       run-cache on the remote (outputs checked out, nothing recomputed); the target itself runs;
    2. the stage's outputs (metrics and plots too), then its run-cache entry, go to the remote (`push`), so a task
       killed half-way leaves nothing there that a later task would restore.
  Runs never share a workspace, so two DAG runs can be active at once.

`worker_hostname` is the Airflow `hostname_callable` of the cluster: task instances record the Celery worker
(`PIPELINE_WORKER`, e.g. `w1`) that ran them.

Standard library only at import: Airflow imports this module (the hostname callable) in every process.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

LOCK = Path(".dvc") / "tmp" / "workspace.lock"
REMOTE_NAME = "pipeline"


def worker_hostname() -> str:
    """The name Airflow records for the process running a task: the cluster worker's name, else the FQDN."""
    return os.environ.get("PIPELINE_WORKER") or socket.getfqdn()


def cluster_mode() -> bool:
    return bool(os.environ.get("PIPELINE_WORKSPACES"))


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _out(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def repo_url() -> str:
    """The git repository workers clone: PIPELINE_REPO (a URL or path), else this project."""
    return os.environ.get("PIPELINE_REPO") or str(Path.cwd())


def resolve_commit() -> str:
    """The commit a DAG run builds: PIPELINE_COMMIT if set, else the repository's HEAD now. On one machine the
    working tree is used as it is; its HEAD (or nothing, before the first commit) is only recorded."""
    if commit := os.environ.get("PIPELINE_COMMIT"):
        return commit
    if cluster_mode():
        line = _out(["git", "ls-remote", repo_url(), "HEAD"])
        if not line:
            raise SystemExit(f"git repository {repo_url()} has no HEAD commit: commit the project first")
        return line.split()[0]
    found = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip()


def run_dir(run_id: str) -> Path:
    """The run's workspace on this worker (the run id made safe as a folder name)."""
    return Path(os.environ["PIPELINE_WORKSPACES"]) / re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)


def prepare(run_id: str, commit: str) -> Path:
    """The run's clone at `commit`, its DVC remote and the worker's DVC cache; created once per run per worker,
    complete or not at all (built beside and renamed)."""
    dest = run_dir(run_id)
    if dest.exists():
        return dest
    remote = os.environ.get("PIPELINE_DVC_REMOTE")
    if not remote:
        raise SystemExit("PIPELINE_DVC_REMOTE is not set: the DVC remote through which the cluster's workers share "
                         "stage outputs (a folder or a DVC remote URL)")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a clone that an earlier, killed try left half-made
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _run(["git", "clone", "-q", "--no-checkout", repo_url(), str(tmp)])
    _run(["git", "-c", "advice.detachedHead=false", "checkout", "-q", commit], cwd=tmp)
    _run(["dvc", "remote", "add", "--local", "--force", "--default", REMOTE_NAME, remote], cwd=tmp)
    _run(["dvc", "cache", "dir", "--local", str(Path(os.environ["PIPELINE_WORKSPACES"]) / "dvc-cache")], cwd=tmp)
    tmp.rename(dest)
    return dest


def _in_clone(target: str) -> Path:
    """The DAG run's clone on this worker, with `target` and everything upstream of it reproduced there."""
    commit = os.environ["PIPELINE_COMMIT"]
    ws = prepare(os.environ["PIPELINE_RUN_ID"], commit)
    print(f"worker {worker_hostname()}: workspace {ws} at {commit[:12]}", flush=True)
    _run(["dvc", "repro", "--pull", target], cwd=ws)
    return ws


def stage(target: str) -> None:
    """Run one stage (or foreach instance) for the current DAG run, in the mode the environment says."""
    if not cluster_mode():
        with workspace_lock():
            _run(["dvc", "--wait-for-lock", "repro", "--single-item", target])
        return
    push(_in_clone(target), target)


def push(ws: Path, target: str) -> None:
    """Send the stage's outputs, then its run-cache entry, to the remote.

    The objects are those the stage's run-cache entry names: its cached outputs and also its `cache: false` ones
    (metrics, plots), which DVC's run-cache keeps in the cache but `dvc push` would skip; without them another
    worker could not restore the stage. The entry goes last, so it never points at objects not yet there.
    """
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash, _get_cache_hash, _get_stage_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    print(f"+ push {target}: outputs, then its run-cache entry", flush=True)
    with contextlib.chdir(ws), Repo(str(ws)) as repo:  # DVC resolves some paths against the working directory
        entries = [(_get_stage_hash(s), _get_cache_hash(to_single_stage_lockfile(s)))
                   for s in repo.stage.collect(target) if _can_hash(s)]  # not `sources`: always reruns
        for objs in repo.stage_cache.get_used_objs(entries).values():
            repo.cloud.push(objs)
        repo.stage_cache.push(None)


def execute(target: str, command: list[str]) -> int:
    """Run `command` where `target`'s outputs (and everything upstream) are present: under the lock here, or in
    the run's clone, restored from the remote's run-cache."""
    if not cluster_mode():
        with workspace_lock():
            return subprocess.run(command).returncode
    return subprocess.run(command, cwd=_in_clone(target)).returncode


@contextlib.contextmanager
def workspace_lock():
    """The working tree's lock (`flock` on LOCK): one task at a time in this tree; the kernel frees it when the
    holder dies."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # closing the file releases it
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.workspace", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("commit", help="print the commit this DAG run builds")
    sub.add_parser("publish", help="every stage's outputs and run-cache entry to the default DVC remote (`make push`)")
    s = sub.add_parser("stage", help="run one dvc.yaml stage (or foreach instance) for this DAG run")
    s.add_argument("target")
    e = sub.add_parser("exec", help="run a command where TARGET's outputs are present")
    e.add_argument("target")
    e.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    os.environ.setdefault("PIPELINE_PYTHON", sys.executable)  # the stage commands (bin/python) in a clone: this one
    if args.cmd == "commit":
        print(resolve_commit())
        return 0
    if args.cmd == "stage":
        stage(args.target)
        return 0
    if args.cmd == "publish":
        for name in yaml.safe_load(Path("dvc.yaml").read_text())["stages"]:
            push(Path.cwd(), name)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("exec needs a command after --")
    return execute(args.target, command)


if __name__ == "__main__":
    sys.exit(main())
