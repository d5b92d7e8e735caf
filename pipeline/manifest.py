"""The manifest: each data source (`params.data`) turned into the same table, one row per image.

Manifest columns: path (relative to the data root, `root_of`, as POSIX: the same on every machine), class_name,
label, sha256, width, height, mode, decodable, error, phash (`pipeline.phash`: for finding near-copies), then the
source's own columns (elpv: probability, type; csv: group and extras; folder with `existing_split: honour`:
orig_split). Every file is hashed and fully decoded once here, in parallel, so validate can judge it without
decoding again. Files a reviewed list names (`data.exclude`, e.g. suspected label errors) are marked `excluded`:
split leaves them out of every split, and says so.
A file outside the data root (`data.root`, else the folder or the manifest's folder), or a symlink that leads out of
it, is not read: its row says so in `error` (`inventory.OUTSIDE_ROOT`). When no file of the source, or none of a
class, can be read, ingesting stops with one message that says why and which key to change.

Readers name each file relative to the source's root (the ELPV package's data folder, the image folder, the
manifest's folder); `root_of` is that root on this machine. The split stage ingests; the cache stage finds the
files again under `root_of`.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline import inventory, io, phash
from pipeline.inventory import IMAGE_EXTENSIONS
from pipeline.params import Data

SPLIT_FOLDERS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
ELPV_CLASSES = ["functional", "defective"]
ELPV_LEVELS = {0.0: "p000", 0.3333: "p033", 0.6667: "p067", 1.0: "p100"}  # the annotators' defect probabilities


class SourceError(ValueError):
    """The data source cannot be read; the message names the path and the fix."""


def _is_image(p: Path) -> bool:
    return (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _existing_dir(path: str | None, what: str) -> Path:
    root = Path(path or "").expanduser()
    if not path or not root.is_dir():
        raise SourceError(f"data folder '{path}' not found: set data.path in params.yaml to the folder of {what}")
    return root.resolve()


def elpv_rows(p: Data) -> pd.DataFrame:
    try:
        root = inventory.elpv_root()
    except FileNotFoundError as e:
        raise SourceError(str(e)) from None
    table = pd.read_csv(root / "labels.csv", sep=r"\s+", header=None, names=["file", "probability", "type"])
    probability = table["probability"].round(4)
    if p.elpv_labels == "levels":
        names = probability.map(ELPV_LEVELS)
        if names.isna().any():
            raise SourceError(f"{root / 'labels.csv'}: defect probabilities {sorted(set(probability[names.isna()]))} are "
                              f"not the four levels {sorted(ELPV_LEVELS)}: reinstall elpv-dataset or set data.elpv_labels: binary")
    else:
        names = [ELPV_CLASSES[int(d)] for d in table["probability"] >= p.elpv_threshold]
    return pd.DataFrame({
        "path": [inventory.relative(root / f, root_of(p)) for f in table["file"]],
        "class_name": list(names),
        "probability": probability,
        "type": table["type"],
    })


def folder_rows(p: Data) -> pd.DataFrame:
    root, base = _existing_dir(p.path, "one sub-folder per class"), root_of(p)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    presplit = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS]
    rows = []
    for split_dir in presplit or [root]:
        class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        for class_dir in class_dirs:
            files = sorted(f for f in class_dir.rglob("*") if _is_image(f))
            if not files:
                raise SourceError(f"class folder '{class_dir}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                                  "add images or remove the folder")
            row = {"class_name": class_dir.name}
            if presplit and p.existing_split == "honour":
                row["orig_split"] = SPLIT_FOLDERS[split_dir.name.lower()]
            rows += [{"path": inventory.relative(f, base), **row} for f in files]
    if not rows:
        raise SourceError(f"no class sub-folders with images in '{root}': expected e.g. {root}/cats/*.jpg, {root}/dogs/*.jpg")
    return pd.DataFrame(rows)


def kaggle_rows(p: Data) -> pd.DataFrame:
    root = _existing_dir(p.path, "images named like cat.123.jpg / dog.45.jpg")
    files = sorted(f for f in root.iterdir() if _is_image(f))
    bad = [f.name for f in files if "." not in f.stem]
    if not files or bad:
        raise SourceError(f"'{root}' should hold files named <label>.<id>.jpg (as in the Dogs vs. Cats download); "
                          f"{'no images found' if not files else 'unlabelled: ' + ', '.join(bad[:5])}")
    return pd.DataFrame({"path": [inventory.relative(f, root_of(p)) for f in files],
                         "class_name": [f.name.split(".")[0].lower() for f in files]})


def csv_rows(p: Data) -> pd.DataFrame:
    manifest = Path(p.path).expanduser()
    if not manifest.is_file():
        raise SourceError(f"manifest '{manifest}' not found: set data.path to a CSV with columns path,label[,group,...]")
    table = pd.read_csv(manifest, dtype={"label": str})
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise SourceError(f"{manifest} lacks column(s) {sorted(missing)}: it needs path,label (plus optional group and extras)")
    base, root = manifest.resolve().parent, root_of(p)
    table["path"] = [inventory.relative(base / str(f), root) for f in table["path"]]  # absolute, or relative to the CSV
    return table.rename(columns={"label": "class_name"})


READERS = {"elpv": elpv_rows, "folder": folder_rows, "kaggle": kaggle_rows, "csv": csv_rows}


def inspect(rel: str, root: Path) -> dict:
    """Hash the bytes of `root / rel` and decode the image fully; never raises (a bad file is reported, not fatal).
    A path whose symlinks lead outside `root` is not opened at all. Messages name the file by `rel`, never by where
    this machine keeps it."""
    info = {"sha256": "", "width": 0, "height": 0, "mode": "", "decodable": False, "error": "", "phash": ""}
    path = root / rel
    if rel.startswith("../"):
        info["error"] = (f"{inventory.OUTSIDE_ROOT}: {rel} is not inside the data root; set data.root in params.yaml "
                         "to a folder that holds every file")
        return info
    if not inventory.inside(path, root):
        info["error"] = f"{inventory.OUTSIDE_ROOT}: {rel} is a symlink that leads out of the data root, not followed"
        return info
    try:
        info["sha256"] = io.sha256_file(path)
        with Image.open(path) as im:
            info.update(width=im.width, height=im.height, mode=im.mode)
            im.load()
            info["phash"] = phash.hashes(im)
        info["decodable"] = True
    except Exception as e:  # noqa: BLE001 - any decoder failure is data, recorded for validate
        info["error"] = f"{type(e).__name__}: {e}".replace(str(root) + os.sep, "").replace("\n", " ")[:300]
    return info


def root_of(p: Data) -> Path:
    """The folder the source's images must stay inside (symlinks leading elsewhere are not followed), and the one
    the manifest's paths are relative to: `data.root`, else the source's folder (or the CSV manifest's)."""
    return inventory.data_root(inventory.source_path(p.model_dump()), p.root)


def ingest(p: Data, workers: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Return the manifest (sorted by path) and the class names in label order."""
    table = READERS[p.source](p)
    if p.limit_per_class:
        table = table.groupby("class_name", sort=True, group_keys=False).head(p.limit_per_class)
    classes = ELPV_CLASSES if p.source == "elpv" and p.elpv_labels == "binary" else sorted(table["class_name"].unique())
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    workers = workers or os.cpu_count() or 1
    root = root_of(p)
    with ProcessPoolExecutor(workers) as pool:
        infos = list(tqdm(pool.map(inspect, table["path"], [root] * len(table), chunksize=16), total=len(table),
                          desc="ingest: hash + decode", unit="img"))
    info = pd.DataFrame(infos)
    table.insert(1, "label", table["class_name"].map({c: i for i, c in enumerate(classes)}).astype(int))
    front = ["path", "class_name", "label"]
    table = pd.concat([table[front], info, table.drop(columns=front)], axis=1)
    usable(table, classes, root)
    table["excluded"] = excluded(table, p)
    return table, classes


def excluded(table: pd.DataFrame, p: Data) -> pd.Series:
    """Which rows a reviewed list names (`data.exclude`: a CSV with a `path` column, paths as the split table names
    them, e.g. a reviewed copy of `data/label_issues.csv`); all False without one."""
    if not p.exclude:
        return pd.Series(False, index=table.index)
    file = Path(p.exclude).expanduser()
    if not file.is_file():
        raise SourceError(f"data.exclude names '{file}', which is not a file: point it at a reviewed list (a CSV with "
                          "a path column, such as a copy of data/label_issues.csv), or set data.exclude: null")
    listed = pd.read_csv(file, dtype=str, keep_default_na=False)
    if "path" not in listed:
        raise SourceError(f"{file} (data.exclude) has no `path` column: it needs one row per file to leave out, "
                          "named as data/split.csv names it")
    names = set(listed["path"]) - {""}
    unknown = sorted(names - set(table["path"]))
    if unknown:
        raise SourceError(f"{file} (data.exclude) names {len(unknown)} file(s) that are not in the data source: "
                          f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}. Remove them from the list "
                          "(or check data.path and data.root)")
    return table["path"].isin(names)


def usable(table: pd.DataFrame, classes: list[str], root: Path) -> None:
    """Stop with one message when no file of the source, or none of a class, can be read: the count, the first
    files, the reason and the key to change (validate judges everything short of that)."""
    bad = table[~table["decodable"]]
    if len(table) and len(bad) == len(table):
        what = f"none of the {len(table)} files of the data source could be read"
    else:
        lost = [c for c in classes if not table.loc[table["class_name"] == c, "decodable"].any()]
        if not lost:
            return
        bad = bad[bad["class_name"].isin(lost)]
        what = f"class {', '.join(repr(c) for c in lost)} lost all its {len(bad)} files"
    first = "; ".join(f"{r.path}: {r.error}" for r in bad.head(3).itertuples())
    outside = bad["error"].str.startswith(inventory.OUTSIDE_ROOT).mean() > 0.5
    fix = (f"set data.root in params.yaml to a folder that holds them (now {root})" if outside else
           "check data.path (and data.source) in params.yaml, or replace the files")
    raise SourceError(f"{what}: {first}{' ...' if len(bad) > 3 else ''}. Fix: {fix}")
