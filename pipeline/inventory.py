"""The data source's files, listed without decoding them: what the `sources` stage records (so that `dvc repro`
reruns split when an image is added, removed or changed) and what the `retrain_on_new_data` DAG watches.

Standard library only: the DAG helpers import it at parse time.

A symlink that leads outside the data root is never followed: it is listed as such (`outside_root`), and the split
stage reports it instead of reading whatever it points at.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
from pathlib import Path

from pipeline import io

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
OUTSIDE_ROOT = "symlink outside the data root"


def elpv_root() -> Path:
    """The data folder of the installed `elpv_dataset` package (located without importing it)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the elpv-dataset package is not installed: run `make setup`")
    return Path(spec.origin).parent / "data"


def source_path(data: dict, project: Path = Path(".")) -> Path:
    """What params' `data` points at: a folder, a CSV manifest, or the ELPV package's data folder."""
    if (data.get("source") or "elpv") == "elpv":
        return elpv_root()
    if not data.get("path"):
        raise FileNotFoundError(f"data.path is not set in params.yaml (data.source: {data.get('source')})")
    path = Path(data["path"]).expanduser()
    return path if path.is_absolute() else project / path


def data_root(source: Path) -> Path:
    """The folder a source's files must stay inside: the folder itself, or a manifest's folder."""
    return (source.parent if source.is_file() else source).resolve()


def inside(path: str | Path, root: Path) -> bool:
    """Does `path`, with every symlink resolved, stay inside `root`?"""
    return Path(path).resolve().is_relative_to(root)


def files(source: Path) -> list[Path]:
    """Every non-hidden file of a folder source (symlinked folders are not entered), or a manifest plus its files."""
    if source.is_file():
        base = source.resolve().parent
        with open(source, newline="") as f:
            listed = sorted({row["path"] for row in csv.DictReader(f) if row.get("path")})
        return [source] + [base / p for p in listed]
    if not source.is_dir():
        raise FileNotFoundError(f"data source '{source}' not found: check data.path in params.yaml")
    out = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def listing(source: Path, content: bool = False) -> list[dict]:
    """One row per file: relative path, size and mtime (or, with `content`, its sha256), and `outside_root`."""
    root, rows = data_root(source), []
    for f in files(source):
        rel = os.path.relpath(f, root if source.is_dir() else source.resolve().parent)
        if not inside(f, root):
            rows.append({"path": Path(rel).as_posix(), "state": OUTSIDE_ROOT})
        elif not f.exists():
            rows.append({"path": Path(rel).as_posix(), "state": "missing"})
        else:
            st = f.stat()
            state = io.sha256_file(f) if content else f"{st.st_size}:{st.st_mtime_ns}"
            rows.append({"path": Path(rel).as_posix(), "state": state})
    return rows


def fingerprint(source: Path, content: bool = False) -> str:
    """One hash over `listing`: any added, removed, renamed or changed file changes it."""
    h = hashlib.sha256()
    for row in listing(source, content):
        h.update(f"{row['path']}\0{row['state']}\n".encode())
    return h.hexdigest()
