"""Which data and code a result came from: recorded in every model's JSON, MLflow run and registered version.

- `git_commit`: the commit of the project's working tree (plus `dirty` when tracked files differ from it), for
  MLflow only: an output that held it could never be reproduced by a later commit;
- `code_sha256`: one hash over the project modules the stage runs (its code deps in dvc.yaml);
- `split_sha256`: the hash of the split table (`data/split.csv`), i.e. exactly which images and splits;
- `inputs_md5`: one hash over the `dvc.lock` hashes of the stage's data inputs (the outputs of the stages it
  reads), so two runs with the same value trained on byte-identical inputs.

Standard library only (the DAG helpers may import it); a value that cannot be known is None, never a guess.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from pipeline import io, paths

DVC_YAML, DVC_LOCK = Path("dvc.yaml"), Path("dvc.lock")


def git_commit(root: str | Path = ".") -> dict:
    """{"git_commit": sha or None, "git_dirty": bool or None}."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"git_commit": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def split_sha256() -> str | None:
    return io.sha256_file(paths.SPLIT_TABLE) if paths.SPLIT_TABLE.exists() else None


def _stage_deps(stage: str) -> list[str]:
    stages = (yaml.safe_load(DVC_YAML.read_text()) or {}).get("stages", {}) if DVC_YAML.exists() else {}
    name, _, item = stage.partition("@")
    spec = stages.get(name) or {}
    spec = spec.get("do", spec)
    return [str(d).replace("${item}", item) for d in spec.get("deps", [])]


def inputs_md5(stage: str) -> str | None:
    """Hash of the dvc.lock md5s of `stage`'s deps that another stage writes (its data inputs); None without a lock."""
    if not DVC_LOCK.exists():
        return None
    lock = (yaml.safe_load(DVC_LOCK.read_text()) or {}).get("stages", {})
    outs = {o["path"]: o.get("md5") for entry in lock.values() for o in entry.get("outs", [])}
    deps = [d.rstrip("/") for d in _stage_deps(stage)]
    found = {o: md5 for o, md5 in outs.items() for d in deps if o == d or o.startswith(d + "/")}  # folders too
    if not found:
        return None
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:32]


def code_sha256(stage: str) -> str | None:
    """One hash over the contents of the project modules `stage` depends on (its `pipeline/` deps in dvc.yaml,
    folders file by file): the code a result came from, the same in every clone of the same code."""
    files = sorted({f for d in _stage_deps(stage) if d.startswith("pipeline/")
                    for f in ([Path(d)] if Path(d).is_file() else sorted(Path(d).rglob("*.py")))})
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.as_posix()}\0{io.sha256_file(f)}\n".encode())
    return h.hexdigest()[:32]


def describe(stage: str | None = None) -> dict:
    """The lineage of a result produced by `stage` now, by content only (what outputs record: the same on every
    machine and in every later commit of the same code and data). `git_commit` is for MLflow's tags."""
    out = {"split_sha256": split_sha256()}
    if stage:
        out.update(inputs_md5=inputs_md5(stage), code_sha256=code_sha256(stage))
    return out
