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
import json
import os
from pathlib import Path

from pipeline import io

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
OUTSIDE_ROOT = "outside the data root"  # a file named outside data.root, or a symlink that leads out of it


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


def data_root(source: Path, root: str | Path | None = None, project: Path = Path(".")) -> Path:
    """The folder a source's files must stay inside, and that tables name them relative to: `root` (params'
    `data.root`, relative to the project) when set, else the folder itself, or a manifest's folder."""
    if root:
        root = Path(root).expanduser()
        return (root if root.is_absolute() else project / root).resolve()
    return (source.parent if source.is_file() else source).resolve()


def relative(path: str | Path, root: Path) -> str:
    """`path` named relative to the (resolved) `root`, as POSIX: its folder resolved, its own name kept (a
    symlinked file is named by its link); `../` when it lies outside."""
    path = Path(os.path.abspath(path))
    return Path(os.path.relpath(Path(os.path.realpath(path.parent)) / path.name, root)).as_posix()


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


def listing(source: Path, content: bool = False, memo: Path | None = None, root: Path | None = None) -> list[dict]:
    """One row per file: its path relative to the data root, its state (size and mtime, or with `content` its
    sha256) or `outside_root` / `missing`. With `memo` (a JSON file of this machine's, outside every output) a file
    whose size and mtime are unchanged is not read again for its hash."""
    root, rows = root or data_root(source), []
    known = _read_memo(memo) if content and memo else {}
    seen = {}
    for f in files(source):
        rel = relative(f, root)
        if not inside(f, root):
            rows.append({"path": rel, "state": OUTSIDE_ROOT})
        elif not f.exists():
            rows.append({"path": rel, "state": "missing"})
        else:
            st = f.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
            if not content:
                state = stamp
            else:
                key = str(f.resolve())
                state = known[key][1] if key in known and known[key][0] == stamp else io.sha256_file(f)
                seen[key] = [stamp, state]
            rows.append({"path": rel, "state": state})
    if content and memo:
        memo.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(memo, json.dumps({**known, **seen}))
    return rows


def _read_memo(memo: Path) -> dict:
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}


def fingerprint(source: Path, content: bool = False, root: Path | None = None) -> str:
    """One hash over `listing`: any added, removed, renamed or changed file changes it."""
    h = hashlib.sha256()
    for row in listing(source, content, root=root):
        h.update(f"{row['path']}\0{row['state']}\n".encode())
    return h.hexdigest()
