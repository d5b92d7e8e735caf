"""Bagging stage, one DVC stage instance per member: a head trained on a bootstrap resample of the training
features. The evaluate stage combines the members by mean probability and reports each member and the ensemble.
"""
from __future__ import annotations

import argparse

import numpy as np

from pipeline import head, io, params, paths, tracking, train


def bootstrap(n: int, fraction: float, seed: int) -> np.ndarray:
    """Row indices drawn with replacement: round(fraction * n) of them."""
    return np.random.default_rng(seed).integers(0, n, size=max(1, round(fraction * n)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bagging")
    ap.add_argument("--member", type=int, required=True, help="the member's seed (one of bagging.members)")
    member = ap.parse_args(argv).member
    prm = params.load()
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    data = {s: train.load_features(s) for s in paths.SPLITS}
    seed = prm.seed + 1000 * (member + 1)
    rows = np.sort(bootstrap(len(data["train"][1]), prm.bagging.sample_fraction, seed))
    section = {"head": prm.head.model_dump(), "sample_fraction": prm.bagging.sample_fraction, "member": member}
    with tracking.stage_run(f"bagging@{member}", section) as run:
        model, history = head.train_head((data["train"][0][rows], data["train"][1][rows]), data["val"],
                                         train.n_classes_of(meta), prm.head, seed, name=f"member_{member}",
                                         callbacks=[tracking.keras_callback(run)], verbose=0)
        probs = {s: train.probabilities(model, data[s][0], flips=train.flip_axes(prm.head)) for s in ("val", "test")}
        with io.atomic_path(paths.MODELS / "bagging" / f"member_{member}.keras", suffix=".keras") as tmp:
            model.save(tmp)
        train.save_predictions(f"bagging/member_{member}", meta["classes"], (probs["val"], data["val"][1]),
                               (probs["test"], data["test"][1]))
        if run:
            run.log_metric("unique_rows", len(np.unique(rows)))
    print(f"bagging member {member}: {len(np.unique(rows))} unique of {len(rows)} resampled rows, "
          f"{len(history)} epochs, best val_loss {history['val_loss'].min():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
