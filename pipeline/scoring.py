"""Batch scoring with the registry's champion: `python -m pipeline.scoring --folder FOLDER` (the work of the
`score_new_images` DAG).

1. The images of FOLDER (recursively) whose content (SHA-256) was not scored or skipped before are the batch.
2. The model is the version the registry's alias `champion` points at (`models:/<tracking.register_as>@champion`),
   loaded as its pyfunc: whichever version `register` or a person moved the alias to, never "the latest".
3. Each image is decoded as the pipeline decodes (`images.load_rgb`); one that cannot be is skipped with its reason
   and listed (`data/scored/skipped.csv`), never fatal.
4. `data/scored/predictions.csv` gains a row per image: file (relative to FOLDER), folder, sha256, label, every
   class's probability, model version, time (UTC). Written atomically; earlier rows are never rewritten.
5. What the batch looked like, logged to MLflow (experiment `<tracking.experiment>-scoring`, one run per batch, with
   the batch's rows as an artifact): counts per predicted class, the share of low-confidence predictions (top-class
   probability below `score.low_confidence`), and the drift figure (`pipeline.drift`) against the training
   reference stored with the version, next to `score.drift_threshold` (judged for batches of at least
   `score.drift_min_images`: in a smaller one it is mostly sampling noise).

The last line printed is the batch's summary as JSON (the DAG's XCom); its `check_drift` task fails when the drift
is above the threshold, so a person looks at the batch before its predictions are trusted.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import inventory, io, params, paths, tracking
from pipeline.inventory import IMAGE_EXTENSIONS

PREDICTIONS = paths.SCORED / "predictions.csv"
SKIPPED = paths.SCORED / "skipped.csv"
HASH_MEMO = paths.SCORED / ".hashes.json"  # (size, mtime) -> sha256 of the files seen: an unchanged file is not reread


def new_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, sha256) of the images under `folder` (symlinks leading out of it not followed) whose content was
    neither scored nor skipped before."""
    seen = set()
    for table in (PREDICTIONS, SKIPPED):
        if table.exists():
            seen |= set(pd.read_csv(table, usecols=["sha256"])["sha256"])
    rows = inventory.listing(folder, content=True, memo=HASH_MEMO, root=folder)
    return [(folder / r["path"], r["state"]) for r in rows if Path(r["path"]).suffix.lower() in IMAGE_EXTENSIONS
            and r["state"] not in (inventory.OUTSIDE_ROOT, "missing") and r["state"] not in seen]


def decode(files: list[tuple[Path, str]], size: int) -> tuple[list[tuple[Path, str]], np.ndarray, list[dict]]:
    """(the files that decoded, their images, [{file, sha256, reason}] of those that did not)."""
    from pipeline.images import load_rgb

    good, arrays, bad = [], [], []
    for f, h in tqdm(files, desc="score: decode", unit="img", disable=len(files) < 64):
        try:
            arrays.append(load_rgb(f, size))
            good.append((f, h))
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, whatever the decoder says
            bad.append({"file": f, "sha256": h, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
    return good, (np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)), bad


def append(path: Path, rows: pd.DataFrame) -> None:
    """Add rows to a CSV table atomically (the old rows first, as they were)."""
    if rows.empty:
        return
    old = pd.read_csv(path) if path.exists() else None
    io.write_csv(path, rows if old is None else pd.concat([old, rows], ignore_index=True))


def score(folder: Path, prm: params.Params) -> dict:
    """Score the new images of `folder` with the champion; returns the batch's summary."""
    from pipeline import drift, registry

    mlflow, client, _ = tracking.setup(prm.tracking)
    version = registry.champion(client, prm.tracking.register_as)
    if version is None:
        raise LookupError(f"no version of '{prm.tracking.register_as}' has the alias '{registry.CHAMPION}': run the "
                          f"pipeline (`make run`) or `python -m pipeline.registry register` first")
    number = str(version.version)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{prm.tracking.register_as}/{number}")
    classifier = pyfunc.unwrap_python_model()
    meta = classifier.meta
    todo = new_files(folder)
    good, x, bad = decode(todo, meta["image_size"])
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table = classifier.classify(x) if len(x) else pd.DataFrame(columns=["probability", "label"])
    rows = pd.DataFrame({"file": [f.relative_to(folder).as_posix() for f, _ in good], "folder": str(folder),
                         "sha256": [h for _, h in good]})
    rows = pd.concat([rows, table.reset_index(drop=True)], axis=1).assign(model_version=number, scored_at=now)
    skipped = pd.DataFrame([{**b, "file": b["file"].relative_to(folder).as_posix(), "folder": str(folder),
                             "model_version": number, "scored_at": now} for b in bad],
                           columns=["file", "folder", "sha256", "reason", "model_version", "scored_at"])
    probs = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    low = float((probs.max(1) < prm.score.low_confidence).mean()) if len(probs) else 0.0
    drift_value = None
    if len(x):
        try:
            ref = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{drift.ARTIFACT}")
            drift_value = drift.distance(ref, drift.pooled(classifier.model, x))
        except Exception as e:  # noqa: BLE001 - a version registered before references were stored
            print(f"score: version {number} has no training reference ({type(e).__name__}); drift not measured")
    summary = {"folder": str(folder), "model_version": number, "scored": len(good), "skipped": len(bad),
               "skipped_files": skipped["file"].tolist(), "counts": rows["label"].value_counts().to_dict(),
               "low_confidence_share": low, "drift": drift_value, "drift_threshold": prm.score.drift_threshold,
               "drift_judged": drift_value is not None and len(good) >= prm.score.drift_min_images}
    summary["drift_above_threshold"] = summary["drift_judged"] and drift_value > prm.score.drift_threshold
    append(PREDICTIONS, rows)
    append(SKIPPED, skipped)
    scoring = prm.tracking.model_copy(update={"experiment": f"{prm.tracking.experiment}-scoring"})
    mlflow, _, exp_id = tracking.setup(scoring)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"score {folder.name} {now}",
                          tags={"role": "score", "model_version": number,
                                "drift": "above_threshold" if summary["drift_above_threshold"] else "ok"}):
        mlflow.log_params({"folder": str(folder), "model_version": number,
                           "low_confidence": prm.score.low_confidence, "drift_threshold": prm.score.drift_threshold})
        mlflow.log_metrics({"scored": len(good), "skipped": len(bad), "low_confidence_share": low,
                            **{f"count_{c}": int(n) for c, n in summary["counts"].items()},
                            **({"drift": drift_value} if drift_value is not None else {})})
        mlflow.log_table(rows.astype({"model_version": str}), "batch/predictions.json")
        if len(skipped):
            mlflow.log_table(skipped, "batch/skipped.json")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.scoring", description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, help="the folder of images to score (default: params.yaml score.inbox)")
    args = ap.parse_args(argv)
    prm = params.load()
    folder = (args.folder or Path(prm.score.inbox)).expanduser()
    if not folder.is_dir():
        print(f"score: folder '{folder}' not found: put the images to score there, or trigger with "
              f"{{\"folder\": \"/path/to/images\"}} (params.yaml score.inbox)", file=sys.stderr)
        return 2
    try:
        summary = score(folder.resolve(), prm)
    except LookupError as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    drift = "not measured" if summary["drift"] is None else f"{summary['drift']:.3f}" + (
        "" if summary["drift_judged"] else f", not judged: under {prm.score.drift_min_images} images")
    print(f"score: {summary['scored']} new images scored by version {summary['model_version']}, "
          f"{summary['skipped']} skipped; low-confidence {summary['low_confidence_share']:.1%}; drift {drift} "
          f"(threshold {summary['drift_threshold']}) -> {PREDICTIONS}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
