"""Cache stage: decode every image once, as RGB at `cache.image_size`, into one uint8 array per split.

Later stages read these memory-mappable `.npy` files and never decode JPEG/PNG again (the seeds'
ImageDataGenerator decoded every image every epoch). Row i of `{split}_x.npy` is the i-th row of that split in
`data/split.csv`, less the files the validate stage skipped; `index.csv` records the mapping.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import images, io, manifest, params, paths, tracking

def _load(path: str, size: int) -> np.ndarray:
    try:
        return images.load_rgb(path, size)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"cannot decode {path}: {e}. The validate stage should have flagged it: "
                           "rerun `dvc repro validate`") from e


def cache_split(files: list[str], size: int, workers: int, desc: str) -> np.ndarray:
    out = np.empty((len(files), size, size, 3), np.uint8)
    if not files:
        return out
    with ProcessPoolExecutor(workers) as pool:
        for i, img in enumerate(tqdm(pool.map(partial(_load, size=size), files, chunksize=8),
                                     total=len(files), desc=desc, unit="img")):
            out[i] = img
    return out


def build(table: pd.DataFrame, skipped: set[str], size: int, workers: int = 0, root: Path = Path(".")) -> dict[str, tuple]:
    """Return {split: (images, labels, rows of path and fold)} for train/val/test, leaving out the skipped files.
    The table's paths are relative to `root`, and stay so in the rows returned."""
    workers = workers or os.cpu_count() or 1
    keep = table[table["split"].isin(paths.SPLITS) & ~table["path"].isin(skipped)]
    result = {}
    for split in paths.SPLITS:
        rows = keep[keep["split"] == split]
        images = cache_split([str(root / f) for f in rows["path"]], size, workers, f"cache {split}")
        result[split] = (images, rows["label"].to_numpy(np.int64), rows[["path", "fold"]])
    return result


def main(argv=None) -> int:
    prm = params.load()
    p = prm.cache
    table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False)
    report = io.read_json(paths.VALIDATE_REPORT)
    summary = io.read_json(paths.SPLIT_SUMMARY)
    with tracking.stage_run("cache", p.model_dump()) as run:
        splits = build(table, set(report.get("skipped", [])), p.image_size, p.workers, manifest.root_of(prm.data))
        index = []
        with io.atomic_dir(paths.CACHE_DIR) as out:  # the pairs, index and meta appear together
            for split, (images, labels, rows) in splits.items():
                io.save_pair(out / split, images, labels)
                index.append(rows.assign(split=split, row=np.arange(len(rows)), label=labels))
            io.write_csv(out / "index.csv", pd.concat(index)[["split", "row", "path", "label", "fold"]])
            io.write_json(out / "meta.json", {"image_size": p.image_size, "classes": summary["classes"]})
        if run:
            run.log_metrics({f"n_{s}": len(v[0]) for s, v in splits.items()})
    print("cache: " + ", ".join(f"{s} {len(v[0])}" for s, v in splits.items()) + f" images at {p.image_size} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
