"""Split stage: ingest the data source, then assign every image to train/val/test and a cross-validation fold.

Holdout by ratios (0.65/0.10/0.25) or by counts (2000/1000/1000, balanced per class), stratified on the label
plus any `split.stratify` columns, seeded. Paths are relative to the data root (`pipeline.manifest`). Images of one
`group`, exact duplicates (same sha256) and near-copies (`near_copy`: flipped, turned or retouched copies, by
perceptual hash within `split.near_copy_bits`, `pipeline.phash`) always land in the same split and fold; with
`data.existing_split: honour` a near-copy keeps the split its folder gives it, and a copy across them is a leak that
validate and the near_copies stage report. Files a reviewed list names (`data.exclude`) stay in the table with split
`excluded`. Same params and data give a byte-identical table.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import io, manifest, params, paths, phash, tracking
from pipeline.params import Split

SPLIT_NAMES = ("train", "val", "test")


def units_of(table: pd.DataFrame) -> np.ndarray:
    """Unit id per row: rows sharing a sha256, a group or a near-copy group are one unit (union-find)."""
    parent = list(range(len(table)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in ("sha256", "group", "near_copy"):
        if column not in table:
            continue
        keys = table[column].where(table[column].astype(str) != "")  # a blank key (an unread file) joins nothing
        if column == "near_copy" and "orig_split" in table:  # honoured folders keep their split: a near-copy across
            keys = keys + "|" + table["orig_split"]          # them is reported as a leak (near_copies), not moved
        for rows in keys.groupby(keys, sort=False).indices.values():
            for r in rows[1:]:
                parent[find(r)] = find(rows[0])
    return np.array([find(i) for i in range(len(table))])


def near_copies(table: pd.DataFrame, max_bits: int | None) -> pd.Series:
    """Each row's near-copy group (`pipeline.phash`), named by its first path; blank for a row with none."""
    number = phash.groups(table["phash"].fillna("").tolist(), max_bits) if "phash" in table else np.full(len(table), -1)
    first = table.groupby(number)["path"].transform("min")
    return first.where(number >= 0, "")


def _allocate(n: int, shares) -> list[int]:
    """Split n items by shares, rounding so the parts add up to n (largest remainder)."""
    raw = np.asarray(shares, float) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign(table: pd.DataFrame, classes: list[str], p: Split, seed: int) -> pd.DataFrame:
    """Return the table with `split` and `fold` columns added."""
    if len(classes) < 2:
        raise ValueError(f"found only one class ({classes[0] if classes else 'none'}): a classifier needs at least two "
                         "class folders / labels")
    rng = np.random.default_rng(seed)
    table = table.copy()
    out = table.pop("excluded") if "excluded" in table else pd.Series(False, index=table.index)
    left_out, table = table[out], table[~out].copy()  # data.exclude: in the table as such, in no split and no fold
    table["near_copy"] = near_copies(table, p.near_copy_bits)
    table = table.drop(columns="phash", errors="ignore")
    table["unit"] = units_of(table)
    strat_cols = ["label"] + [c for c in p.stratify if c in table and c != "label"]
    units = table.groupby("unit", sort=True).agg(label=("label", "first"), size=("path", "size"),
                                                 **{c: (c, "first") for c in strat_cols[1:]})
    split_of = pd.Series("unused", index=units.index, dtype=object)

    if "orig_split" in table:  # a folder that already holds train/validation/test, honoured
        split_of[:] = table.groupby("unit")["orig_split"].first()
    elif p.counts is None:
        for _, stratum in units.groupby(strat_cols, sort=True):
            ids = rng.permutation(stratum.index.to_numpy())
            n_train, n_val, n_test = _allocate(len(ids), p.ratios)
            split_of[ids[:n_train]] = "train"
            split_of[ids[n_train:n_train + n_val]] = "val"
            split_of[ids[n_train + n_val:]] = "test"
    else:
        per_class = [_allocate(c, [1 / len(classes)] * len(classes)) for c in p.counts]  # balanced per class
        have = units.groupby("label")["size"].sum().reindex(range(len(classes)), fill_value=0)
        want = [sum(pc[k] for pc in per_class) for k in range(len(classes))]
        short = [k for k in range(len(classes)) if have[k] < want[k]]
        if short:
            there = ", ".join(f"{c}: {have[k]}" for k, c in enumerate(classes))
            raise ValueError(f"split.counts {list(p.counts)} needs {max(want)} images per class, but there are {there}. "
                             "Lower split.counts or use split.ratios.")
        for k in range(len(classes)):
            ids = rng.permutation(units.index[units["label"] == k].to_numpy())
            sizes, pos = units["size"][ids].to_numpy(), 0
            for name, pc in zip(SPLIT_NAMES, per_class):
                taken = 0
                while taken < pc[k] and pos < len(ids):
                    split_of[ids[pos]] = name
                    taken += sizes[pos]
                    pos += 1

    fold_of = pd.Series(-1, index=units.index)
    if p.folds:
        pool = units[split_of.isin(["train", "val"])]
        offset = 0
        for _, stratum in pool.groupby(strat_cols, sort=True):
            ids = rng.permutation(stratum.index.to_numpy())
            fold_of[ids] = (np.arange(len(ids)) + offset) % p.folds
            offset += len(ids)
    table["split"] = table["unit"].map(split_of)
    table["fold"] = table["unit"].map(fold_of).astype(int)
    left_out = left_out.drop(columns="phash", errors="ignore").assign(near_copy="", split="excluded", fold=-1)
    return pd.concat([table.drop(columns="unit"), left_out]).sort_values("path", kind="stable").reset_index(drop=True)


def summarize(table: pd.DataFrame, classes: list[str], p: Split, source: str) -> dict:
    counts = {s: {c: int(((table["split"] == s) & (table["class_name"] == c)).sum()) for c in classes}
              for s in (*SPLIT_NAMES, "unused", "excluded") if (table["split"] == s).any()}
    dup = table["sha256"][table["sha256"] != ""].duplicated(keep=False)
    near = table["near_copy"][table["near_copy"] != ""]
    return {"source": source, "classes": classes, "n_images": len(table), "counts": counts, "folds": p.folds,
            "duplicate_groups": int(table["sha256"][table["sha256"] != ""][dup].nunique()),
            "near_copy_groups": int(near.nunique()), "near_copy_images": int(len(near)),
            "near_copy_bits": p.near_copy_bits, "excluded": int((table["split"] == "excluded").sum())}


def main(argv=None) -> int:
    prm = params.load()
    with tracking.stage_run("split", {"data": prm.data.model_dump(), "split": prm.split.model_dump(),
                                      "seed": prm.seed}) as run:
        table, classes = manifest.ingest(prm.data)
        table = assign(table, classes, prm.split, prm.seed)
        summary = summarize(table, classes, prm.split, prm.data.source)
        io.write_csv(paths.SPLIT_TABLE, table)
        io.write_json(paths.SPLIT_SUMMARY, summary)
        if run:
            run.log_metrics({f"n_{s}": sum(c.values()) for s, c in summary["counts"].items()})
            tracking.log_files(run, paths.SPLIT_SUMMARY)
    print(f"split: {len(table)} images, classes {classes}: " +
          ", ".join(f"{s} {sum(c.values())}" for s, c in summary["counts"].items()) +
          f"; {summary['near_copy_images']} near-copies in {summary['near_copy_groups']} groups, each kept in one "
          "split and fold")
    if summary["excluded"]:
        print(f"split: {summary['excluded']} files left out as data.exclude ({prm.data.exclude}) lists them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
