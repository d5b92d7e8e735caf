"""Export stage: the model evaluate delivered, for TF Serving and for phones and boards, with measured parity.

From the delivered model (`metrics/evaluate.json`: `selected`), in `exports/`:

- `model_float16.tflite`: TFLite with float16 weights (float32 in and out);
- `model_int8.tflite`: full-integer TFLite: every op int8, uint8 pixels in and uint8 probabilities out, its ranges
  calibrated on `export.calibration_images` training images (a seeded draw from the cache);
- beside each `.tflite` its JSON (the delivered model's: classes, threshold, image size), so that
  `python -m pipeline.predict --model exports/model_int8.tflite IMAGES` runs it;
- `metrics/export.json`: per format (the `.keras` file, the SavedModel, both TFLite files), the size and, on the
  validation and the test images, accuracy, balanced accuracy, the share of labels that agree with the Keras model
  and the largest difference in a probability.

The TFLite files are converted from the SavedModel (`models.export_saved_model`) that the registry logs beside
every registered version for TF Serving. That SavedModel is scored here from a temporary folder: TensorFlow writes
its variables in an order that changes from run to run, so its bytes cannot be a DVC output; the TFLite files'
bytes are the same on every run. Latency depends on the machine, not the model, so it is not in `metrics/export.json` (which
must be the same on every machine): `make bench` measures it per format (bench/results.json, README).
The registry logs these files and figures with the version it registers (`pipeline.registry`), which this stage
calls when registering is on, as the last step of the pipeline.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import images, io, models, params, paths, registry, selection, tracking

FORMATS = ("keras", "saved_model", "tflite_float16", "tflite_int8")
FILES = {"saved_model": "saved_model", "tflite_float16": "model_float16.tflite", "tflite_int8": "model_int8.tflite"}


def convert(saved_model: Path, kind: str, calibration: np.ndarray | None = None) -> bytes:
    """TFLite bytes of a SavedModel: `float16` weights, or full-integer `int8` calibrated on `calibration` images."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    else:
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


def export(model, meta: dict, out: Path, saved_model: Path, calibration: np.ndarray) -> dict[str, Path]:
    """Write the model as a SavedModel to `saved_model`, and both TFLite files (with their JSON) as the folder `out`,
    whole or not at all; {format: path}."""
    models.export_saved_model(model, saved_model)
    with io.atomic_dir(out) as tmp:
        for fmt in ("tflite_float16", "tflite_int8"):
            file = tmp / FILES[fmt]
            file.write_bytes(convert(saved_model, fmt.removeprefix("tflite_"), calibration))
            io.write_json(file.with_suffix(".json"), {**meta, "format": fmt,
                                                      "exported_from": f"{meta['name']}{models.SUFFIX}"})
    return {"saved_model": saved_model, **{f: out / FILES[f] for f in FILES if f != "saved_model"}}


def saved_model_predict(loaded, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities of a loaded SavedModel's `serve` endpoint, as `models.predict` gives them."""
    import tensorflow as tf

    prob = np.concatenate([loaded.serve(tf.constant(images[i:i + batch_size], tf.float32)).numpy()
                           for i in range(0, len(images), batch_size)]).astype(np.float64)
    return prob[:, 0] if prob.shape[1] == 1 else prob


def parity(reference: np.ndarray, prob: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """One format's figures on one split against the Keras model's probabilities (`reference`)."""
    pred = models.labels(prob, threshold)
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": selection.balanced_accuracy(y, pred),
            "agreement": float((pred == models.labels(reference, threshold)).mean()),
            "max_abs_probability_difference": round(float(np.abs(prob - reference).max()), 6), "n": int(len(y))}


def size(path: Path) -> int:
    """Bytes of a file, or of a SavedModel folder without `fingerprint.pb` (hashes of the rest, whose encoded length
    changes from export to export)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "fingerprint.pb")


def score(model, meta: dict, files: dict[str, Path], threads: int) -> dict:
    """{format: {"bytes", "val": figures, "test": figures}} for the Keras model and each exported file."""
    import tensorflow as tf

    t = models.threshold_of(meta)
    saved = tf.saved_model.load(str(files["saved_model"]))  # held: its endpoint needs the variables it owns
    lite = {fmt: models.load(str(files[fmt]), threads)[0] for fmt in ("tflite_float16", "tflite_int8")}
    sizes = {"keras": size(models.path(meta["name"])), **{f: size(file) for f, file in files.items()}}
    result = {f: {"bytes": int(sizes[f])} for f in FORMATS}
    for split in ("val", "test"):
        x, y = io.load_pair(paths.CACHE_DIR / split)
        x = np.asarray(x)
        reference = models.predict(model, x)
        probs = {"keras": reference, "saved_model": saved_model_predict(saved, x)}
        for fmt, interpreter in lite.items():
            probs[fmt] = np.concatenate([models.predict(interpreter, x[i:i + 32]) for i in
                                         tqdm(range(0, len(x), 32), desc=f"export: {fmt} on {split}", unit="batch")])
        for fmt, prob in probs.items():
            result[fmt][split] = parity(reference, prob, y, t)
    return result


def main(argv=None) -> int:
    prm = params.load()
    name = io.read_json(paths.METRICS / "evaluate.json")["selected"]
    with tracking.stage_run("export", {"model": name, **prm.export.model_dump()}) as run, \
            tempfile.TemporaryDirectory() as tmp:
        model, meta = models.load(name)
        files = export(model, meta, paths.EXPORTS, Path(tmp) / "saved_model",
                       images.sample(paths.CACHE_DIR, "train", prm.export.calibration_images, prm.seed))
        result = {"model": name, "formats": score(model, meta, files, prm.export.threads)}
        io.write_json(paths.METRICS / "export.json", result)
        if run:
            run.log_metrics({f"{fmt}_{split}_{k}": v for fmt, r in result["formats"].items() for split in ("val", "test")
                             for k, v in r[split].items() if k != "n"})
            run.log_metrics({f"{fmt}_bytes": r["bytes"] for fmt, r in result["formats"].items()})
    for fmt, r in result["formats"].items():
        print(f"export {fmt:15s} {r['bytes'] / 2 ** 20:6.2f} MiB  test accuracy {r['test']['accuracy']:.4f}  "
              f"agreement {r['test']['agreement']:.4f}  max |Δp| {r['test']['max_abs_probability_difference']:.4f}")
    if tracking.registering():
        print(registry.register(if_better=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
