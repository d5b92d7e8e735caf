"""Predict with a trained model: `python -m pipeline.predict --model models/finetune.keras IMAGE_OR_FOLDER...`

Uses the preprocessing the model was trained with, read from the JSON beside it (backbone, weights, cut layer,
image size, classes), and the decision threshold the evaluate stage chose on validation. Prints (or writes with
--out) a CSV of path, probability, label.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import io, paths
from pipeline.cache import load_rgb
from pipeline.sources import IMAGE_EXTENSIONS


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


def load(model_file: Path):
    """The model as a callable on float images giving P(class 1) (N,) or (N, C), and its metadata. The predictions
    are averaged over the flips the model was trained with (`tta_flips`), as the stages did."""
    import keras

    from pipeline import augment, backbones, train  # noqa: F401 - augment registers its layer for loading

    meta_file = model_file.with_suffix(".json")
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} not found: it is written beside the model by the stage that trained it")
    meta = io.read_json(meta_file)
    model = keras.saving.load_model(model_file, compile=False)
    flips = tuple(tuple(a) for a in meta.get("tta_flips", [[]]))
    if meta["input"] == "features":  # a head: put the frozen backbone in front of it
        base = backbones.build_base(meta["name"], meta["weights"], meta["image_size"], meta["cut_layer"])
        return (lambda x: train.probabilities(model, base.predict(x, verbose=0), flips=flips)), meta
    return (lambda x: train.probabilities(model, x, flips=flips)), meta


def threshold_for(model_file: Path, given: float | None) -> float:
    if given is not None:
        return given
    metrics = paths.METRICS / "evaluate.json"
    chosen = io.read_json(metrics).get(model_file.stem, {}).get("threshold") if metrics.exists() else None
    return 0.5 if chosen is None or math.isnan(chosen) else float(chosen)  # NaN: argmax models have none


def predict(model_file: Path, inputs, threshold: float | None = None, batch_size: int = 32) -> pd.DataFrame:
    run, meta = load(model_file)
    files, classes, t = image_files(inputs), meta["classes"], threshold_for(model_file, threshold)
    probs = []
    for start in range(0, len(files), batch_size):
        batch = np.stack([load_rgb(str(f), meta["image_size"]) for f in files[start:start + batch_size]])
        probs.append(np.asarray(run(batch.astype(np.float32)), np.float64))
    prob = np.concatenate(probs)
    if prob.ndim == 1:
        p1 = prob
        return pd.DataFrame({"path": map(str, files), "probability": p1.round(6),
                             "label": [classes[int(v >= t)] for v in p1]})
    return pd.DataFrame({"path": map(str, files), "probability": prob.max(1).round(6),
                         "label": [classes[i] for i in prob.argmax(1)]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a .keras file written by head or finetune")
    ap.add_argument("--threshold", type=float, help="decision threshold (default: the one evaluate chose)")
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
