"""Ensemble stage: the bagging members that `bagging.members` names, behind their frozen backbones (one, or one per
entry of `bagging.backbones`), as the image-in model `models/bagging.keras` (mean of the members' probabilities,
each averaged over its flips; `pipeline.models`).

Exactly the members params name are read: a member dropped from params is not averaged in, even if its files are
still on disk. The threshold is chosen on the validation probabilities of the mean, like every model's.
"""
from __future__ import annotations

import numpy as np

from pipeline import bagging, extract, head, io, lineage, models, params, paths, predictions, tracking

NAME = "bagging"


def combine(members: list[dict]) -> dict:
    """The mean of the members' prediction files ({val_prob, val_y, test_prob, test_y, classes})."""
    predictions.same_rows({f"bagging member {i}": m for i, m in enumerate(members)})
    out = {k: members[0][k] for k in ("val_y", "test_y", "classes")}
    for split in ("val", "test"):
        out[f"{split}_prob"] = np.mean([m[f"{split}_prob"] for m in members], axis=0)
    return out


def load_member_predictions(member: int) -> dict:
    return predictions.load(bagging.member_name(member), f"bagging member {member} (bagging.members in "
                                  f"params.yaml) has not been trained; run `dvc repro bagging@{member}`")


def main(argv=None) -> int:
    prm = params.load()
    members = list(prm.bagging.members)
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    with tracking.stage_run("ensemble", {"members": members}) as run:
        pred = combine([load_member_predictions(m) for m in members])  # names a member that was never trained
        groups, flips, pooled = {}, None, False  # backbone -> heads, in the members' order
        for m in members:
            model, member_meta = models.load(bagging.member_name(m))
            b = member_meta["backbone"]["name"]  # as the member was trained
            groups.setdefault(None if b == meta["name"] else b, []).append(model)
            flips = [tuple(a) for a in member_meta["tta_flips"]["features"]]
            pooled = member_meta["design"]["features"] == "pooled"
        parts = [(extract.features_model(io.read_json(extract.features_dir(b) / "meta.json"), pooled), heads)
                 for b, heads in groups.items()]
        model = models.compose(*parts[0], more=parts[1:], map_flips=flips, name=NAME)
        backbones = [head.backbone_of(io.read_json(extract.features_dir(b) / "meta.json")) for b in groups]
        models.save(model, NAME, models.meta_for(
            NAME, classes=meta["classes"], threshold=models.choose_threshold(pred["val_y"], pred["val_prob"]),
            image_size=meta["image_size"], backbone=backbones[0], image_flips=[()], map_flips=flips,
            lineage=lineage.describe("ensemble"), members=[bagging.member_name(m) for m in members],
            backbones=backbones))
        predictions.save(NAME, meta["classes"], (pred["val_prob"], pred["val_y"]), (pred["test_prob"], pred["test_y"]))
        tracking.log_files(run, models.meta_path(NAME))
    print(f"ensemble: {len(members)} bagging members on {len(groups)} backbone(s) -> {models.path(NAME)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
