"""Predict with a trained model: `python -m pipeline.predict --model models/finetune.keras IMAGE_OR_FOLDER...`

Every model file the pipeline hands over is image-in (`pipeline.models`): backbone, preprocessing and flip
averaging are inside it; the JSON beside it gives the image size, the classes and the decision threshold chosen on
validation. Prints (or writes with --out) a CSV of path, probability, label.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tqdm import tqdm

from pipeline import io, models
from pipeline.images import load_rgb
from pipeline.inventory import IMAGE_EXTENSIONS


def image_files(inputs) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(f for f in item.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} not found: pass image files or folders of images")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, inputs))}")
    return files


def predict(model_file: Path, inputs, threshold: float | None = None, batch_size: int = 32) -> pd.DataFrame:
    files = image_files(inputs)
    model, meta = models.load(str(model_file))
    if meta.get("input") != "images":
        raise ValueError(f"{model_file} takes {meta.get('input')}, not images: pass an image-in model such as "
                         f"models/head.keras, models/finetune.keras or models/bagging.keras")
    t = models.threshold_of(meta) if threshold is None else threshold
    probs = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=len(files) <= batch_size):
        batch = np.stack([load_rgb(str(f), meta["image_size"]) for f in files[start:start + batch_size]])
        probs.append(models.predict(model, batch, batch_size))
    return pd.concat([pd.DataFrame({"path": map(str, files)}), models.table(np.concatenate(probs), meta["classes"], t)],
                     axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a model file: models/head.keras, models/finetune.keras, models/bagging.keras")
    ap.add_argument("--threshold", type=float, help="decision threshold (default: the one chosen by cross-validation, in the JSON beside the model)")
    ap.add_argument("--out", type=Path, help="write the CSV here instead of printing it")
    ap.add_argument("inputs", nargs="+", help="image files or folders")
    args = ap.parse_args(argv)
    try:
        table = predict(args.model, args.inputs, args.threshold)
    except (FileNotFoundError, ValueError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    if args.out:
        io.write_csv(args.out, table)
    else:
        table.to_csv(sys.stdout, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
