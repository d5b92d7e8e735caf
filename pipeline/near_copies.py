"""Near-copies stage: images that are (nearly) the same picture, and test images with a near-copy in train+val.

Two signals:

- the perceptual hash (`pipeline.phash`: under flips and 90-degree turns) groups near-copies before the split,
  which keeps each group in one split and fold (the `near_copy` column of `data/split.csv`); here they are listed;
- the backbone's pooled features find look-alikes the hash misses (crops, colour shifts): pairs whose cosine
  similarity is at least `near_copies.cosine`, grouped transitively.

A test image whose group holds a train or val image is a leak: its test score measures memory, not generalisation.
Writes `data/near_copies.csv` (kind, group, path, split, class_name, leak), `metrics/near_copies.json` and
`plots/data/near_copies.png`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import features, figures, images, io, params, paths, phash, tracking

COLUMNS = ["kind", "group", "path", "split", "class_name", "leak"]
PICTURE = paths.DATA_PLOTS / "near_copies.png"


def feature_groups(x: np.ndarray, threshold: float, chunk: int = 1024) -> np.ndarray:
    """A group number per row of `x` (pooled features), -1 alone: rows joined by a cosine similarity of at least
    `threshold` (in float64, rounded to 1e-4 so that no CPU's rounding decides a pair)."""
    z = np.asarray(x, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    i, j = [], []
    for start in range(0, len(z), chunk):
        close = np.round(z[start:start + chunk] @ z.T, 4) >= threshold
        a, b = np.nonzero(close)
        keep = start + a < b
        i.append(start + a[keep]), j.append(b[keep])
    return phash.components(len(z), np.concatenate(i), np.concatenate(j))


def find(split_table: pd.DataFrame, rows: pd.DataFrame, x: np.ndarray, cosine: float) -> pd.DataFrame:
    """Every image in a near-copy group, by hash (the split table's `near_copy`) and by features (`x`: the pooled
    features of `rows`, which name path and split), with `leak` marking test images whose group holds train or val
    images."""
    used = split_table[split_table["split"].isin(paths.SPLITS)]
    by_hash = used[used["near_copy"].fillna("").astype(str) != ""]
    frames = [by_hash.assign(kind="hash", group=by_hash["near_copy"])]
    number = feature_groups(x, cosine)
    found = rows[number >= 0].assign(group=number[number >= 0])
    if len(found):
        found = found.merge(used[["path", "class_name"]], on="path", how="left")
        found["group"] = found.groupby("group")["path"].transform("min")
        frames.append(found.assign(kind="features"))
    out = pd.concat(frames, ignore_index=True)
    trained = out[out["split"].isin(["train", "val"])]
    seen = set(zip(trained["kind"], trained["group"]))
    out["leak"] = [s == "test" and (k, g) in seen for k, g, s in zip(out["kind"], out["group"], out["split"])]
    return out[COLUMNS].sort_values(["kind", "group", "path"], kind="stable").reset_index(drop=True)


def summarize(found: pd.DataFrame, bits, cosine: float) -> dict:
    out = {}
    for kind in ("hash", "features"):
        here = found[found["kind"] == kind]
        groups = here.groupby("group")
        out[kind] = {"groups": int(groups.ngroups), "images": int(len(here)),
                     "mixed_classes": int((groups["class_name"].nunique() > 1).sum()),
                     "across_splits": int((groups["split"].nunique() > 1).sum()),
                     "leaks": int(here["leak"].sum())}
    hashed = set(found.loc[found["kind"] == "hash", "path"])
    out["hash"]["max_bits"] = bits
    out["features"].update(cosine=cosine, also_by_hash=int(found.loc[found["kind"] == "features", "path"]
                                                           .isin(hashed).sum()))
    leaks = sorted(set(found.loc[found["leak"], "path"]))
    return {**out, "leaks": len(leaks), "leak_files": leaks}


def picture(found: pd.DataFrame, target, groups: int = 8, cols: int = 6):
    """The groups worth a look: leaks first, then groups with more than one class, then the largest."""
    order = (found.groupby(["kind", "group"])
             .agg(leak=("leak", "any"), classes=("class_name", "nunique"), size=("path", "size"))
             .sort_values(["leak", "classes", "size"], ascending=False, kind="stable").head(groups))
    chosen = [found[(found["kind"] == k) & (found["group"] == g)].head(cols) for k, g in order.index]
    pics = images.cached(pd.concat(chosen)["path"] if chosen else [], paths.CACHE_DIR)
    rows = [(f"by {g['kind'].iloc[0]}", [(pics[r.path], f"{r.path.rsplit('/', 1)[-1][:18]}\n{r.split} · {r.class_name}",
                                         r.leak) for r in g.itertuples() if r.path in pics]) for g in chosen]
    fig = figures.image_grid(rows, cols, "near-copy groups (red: a test image with a copy in train/val, a leak)")
    return figures.save(fig, target)


def main(argv=None) -> int:
    prm = params.load()
    split_table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False)
    index = pd.read_csv(paths.FEATURES_DIR / "index.csv")
    x = np.concatenate([features.load_features(s, pooled=True)[0] for s in paths.SPLITS])
    rows = pd.concat([index[index["split"] == s] for s in paths.SPLITS], ignore_index=True)[["path", "split"]]
    with tracking.stage_run("near_copies", prm.near_copies.model_dump()) as run:
        found = find(split_table, rows, x, prm.near_copies.cosine)
        summary = summarize(found, prm.split.near_copy_bits, prm.near_copies.cosine)
        io.write_csv(paths.NEAR_COPIES, found)
        io.write_json(paths.METRICS / "near_copies.json", summary)
        pic = picture(found, PICTURE)
        if run:
            run.log_metrics({"hash_groups": summary["hash"]["groups"], "hash_images": summary["hash"]["images"],
                             "feature_groups": summary["features"]["groups"],
                             "feature_images": summary["features"]["images"], "leaks": summary["leaks"]})
            tracking.log_files(run, paths.NEAR_COPIES, pic)
    h, f = summary["hash"], summary["features"]
    print(f"near_copies: by hash {h['images']} images in {h['groups']} groups ({h['mixed_classes']} with two classes); "
          f"by features (cosine >= {f['cosine']}) {f['images']} images in {f['groups']} groups "
          f"({f['also_by_hash']} also by hash); {summary['leaks']} test images leak"
          + (f": {', '.join(summary['leak_files'][:5])}" if summary["leaks"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
