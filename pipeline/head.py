"""Head stage: a classifier trained on the cached bottleneck feature maps.

A small convolutional detector on the standardised map (or plain global pooling), max- and average-pooled,
dropout and a sigmoid (softmax for more than two classes); the maps are randomly flipped while training and the
predictions averaged over the same flips (`models.flip_axes`). Balanced class weights, shuffled batches, seeded;
EarlyStopping, ModelCheckpoint on the best val_loss and ReduceLROnPlateau.

It writes the image-in model `models/head.keras` (the frozen backbone, the head and the flip averaging in one file,
see `pipeline.models`) with its JSON (threshold chosen on validation), validation and test probabilities, the
history and learning curves.
"""
from __future__ import annotations

import keras
import numpy as np

from pipeline import backbones, curves, device, extract, io, lineage, models, params, paths, predictions, tracking, train
from pipeline.params import Head


def build(input_shape, n_classes: int, p: Head, name: str = "head", stats=None) -> keras.Model:
    """A classifier on the backbone's features, sigmoid for 2 classes, softmax for more.

    On a feature map (H, W, C): per-channel standardisation (`stats` = (mean, variance) of the training features),
    random flips of the map while training (as `horizontal_flip` / `vertical_flip`), then either `conv_layers` 3x3
    convolutions of `conv_filters` (a small detector for local defects, max- and average-pooled over the map) or,
    with `conv_filters: 0`, global average pooling. Then dropout, an optional dense layer of `hidden` units,
    dropout and the output. A flat (D,) feature vector skips the map-only parts."""
    inputs = keras.Input(input_shape, name=f"{name}_features")
    x = inputs
    if stats is not None:
        x = keras.layers.Normalization(mean=stats[0], variance=stats[1], name=f"{name}_standardise")(x)
    if len(input_shape) == 3:
        mode = "_and_".join(m for m, on in (("horizontal", p.horizontal_flip), ("vertical", p.vertical_flip)) if on)
        if mode:
            x = keras.layers.RandomFlip(mode, name=f"{name}_flip")(x)
        if p.conv_filters:
            x = keras.layers.SpatialDropout2D(0.1, name=f"{name}_map_dropout")(x)
            for i in range(p.conv_layers):
                if i:
                    x = keras.layers.MaxPooling2D(2, padding="same", name=f"{name}_pool{i}")(x)
                x = keras.layers.Conv2D(p.conv_filters, 3, padding="same", activation="relu", name=f"{name}_conv{i + 1}")(x)
            x = keras.layers.Concatenate(name=f"{name}_pool")([keras.layers.GlobalMaxPooling2D(name=f"{name}_max")(x),
                                                               keras.layers.GlobalAveragePooling2D(name=f"{name}_avg")(x)])
        else:
            x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    if p.hidden:
        x = keras.layers.Dropout(p.dropout, name=f"{name}_dropout_in")(x)
        x = keras.layers.Dense(p.hidden, activation="relu", name=f"{name}_dense")(x)
    x = keras.layers.Dropout(p.dropout, name=f"{name}_dropout")(x)
    units, act = (1, "sigmoid") if n_classes == 2 else (n_classes, "softmax")
    outputs = keras.layers.Dense(units, activation=act, name=f"{name}_output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def feature_stats(x: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis) mean and variance of features, in float64 chunks (float16 input stays small)."""
    total, sq, n = 0.0, 0.0, 0
    for start in range(0, len(x), chunk):
        a = np.asarray(x[start:start + chunk], np.float64).reshape(-1, x.shape[-1])
        total, sq, n = total + a.sum(0), sq + (a * a).sum(0), n + len(a)
    mean = total / n
    return mean.astype(np.float32), np.maximum(sq / n - mean * mean, 1e-6).astype(np.float32)


def train_head(train_xy, val_xy, n_classes: int, p: Head, seed: int, name: str = "head", epochs: int | None = None,
               callbacks=(), verbose: int = 2):
    """Fit a fresh head on (features, labels) pairs; returns the model (best val_loss weights) and its history."""
    keras.utils.set_random_seed(seed)
    head = build(train_xy[0].shape[1:], n_classes, p, name, stats=feature_stats(train_xy[0]))
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
        data = {s: extract.load_features(s) for s in paths.SPLITS}
        n_classes = len(meta["classes"])
        print(f"device: {device.detect()}")
        head, history = train_head(data["train"], data["val"], n_classes, prm.head, prm.seed,
                                   callbacks=[tracking.keras_callback(run)])
        flips = models.flip_axes(prm.head)
        probs = {s: predictions.probabilities(head, data[s][0], flips=flips) for s in ("val", "test")}
        model = models.compose(features_model(meta), [head], map_flips=flips, name="head")
        models.save(model, "head", models.meta_for(
            "head", classes=meta["classes"], threshold=models.choose_threshold(data["val"][1], probs["val"]),
            image_size=meta["image_size"], backbone=backbone_of(meta), image_flips=[()], map_flips=flips,
            lineage=lineage.describe("head"), feature_shape=list(data["train"][0].shape[1:])))
        predictions.save("head", meta["classes"], (probs["val"], data["val"][1]), (probs["test"], data["test"][1]))
        plots = curves.save(history, "head", run, y_train=data["train"][1])
        tracking.log_files(run, models.meta_path("head"), *plots)
    best = history.loc[history["val_loss"].idxmin()]
    print(f"head: best epoch {int(best['epoch'])}, val_loss {best['val_loss']:.4f}, val_accuracy {best['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
