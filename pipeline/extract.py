"""Extract stage: bottleneck features of the frozen backbone, one `.npy` per split, aligned row by row with the
cached labels.

The seeds' version called `predict_generator(steps=n // batch)` on an unshuffled generator: the last partial batch
was dropped and labels were rebuilt by assumption. Here every row is run, in order, and the counts are asserted.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline import backbones, device, io, params, paths, tracking


def extract(base, images: np.ndarray, batch_size: int, dtype: str = "float16", desc: str = "extract") -> np.ndarray:
    """Run `base` over uint8 images (N,S,S,3) in batches; returns (N, *feature_shape) in `dtype`."""
    out = np.empty((len(images), *base.output_shape[1:]), dtype)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        batch = np.asarray(images[start:start + batch_size], dtype=np.float32)
        out[start:start + len(batch)] = np.asarray(base.predict_on_batch(batch))
    return out


def load_features(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of one split, as this stage wrote them (read into memory)."""
    return io.load_pair(paths.FEATURES_DIR / split, mmap=False)


def main(argv=None) -> int:
    prm = params.load()
    bb, p = prm.backbone, prm.extract
    meta = io.read_json(paths.CACHE_DIR / "meta.json")
    size = meta["image_size"]
    with tracking.stage_run("extract", {"backbone": bb.model_dump(), "extract": p.model_dump()}) as run:
        dev = device.detect()
        print(f"device: {dev}")
        base = backbones.build_base(bb.name, bb.weights, size, bb.cut_layer)
        shapes = {}
        with io.atomic_dir(paths.FEATURES_DIR) as out:  # every split's pair, meta and index appear together
            for split in paths.SPLITS:
                images, labels = io.load_pair(paths.CACHE_DIR / split)
                features = extract(base, images, p.batch_size, p.dtype, desc=f"extract {split}")
                assert len(features) == len(labels) == len(images), f"{split}: features and labels are misaligned"
                io.save_pair(out / split, features, labels)
                shapes[split] = list(features.shape)
            info = {**backbones.describe(bb.name, bb.weights, bb.cut_layer, size), "dtype": p.dtype, "shapes": shapes,
                    "classes": meta["classes"], "device": dev.kind}
            io.write_json(out / "meta.json", info)
            io.write_text(out / "index.csv", (paths.CACHE_DIR / "index.csv").read_text())
        if run:
            run.log_params({"label": info["label"], "cut_layer": info["cut_layer"], "device": dev.kind})
    print(f"extract: {info['label']} at {info['cut_layer']}: " + ", ".join(f"{s} {v}" for s, v in shapes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
