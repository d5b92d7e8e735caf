"""Head stage: a classifier trained on the cached bottleneck features, its design chosen on validation.

Designs (`candidates`): a small convolutional detector on the standardised feature map (or plain global pooling
with `conv_filters: 0`), max- and average-pooled, trained on randomly flipped maps and averaged over the same
flips (`models.flip_axes`), with or without vertical flips; or a dense layer on the backbone's top map pooled to
a vector. The extract stage stored both kinds of features in one pass; `head.design: auto` and
`head.vertical_flip: auto` train every candidate and keep the one with the best validation accuracy (ties: lower
validation log loss). Fine cracks on solar cells want the map; whole objects in photos the pooled top; whether a
flip keeps the label is the data's business. Each: balanced class weights, shuffled batches, seeded;
EarlyStopping, ModelCheckpoint on the best val_loss and ReduceLROnPlateau.

It writes the image-in model `models/head.keras` (the frozen backbone, the head and the flip averaging in one file,
see `pipeline.models`) with its JSON (the chosen `design`, the threshold chosen on validation), every candidate's
validation scores (`metrics/head_designs.json`), validation and test probabilities, the history and learning
curves. Bagging, kfold and finetune follow the chosen design.
"""
from __future__ import annotations

from pipeline import curves, device, features, heads, io, lineage, models, params, paths, predictions, tracking


def main(argv=None) -> int:
    prm = params.load()
    with tracking.stage_run("head", {"head": prm.head.model_dump(), "seed": prm.seed}) as run:
        meta = io.read_json(paths.FEATURES_DIR / "meta.json")
        n_classes = len(meta["classes"])
        print(f"device: {device.detect()}")
        loaded = {pooled: {s: features.load_features(s, pooled) for s in paths.SPLITS} for pooled in (False, True)}
        tried = []
        for p in heads.candidates(prm.head):  # every design judged on validation only; test is scored, never read
            data = loaded[p.design == "pooled"]
            model, history, probs = heads.fit_design(p, data, n_classes, prm.seed, verbose=0)
            scores = models.validation_scores(data["val"][1], probs["val"])
            tried.append((p, model, history, probs, scores))
            print(f"head design {heads.design_name(p)}: val accuracy {scores['accuracy']:.4f}, "
                  f"val log loss {scores['log_loss']:.4f} ({len(history)} epochs)")
        p, head, history, probs, scores = max(tried, key=lambda t: models.choice_key(t[4]))
        data = loaded[p.design == "pooled"]
        print(f"head: chose {heads.design_name(p)} on validation" + (f" among {len(tried)} designs" if len(tried) > 1 else ""))
        # the flips that keep the label, for fine-tuning: those of the chosen map design or, for the pooled top
        # (flips do not apply to a vector), those of the best map design tried, when one was
        maps = [t for t in tried if t[0].design == "map"]
        flips_from = p if p.design == "map" or not maps else max(maps, key=lambda t: models.choice_key(t[4]))[0]
        design = {"features": p.design, "layer": meta["pooled_layer"] if p.design == "pooled" else meta["cut_layer"],
                  "horizontal_flip": flips_from.horizontal_flip, "vertical_flip": flips_from.vertical_flip,
                  "chosen_by": models.CHOICE_RULE}
        io.write_json(paths.METRICS / "head_designs.json", {
            "chosen": heads.design_name(p), "designs": [{"design": heads.design_name(q), **{f"val_{k}": v for k, v in s.items()},
                                                   "epochs": len(h)} for q, _, h, _, s in tried]})
        flips = heads.flips_of(p)
        model = models.compose(features.features_model(meta, pooled=p.design == "pooled"), [head], map_flips=flips,
                               name="head")
        models.save(model, "head", models.meta_for(
            "head", classes=meta["classes"], threshold=scores["threshold"], image_size=meta["image_size"],
            backbone=heads.backbone_of(meta), image_flips=[()], map_flips=flips, lineage=lineage.describe("head"),
            feature_shape=list(data["train"][0].shape[1:]), design=design))
        predictions.save("head", meta["classes"], (probs["val"], data["val"][1]), (probs["test"], data["test"][1]))
        plots = curves.save(history, "head", run, y_train=data["train"][1])
        tracking.log_history(run, history)
        tracking.log_files(run, models.meta_path("head"), paths.METRICS / "head_designs.json", *plots)
        if run:
            run.log_params({"chosen_design": heads.design_name(p)})
            run.log_metrics({f"design_{i}_val_accuracy": t[4]["accuracy"] for i, t in enumerate(tried)})
    best = history.loc[history["val_loss"].idxmin()]
    print(f"head: best epoch {int(best['epoch'])}, val_loss {best['val_loss']:.4f}, val_accuracy {best['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
