"""Ensemble stage: the bagging members that `bagging.members` names, behind their frozen backbones (one, or one per
entry of `bagging.backbones`), as the image-in model `models/bagging.keras` (mean of the members' probabilities,
each averaged over its flips; `pipeline.models`).

Exactly the members params name are read: a member dropped from params is not averaged in, even if its files are
still on disk. The threshold is chosen on the validation probabilities of the mean, like every model's.
"""
from __future__ import annotations

import numpy as np

from pipeline import features, heads, io, lineage, members, models, params, paths, predictions, tracking

NAME = "bagging"


def main(argv=None) -> int:
    prm = params.load()
    chosen = list(prm.bagging.members)
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    with tracking.stage_run("ensemble", {"members": chosen}) as run:
        pred = members.combine([members.load_predictions(m) for m in chosen])  # names a member that was never trained
        groups, flips, pooled = {}, None, False  # backbone -> heads, in the members' order
        for m in chosen:
            model, member_meta = models.load(members.member_name(m))
            b = member_meta["backbone"]["name"]  # as the member was trained
            groups.setdefault(None if b == meta["name"] else b, []).append(model)
            flips = [tuple(a) for a in member_meta["tta_flips"]["features"]]
            pooled = member_meta["design"]["features"] == "pooled"
        metas = [meta if b is None else io.read_json(features.features_dir(b) / "meta.json") for b in groups]
        parts = [(features.features_model(m, pooled), trained) for m, trained in zip(metas, groups.values())]
        model = models.compose(*parts[0], more=parts[1:], map_flips=flips, name=NAME)
        backbones = [heads.backbone_of(m) for m in metas]
        models.save(model, NAME, models.meta_for(
            NAME, classes=meta["classes"], threshold=models.choose_threshold(pred["val_y"], pred["val_prob"]),
            image_size=meta["image_size"], backbone=backbones[0], image_flips=[()], map_flips=flips,
            lineage=lineage.describe("ensemble"), members=[members.member_name(m) for m in chosen],
            backbones=backbones))
        predictions.save(NAME, meta["classes"], (pred["val_prob"], pred["val_y"]), (pred["test_prob"], pred["test_y"]))
        tracking.log_files(run, models.meta_path(NAME))
    print(f"ensemble: {len(chosen)} bagging members on {len(groups)} backbone(s) -> {models.path(NAME)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
