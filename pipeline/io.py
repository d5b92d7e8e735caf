"""Atomic writes, aligned array pairs and hashing: the only way stages put files on disk.

Every writer goes to a temporary file beside the target and renames it into place, so a crash or a bad input
never leaves a half-written output behind. A stage that writes several files that belong together (array pairs,
a whole output folder) builds them in a temporary folder and swaps it in at once (`atomic_dir`), so a reader sees
all of them new or all of them old.

Standard library at import time (NumPy only inside the array functions): the DAG helpers use it too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "", mode: int | None = None):
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds. `mode`: the
    file's permissions (default: what a plain open() gives), set before it appears under its name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)  # mkstemp makes 0600
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield an empty temporary folder beside `target`; on success it replaces `target` whole.

    The swap is one atomic exchange of the two folders where the OS offers it (Linux `renameat2`), else two
    renames with only a moment in between where `target` is missing (never a mix of old and new files)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp)  # now holds the old contents
        else:
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
                os.rmdir(old)
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

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


def save_npy(path: str | Path, array) -> None:
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def load_npy(path: str | Path, mmap: bool = True):
    import numpy as np

    return np.load(path, mmap_mode="r" if mmap else None)


def save_pair(prefix: str | Path, x, y) -> None:
    """Save `prefix_x.npy` and `prefix_y.npy`, checked to hold the same number of rows. Write pairs inside an
    `atomic_dir` so that both appear at once."""
    if len(x) != len(y):
        raise ValueError(f"{prefix}: {len(x)} rows of data but {len(y)} labels; refusing to write a misaligned pair")
    save_npy(f"{prefix}_x.npy", x)
    save_npy(f"{prefix}_y.npy", y)


def load_pair(prefix: str | Path, mmap: bool = True):
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
