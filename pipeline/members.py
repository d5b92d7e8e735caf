"""The bagging members: their names, the backbone each trains on, and their predictions, alone and averaged. The
bagging stage trains them, the ensemble stage puts them together, evaluate scores them."""
from __future__ import annotations

import numpy as np

from pipeline import params, predictions


def member_name(member: int) -> str:
    return f"bagging/member_{member}"


def member_backbone(prm: params.Params, member: int) -> str | None:
    """The backbone member `member` trains on: None for `backbone.name` (features in `data/features`), else the
    name of one of `bagging.backbones` (features in `data/features_by_backbone/<name>`, `features.features_dir`)."""
    names = prm.bagging.backbones
    name = names[member % len(names)] if names else prm.backbone.name
    return None if name == prm.backbone.name else name


def combine(loaded: list[dict]) -> dict:
    """The mean of the members' prediction files ({val_prob, val_y, test_prob, test_y, classes})."""
    predictions.same_rows({f"bagging member {i}": m for i, m in enumerate(loaded)})
    out = {k: loaded[0][k] for k in ("val_y", "test_y", "classes")}
    for split in ("val", "test"):
        out[f"{split}_prob"] = np.mean([m[f"{split}_prob"] for m in loaded], axis=0)
    return out


def load_predictions(member: int) -> dict:
    return predictions.load(member_name(member), f"bagging member {member} (bagging.members in "
                                  f"params.yaml) has not been trained; run `dvc repro bagging@{member}`")
