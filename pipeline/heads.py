"""Building and training a head: the classifier on a backbone's features that the cv, head, bagging and ensemble
stages train; its candidate designs (`head.designs`) as recipes, and the recipe the choose stage chose by
cross-validation (`data/cv/recipe.json`)."""
from __future__ import annotations

import keras
import numpy as np

from pipeline import io, models, paths, predictions, train
from pipeline.params import Head


class Recipe(Head):
    """A head's params with its design decided: the features it reads and the flips it trains on and averages over."""
    design: str = "map_h"
    features: str = "map"  # map | pooled
    horizontal_flip: bool = True
    vertical_flip: bool = False


def recipe(p: Head, design: str, **update) -> Recipe:
    """The head params `p` as design `design` (one of `params.DESIGNS`): pooled, map, map_h or map_hv."""
    return Recipe(**{**p.model_dump(), "design": design, "features": "pooled" if design == "pooled" else "map",
                     "horizontal_flip": design in ("map_h", "map_hv"), "vertical_flip": design == "map_hv", **update})


def build(input_shape, n_classes: int, p: Recipe, name: str = "head", stats=None) -> keras.Model:
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


def train_head(train_xy, val_xy, n_classes: int, p: Recipe, seed: int, name: str = "head", epochs: int | None = None,
               callbacks=(), verbose: int = 2):
    """Fit a fresh head on (features, labels) pairs; returns the model and its history. With `val_xy`, the weights
    of the best val_loss (early stopping); without, exactly `epochs` epochs (a refit)."""
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


def flips_of(p: Recipe) -> tuple[tuple[int, ...], ...]:
    """The feature-map flips design `p` trains on and averages over (`models.flip_axes`); none for the pooled top."""
    return models.flip_axes(p) if p.features == "map" else ((),)


def chosen(p: Head) -> Recipe:
    """The recipe the choose stage chose by cross-validation (`data/cv/recipe.json`): the design, and the epoch count
    a refit on all of train+val trains for."""
    if not paths.RECIPE.exists():
        raise FileNotFoundError(f"{paths.RECIPE} not found: run `dvc repro choose`")
    r = io.read_json(paths.RECIPE)
    return recipe(p, r["design"], epochs=r["epochs"])


def inner_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to fit, rows to stop early on): a tenth of a fold's training rows watched by early stopping, never the
    rows the fold holds out."""
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, n // 10)
    return np.sort(order[cut:]), np.sort(order[:cut])


def cross_fit(x, y, train_rows: np.ndarray, held: np.ndarray, n_classes: int, p: Recipe, seed: int,
              name: str = "head"):
    """Train recipe `p` on `train_rows` of (x, y), a tenth of them held back for early stopping (`inner_split`), and
    predict the `held` rows it never saw: (probabilities, history, rows fitted). What the cv stage does per fold."""
    fit, stop = (train_rows[r] for r in inner_split(len(train_rows), seed))
    model, history = train_head((x[fit], y[fit]), (x[stop], y[stop]), n_classes, p, seed, name=name, verbose=0)
    return predictions.probabilities(model, x[held], flips=flips_of(p)), history, len(fit)
