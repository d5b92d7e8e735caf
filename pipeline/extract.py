"""Extract stage: bottleneck features of the frozen backbone, aligned row by row with the cached labels.

One forward pass stores two kinds of features per split, so that the head stage can choose its design on
validation without extracting again (`backbones.build_extractor`): the feature map at the cut layer
(`{split}_x.npy`, for the convolutional head) and the backbone's top map averaged over its positions
(`{split}_pooled.npy`, for the pooled head).

The seeds' version called `predict_generator(steps=n // batch)` on an unshuffled generator: the last partial batch
was dropped and labels were rebuilt by assumption. Here every row is run, in order, and the counts are asserted.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline import backbones, device, io, params, paths, tracking


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


def load_features(split: str, pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one split, as this stage wrote them (read into memory): the maps, or with `pooled`
    the pooled top vectors."""
    if not pooled:
        return io.load_pair(paths.FEATURES_DIR / split, mmap=False)
    x = io.load_npy(paths.FEATURES_DIR / f"{split}_pooled.npy", mmap=False)  # not the maps: they are not needed
    y = io.load_npy(paths.FEATURES_DIR / f"{split}_y.npy", mmap=False)
    if len(x) != len(y):
        raise ValueError(f"{paths.FEATURES_DIR}/{split}_pooled.npy and {split}_y.npy disagree: rerun `dvc repro extract`")
    return x, y


def features_model(meta: dict, pooled: bool = False):
    """The frozen backbone that the features in `meta` (features/meta.json) came from: image in, map (or pooled
    top vector) out."""
    return backbones.build_base(meta["name"], meta["weights"], meta["image_size"], meta["cut_layer"], pooled=pooled)


def main(argv=None) -> int:
    prm = params.load()
    bb, p = prm.backbone, prm.extract
    meta = io.read_json(paths.CACHE_DIR / "meta.json")
    size = meta["image_size"]
    with tracking.stage_run("extract", {"backbone": bb.model_dump(), "extract": p.model_dump()}) as run:
        dev = device.detect()
        print(f"device: {dev}")
        base = backbones.build_extractor(bb.name, bb.weights, size, bb.cut_layer)
        shapes, pooled_shapes = {}, {}
        with io.atomic_dir(paths.FEATURES_DIR) as out:  # every split's files, meta and index appear together
            for split in paths.SPLITS:
                images, labels = io.load_pair(paths.CACHE_DIR / split)
                features, pooled = extract(base, images, p.batch_size, p.dtype, desc=f"extract {split}")
                assert len(features) == len(pooled) == len(labels) == len(images), f"{split}: misaligned features"
                io.save_pair(out / split, features, labels)
                io.save_npy(out / f"{split}_pooled.npy", pooled)
                shapes[split], pooled_shapes[split] = list(features.shape), list(pooled.shape)
            info = {**backbones.describe(bb.name, bb.weights, bb.cut_layer, size), "dtype": p.dtype, "shapes": shapes,
                    "pooled_layer": backbones.spec(bb.name).top_layer, "pooled_shapes": pooled_shapes, "classes": meta["classes"],
                    "device": dev.kind}
            io.write_json(out / "meta.json", info)
            io.write_text(out / "index.csv", (paths.CACHE_DIR / "index.csv").read_text())
        if run:
            run.log_params({"label": info["label"], "cut_layer": info["cut_layer"], "device": dev.kind})
    print(f"extract: {info['label']} at {info['cut_layer']}: " + ", ".join(f"{s} {v}" for s, v in shapes.items())
          + f"; {info['pooled_layer']} pooled: {pooled_shapes['train'][1]} values per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
