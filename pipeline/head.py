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

import keras
import numpy as np

from pipeline import curves, device, extract, io, lineage, models, params, paths, predictions, tracking, train
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


# ------------------------------------------------------------------------------------------------ designs

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


def main(argv=None) -> int:
    prm = params.load()
    with tracking.stage_run("head", {"head": prm.head.model_dump(), "seed": prm.seed}) as run:
        meta = io.read_json(paths.FEATURES_DIR / "meta.json")
        n_classes = len(meta["classes"])
        print(f"device: {device.detect()}")
        features = {pooled: {s: extract.load_features(s, pooled) for s in paths.SPLITS} for pooled in (False, True)}
        tried = []
        for p in candidates(prm.head):  # every design judged on validation only; test is scored, never read
            data = features[p.design == "pooled"]
            model, history, probs = fit_design(p, data, n_classes, prm.seed, verbose=0)
            scores = models.validation_scores(data["val"][1], probs["val"])
            tried.append((p, model, history, probs, scores))
            print(f"head design {design_name(p)}: val accuracy {scores['accuracy']:.4f}, "
                  f"val log loss {scores['log_loss']:.4f} ({len(history)} epochs)")
        p, head, history, probs, scores = max(tried, key=lambda t: models.choice_key(t[4]))
        data = features[p.design == "pooled"]
        print(f"head: chose {design_name(p)} on validation" + (f" among {len(tried)} designs" if len(tried) > 1 else ""))
        # the flips that keep the label, for fine-tuning: those of the chosen map design or, for the pooled top
        # (flips do not apply to a vector), those of the best map design tried, when one was
        maps = [t for t in tried if t[0].design == "map"]
        flips_from = p if p.design == "map" or not maps else max(maps, key=lambda t: models.choice_key(t[4]))[0]
        design = {"features": p.design, "layer": meta["pooled_layer"] if p.design == "pooled" else meta["cut_layer"],
                  "horizontal_flip": flips_from.horizontal_flip, "vertical_flip": flips_from.vertical_flip,
                  "chosen_by": models.CHOICE_RULE}
        io.write_json(paths.METRICS / "head_designs.json", {
            "chosen": design_name(p), "designs": [{"design": design_name(q), **{f"val_{k}": v for k, v in s.items()},
                                                   "epochs": len(h)} for q, _, h, _, s in tried]})
        flips = flips_of(p)
        model = models.compose(extract.features_model(meta, pooled=p.design == "pooled"), [head], map_flips=flips,
                               name="head")
        models.save(model, "head", models.meta_for(
            "head", classes=meta["classes"], threshold=scores["threshold"], image_size=meta["image_size"],
            backbone=backbone_of(meta), image_flips=[()], map_flips=flips, lineage=lineage.describe("head"),
            feature_shape=list(data["train"][0].shape[1:]), design=design))
        predictions.save("head", meta["classes"], (probs["val"], data["val"][1]), (probs["test"], data["test"][1]))
        plots = curves.save(history, "head", run, y_train=data["train"][1])
        tracking.log_history(run, history)
        tracking.log_files(run, models.meta_path("head"), paths.METRICS / "head_designs.json", *plots)
        if run:
            run.log_params({"chosen_design": design_name(p)})
            run.log_metrics({f"design_{i}_val_accuracy": t[4]["accuracy"] for i, t in enumerate(tried)})
    best = history.loc[history["val_loss"].idxmin()]
    print(f"head: best epoch {int(best['epoch'])}, val_loss {best['val_loss']:.4f}, val_accuracy {best['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
