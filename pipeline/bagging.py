"""Bagging stage, one DVC stage instance per member: a head trained on a bootstrap resample of the training
features, saved as `models/bagging/member_<i>.keras` (a head on feature maps) with its JSON, predictions and
history. Member i trains on the features of `bagging.backbones[i % len]` (`backbone.name` when the list is
empty): diversity from seeds, resamples and backbones. The `ensemble` stage puts the members that params name
behind their backbones as `models/bagging.keras`.
"""
from __future__ import annotations

import argparse

import numpy as np

from pipeline import curves, features, heads, io, lineage, members, models, params, paths, predictions, tracking


def bootstrap(n: int, fraction: float, seed: int) -> np.ndarray:
    """Row indices drawn with replacement: round(fraction * n) of them."""
    return np.random.default_rng(seed).integers(0, n, size=max(1, round(fraction * n)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bagging")
    ap.add_argument("--member", type=int, required=True, help="the member's seed (one of bagging.members)")
    member = ap.parse_args(argv).member
    prm = params.load()
    root = features.features_dir(members.member_backbone(prm, member))
    meta = io.read_json(root / "meta.json")
    p = heads.chosen(prm.head)  # the design the head stage chose on validation
    data = {s: features.load_features(s, pooled=p.design == "pooled", root=root) for s in paths.SPLITS}
    seed = prm.seed + 1000 * (member + 1)
    rows = np.sort(bootstrap(len(data["train"][1]), prm.bagging.sample_fraction, seed))
    section = {"head": p.model_dump(), "sample_fraction": prm.bagging.sample_fraction, "member": member,
               "backbone": meta["name"]}
    name = members.member_name(member)
    with tracking.stage_run(f"bagging@{member}", section) as run:
        model, history = heads.train_head((data["train"][0][rows], data["train"][1][rows]), data["val"],
                                         len(meta["classes"]), p, seed, name=f"member_{member}",
                                         callbacks=[tracking.keras_callback(run)], verbose=0)
        flips = heads.flips_of(p)
        probs = {s: predictions.probabilities(model, data[s][0], flips=flips) for s in ("val", "test")}
        models.save(model, name, {
            "name": name, "input": "features", "classes": meta["classes"], "member": member, "seed": seed,
            "threshold": models.choose_threshold(data["val"][1], probs["val"]), "image_size": meta["image_size"],
            "backbone": heads.backbone_of(meta), "tta_flips": {"image": [[]], "features": [list(a) for a in flips]},
            "lineage": lineage.describe(f"bagging@{member}"), "unique_rows": int(len(np.unique(rows))),
            "design": models.read_meta("head")["design"]})
        predictions.save(name, meta["classes"], (probs["val"], data["val"][1]), (probs["test"], data["test"][1]))
        tracking.log_files(run, models.meta_path(name), *curves.save(history, name, run, data["train"][1][rows]))
        if run:
            run.log_metric("unique_rows", len(np.unique(rows)))
    print(f"bagging member {member} ({meta['label']}): {len(np.unique(rows))} unique of {len(rows)} resampled rows, "
          f"{len(history)} epochs, best val_loss {history['val_loss'].min():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
