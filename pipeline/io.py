"""Atomic writes, aligned array pairs and hashing: the only way stages put files on disk.

Every writer goes to a temporary file beside the target and renames it into place, so a crash or a bad input
never leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = ""):
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, frame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None)


def save_pair(prefix: str | Path, x: np.ndarray, y: np.ndarray) -> None:
    """Save `prefix_x.npy` and `prefix_y.npy`, checked to hold the same number of rows."""
    if len(x) != len(y):
        raise ValueError(f"{prefix}: {len(x)} rows of data but {len(y)} labels; refusing to write a misaligned pair")
    save_npy(f"{prefix}_x.npy", x)
    save_npy(f"{prefix}_y.npy", y)


def load_pair(prefix: str | Path, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_npy(f"{prefix}_x.npy", mmap), load_npy(f"{prefix}_y.npy", mmap=False)
    if len(x) != len(y):
        raise ValueError(f"{prefix}_x.npy has {len(x)} rows but {prefix}_y.npy has {len(y)}: rerun the stage that wrote them")
    return x, y


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
