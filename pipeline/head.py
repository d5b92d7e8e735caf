"""Head stage: the chosen recipe refit on all of train+val, as the image-in model people get.

The choose stage picked the design (and the threshold, and the epoch count) by cross-validation; this stage trains
that design on every train+val row for exactly that many epochs, with nothing held back: no early stopping, no
choice left to make. It writes the image-in model `models/head.keras` (the frozen backbone, the head and the flip
averaging in one file, see `pipeline.models`) with its JSON (design, threshold, the rows it trained on), the
recipe's out-of-fold probabilities beside the model's test probabilities (`data/predictions/head.npz`; evaluate
reads the test ones, once, for the report), the history and learning curves.
"""
from __future__ import annotations

import numpy as np

from pipeline import curves, features, heads, io, lineage, models, params, paths, predictions, tracking


def main(argv=None) -> int:
    prm = params.load()
    p = heads.chosen(prm.head)
    recipe = io.read_json(paths.RECIPE)
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    pooled = p.features == "pooled"
    x, y, folds = features.train_val(pooled)
    with tracking.stage_run("head", {"head": p.model_dump(), "seed": prm.seed}) as run:
        head, history = heads.train_head((x, y), None, len(meta["classes"]), p, prm.seed,
                                         callbacks=[tracking.keras_callback(run)], verbose=0)
        flips = heads.flips_of(p)
        test_x, test_y = features.load_features("test", pooled)  # predicted for the report; chooses nothing
        model = models.compose(features.features_model(meta, pooled=pooled), [head], map_flips=flips, name="head")
        design = {"name": p.design, "features": p.features, "layer": meta["pooled_layer"] if pooled else meta["cut_layer"],
                  "horizontal_flip": p.horizontal_flip, "vertical_flip": p.vertical_flip, "epochs": p.epochs,
                  "chosen_by": recipe["chosen_by"]}
        models.save(model, "head", models.meta_for(
            "head", classes=meta["classes"], threshold=recipe["threshold"], image_size=meta["image_size"],
            backbone=heads.backbone_of(meta), image_flips=[()], map_flips=flips, lineage=lineage.describe("head"),
            feature_shape=list(x.shape[1:]), design=design, trained_on={"splits": ["train", "val"], "rows": int(len(y))}))
        oof = predictions.out_of_fold(f"designs/{p.design}", folds, prm.cv.folds)
        used = np.isin(folds, prm.cv.folds)  # the rows of the folds params name
        predictions.save("head", meta["classes"], (oof[used], y[used], folds[used]),
                         (predictions.probabilities(head, test_x, flips=flips), test_y))
        tracking.log_files(run, models.meta_path("head"), *curves.save(history, "head", run, y_train=y))
    print(f"head: {p.design} refit on {len(y)} train+val rows for {p.epochs} epochs -> {models.path('head')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
