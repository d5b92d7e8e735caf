"""Building and training a head: the classifier on a backbone's features that the head, bagging and kfold stages
train, its candidate designs and the design the head stage chose (`models/head.json`)."""
from __future__ import annotations

import keras
import numpy as np

from pipeline import models, predictions, train
from pipeline.params import Head


def build(input_shape, n_classes: int, p: Head, name: str = "head", stats=None) -> keras.Model:
    """A classifier on the backbone's features, sigmoid for 2 classes, softmax for more.

    On a feature map (H, W, C): per-channel standardisation (`stats` = (mean, variance) of the training features),
    random flips of the map while training (as `horizontal_flip` / `vertical_flip`), then either `conv_layers` 3x3
    convolutions of `conv_filters` (a small detector for local defects, max- and average-pooled over the map) or,
    with `conv_filters: 0`, global average pooling. Then dropout, an optional dense layer of `hidden` units,
    dropout and the output. A flat (D,) feature vector skips the map-only parts."""
    if p.vertical_flip == "auto":
        raise ValueError("head.build takes decided flips: resolve `vertical_flip: auto` first (head.candidates)")
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
    train.seed(seed)
    head = build(train_xy[0].shape[1:], n_classes, p, name, stats=feature_stats(train_xy[0]))
    model = train.compile_for(head, n_classes, p.learning_rate)
    history = train.fit(model, train_xy, val_xy, epochs=epochs or p.epochs, batch_size=p.batch_size,
                        patience=p.patience, class_weight=train.class_weights(train_xy[1], n_classes, p.class_weight),
                        extra_callbacks=callbacks, verbose=verbose)
    return model, history


def backbone_of(meta: dict) -> dict:
    """The backbone part of a features meta.json, as model JSONs record it."""
    return {k: meta[k] for k in ("name", "label", "weights", "cut_layer")}


def candidates(p: Head) -> list[Head]:
    """The head designs to try, each as fully resolved params: `design: auto` tries the convolutional head on the
    finer map and the pooled top; `vertical_flip: auto` tries the map head with and without vertical flips (a
    solar cell upside down is still a solar cell, a cat is not). The pooled top is a vector: flips do not apply."""
    designs = ["map", "pooled"] if p.design == "auto" else [p.design]
    out = []
    for d in designs:
        flips = [False, True] if p.vertical_flip == "auto" and d == "map" else [p.vertical_flip is True]
        out += [p.model_copy(update={"design": d, "vertical_flip": v}) for v in flips]
    return out


def flips_of(p: Head) -> tuple[tuple[int, ...], ...]:
    """The feature-map flips design `p` trains on and averages over (`models.flip_axes`); none for the pooled top."""
    return models.flip_axes(p) if p.design == "map" else ((),)


def design_name(p: Head) -> str:
    flips = "+".join(f for f, on in (("h", p.horizontal_flip), ("v", p.vertical_flip)) if on) or "none"
    return f"{p.design}" + (f" (flips {flips})" if p.design == "map" else "")


def chosen(p: Head) -> Head:
    """The head stage's chosen design (models/head.json) as resolved params: what bagging and kfold train."""
    d = models.read_meta("head")["design"]
    return p.model_copy(update={"design": d["features"], "vertical_flip": d["vertical_flip"],
                                "horizontal_flip": d["horizontal_flip"]})


def fit_design(p: Head, data: dict, n_classes: int, seed: int, verbose: int = 2):
    """Train a head of design `p` on its kind of features; (model, history, {split: probabilities}) with the
    probabilities averaged over the design's flips for the validation and test splits."""
    model, history = train_head(data["train"], data["val"], n_classes, p, seed, verbose=verbose)
    flips = flips_of(p)
    return model, history, {s: predictions.probabilities(model, data[s][0], flips=flips) for s in ("val", "test")}
