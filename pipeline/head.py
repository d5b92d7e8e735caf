"""Head stage: a classifier trained on the cached bottleneck feature maps.

A small convolutional detector on the standardised map (or plain global pooling), max- and average-pooled,
dropout and a sigmoid (softmax for more than two classes); the maps are randomly flipped while training and the
predictions averaged over the same flips (`train.flip_axes`). Balanced class weights, shuffled batches, seeded;
EarlyStopping, ModelCheckpoint on the best val_loss and ReduceLROnPlateau.

It writes the image-in model `models/head.keras` (the frozen backbone, the head and the flip averaging in one file,
see `pipeline.models`) with its JSON (threshold chosen on validation), validation and test probabilities, the
history and learning curves.
"""
from __future__ import annotations

import keras

from pipeline import backbones, io, lineage, models, params, paths, tracking, train
from pipeline.params import Head


def train_head(train_xy, val_xy, n_classes: int, p: Head, seed: int, name: str = "head", epochs: int | None = None,
               callbacks=(), verbose: int = 2):
    """Fit a fresh head on (features, labels) pairs; returns the model (best val_loss weights) and its history."""
    keras.utils.set_random_seed(seed)
    head = train.build_head(train_xy[0].shape[1:], n_classes, p, name, stats=train.feature_stats(train_xy[0]))
    model = train.compile_for(head, n_classes, p.learning_rate)
    history = train.fit(model, train_xy, val_xy, epochs=epochs or p.epochs, batch_size=p.batch_size,
                        patience=p.patience, class_weight=train.class_weights(train_xy[1], n_classes, p.class_weight),
                        extra_callbacks=callbacks, verbose=verbose)
    return model, history


def backbone_of(meta: dict) -> dict:
    """The backbone part of a features meta.json, as model JSONs record it."""
    return {k: meta[k] for k in ("name", "label", "weights", "cut_layer")}


def features_model(meta: dict):
    """The frozen backbone the features in `meta` (features/meta.json) came from."""
    return backbones.build_base(meta["name"], meta["weights"], meta["image_size"], meta["cut_layer"])


def main(argv=None) -> int:
    prm = params.load()
    with tracking.stage_run("head", {"head": prm.head.model_dump(), "seed": prm.seed}) as run:
        meta = io.read_json(paths.FEATURES_DIR / "meta.json")
        data = {s: train.load_features(s) for s in paths.SPLITS}
        n_classes = train.n_classes_of(meta)
        train.device()
        head, history = train_head(data["train"], data["val"], n_classes, prm.head, prm.seed,
                                   callbacks=[tracking.keras_callback(run)])
        flips = train.flip_axes(prm.head)
        probs = {s: train.probabilities(head, data[s][0], flips=flips) for s in ("val", "test")}
        model = models.compose(features_model(meta), [head], map_flips=flips, name="head")
        models.save(model, "head", models.meta_for(
            "head", classes=meta["classes"], threshold=models.choose_threshold(data["val"][1], probs["val"]),
            image_size=meta["image_size"], backbone=backbone_of(meta), image_flips=[()], map_flips=flips,
            lineage=lineage.describe("head"), feature_shape=list(data["train"][0].shape[1:])))
        train.save_predictions("head", meta["classes"], (probs["val"], data["val"][1]), (probs["test"], data["test"][1]))
        plots = train.save_history(history, "head", run, y_train=data["train"][1])
        tracking.log_files(run, models.meta_path("head"), *plots)
    best = history.loc[history["val_loss"].idxmin()]
    print(f"head: best epoch {int(best['epoch'])}, val_loss {best['val_loss']:.4f}, val_accuracy {best['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
