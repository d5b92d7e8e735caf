"""Extract stage: bottleneck features of the frozen backbone, aligned row by row with the cached labels.

One forward pass stores two kinds of features per split, so that the head stage can choose its design on
validation without extracting again (`backbones.build_extractor`): the feature map at the cut layer
(`{split}_x.npy`, for the convolutional head) and the backbone's top map averaged over its positions
(`{split}_pooled.npy`, for the pooled head).

The backbones named in `bagging.backbones` besides `backbone.name` get the same files in
`data/features_by_backbone/<name>/` (each at its own default cut; the folder is empty without them): a
cross-backbone bagging ensemble trains some of its members on them. A separate output, so that trying other
backbones leaves `data/features` as it was, and the head and K-fold stages with it.

The seeds' version called `predict_generator(steps=n // batch)` on an unshuffled generator: the last partial batch
was dropped and labels were rebuilt by assumption. Here every row is run, in order, and the counts are asserted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import backbones, device, features, io, params, paths, tracking


def extract(base, images: np.ndarray, batch_size: int, dtype: str = "float16", desc: str = "extract"):
    """Run `base` over uint8 images (N,S,S,3) in batches; returns (N, *feature_shape) in `dtype`, or a list of
    those when `base` has several outputs."""
    shapes = [tuple(t.shape[1:]) for t in base.outputs]
    outs = [np.empty((len(images), *shape), dtype) for shape in shapes]
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        batch = np.asarray(images[start:start + batch_size], dtype=np.float32)
        got = base.predict_on_batch(batch)
        for out, part in zip(outs, got if len(outs) > 1 else [got]):
            out[start:start + len(batch)] = np.asarray(part)
    return outs if len(outs) > 1 else outs[0]


def extract_splits(name: str, weights: str, cut_layer: str | None, p: params.Extract, out: Path,
                   cache_meta: dict, device_kind: str) -> dict:
    """Features of every cached split by one backbone into `out` (maps, pooled tops, labels, meta.json)."""
    size = cache_meta["image_size"]
    base = backbones.build_extractor(name, weights, size, cut_layer)
    shapes, pooled_shapes = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    for split in paths.SPLITS:
        images, labels = io.load_pair(paths.CACHE_DIR / split)
        maps, pooled = extract(base, images, p.batch_size, p.dtype, desc=f"extract {split} ({name})")
        assert len(maps) == len(pooled) == len(labels) == len(images), f"{split}: misaligned features"
        io.save_pair(out / split, maps, labels)
        io.save_npy(out / f"{split}_pooled.npy", pooled)
        shapes[split], pooled_shapes[split] = list(maps.shape), list(pooled.shape)
    info = {**backbones.describe(name, weights, cut_layer, size), "dtype": p.dtype, "shapes": shapes,
            "pooled_layer": backbones.spec(name).top_layer, "pooled_shapes": pooled_shapes,
            "classes": cache_meta["classes"], "device": device_kind}
    io.write_json(out / "meta.json", info)
    print(f"extract: {info['label']} at {info['cut_layer']}: " + ", ".join(f"{s} {v}" for s, v in shapes.items())
          + f"; {info['pooled_layer']} pooled: {pooled_shapes['train'][1]} values per image")
    return info


def main(argv=None) -> int:
    prm = params.load()
    bb, p = prm.backbone, prm.extract
    meta = io.read_json(paths.CACHE_DIR / "meta.json")
    extras = features.extra_backbones(prm)
    # the other backbones take the same kind of weights (a weights file belongs to backbone.name) and their own cut
    extra_weights = bb.weights if bb.weights in backbones.NAMED_WEIGHTS else "default"
    section = {"backbone": bb.model_dump(), "extract": p.model_dump(), "extra_backbones": extras}
    with tracking.stage_run("extract", section) as run:
        dev = device.detect()
        print(f"device: {dev}")
        with io.atomic_dir(paths.FEATURES_BY_BACKBONE) as out:  # each folder appears whole
            for name in extras:
                extract_splits(name, extra_weights, None, p, out / name, meta, dev.kind)
        with io.atomic_dir(paths.FEATURES_DIR) as out:
            info = extract_splits(bb.name, bb.weights, bb.cut_layer, p, out, meta, dev.kind)
            io.write_text(out / "index.csv", (paths.CACHE_DIR / "index.csv").read_text())
        if run:
            run.log_params({"label": info["label"], "cut_layer": info["cut_layer"], "device": dev.kind})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
