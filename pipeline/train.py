"""Keras training pieces shared by head, finetune, bagging and kfold: the dense head, the fit loop with its
callbacks, class weights, predictions, learning curves and model files with their metadata."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import augment, io, paths  # noqa: E402
from pipeline.params import Head  # noqa: E402


def device() -> str:
    """'GPU' when the Keras backend sees one, else 'CPU'; printed so every stage's log says where it ran."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    elif backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    else:
        gpus = []
    name = "GPU" if gpus else "CPU"
    print(f"device: {name} ({backend} backend)")
    return name


def load_features(split: str) -> tuple[np.ndarray, np.ndarray]:
    return io.load_pair(paths.FEATURES_DIR / split, mmap=False)


def n_classes_of(meta: dict) -> int:
    return len(meta["classes"])


def flip_axes(p) -> tuple[tuple[int, ...], ...]:
    """The flips a model is trained to ignore, as tuples of axes of a (N, H, W, C) batch: always the identity,
    then left-right (axis 2), up-down (axis 1) and both, as `p.horizontal_flip` / `p.vertical_flip` enable
    (`p` is the `Head` or the fine-tune's `Augment` params). `probabilities` averages over them."""
    out = [()]
    if p.horizontal_flip:
        out.append((2,))
    if p.vertical_flip:
        out.append((1,))
    if p.horizontal_flip and p.vertical_flip:
        out.append((1, 2))
    return tuple(out)


def build_head(input_shape, n_classes: int, p: Head, name: str = "head", stats=None) -> keras.Model:
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


def compile_for(model: keras.Model, n_classes: int, learning_rate: float) -> keras.Model:
    loss = "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
    return model


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> dict | None:
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=n_classes)
    return {k: len(y) / (n_classes * c) if c else 0.0 for k, c in enumerate(counts)}


class Batches(keras.utils.PyDataset):
    """float32 batches from uint8 images (memory-mapped or not), reshuffled every epoch when `shuffle`.

    With `augment` (a `params.Augment`), every image of a batch is warped on the CPU by `augment.warp_uint8`
    with fresh random draws (the loader-side twin of the in-model `augment.Augment` layer)."""

    def __init__(self, images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, weights=None, steps=None,
                 augment=None, fill_mode: str = "nearest", flip: tuple[int, ...] = ()):
        super().__init__()
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.weights = None if weights is None else np.array([weights[k] for k in labels], np.float32)
        self.rng, self.order, self.steps = np.random.default_rng(seed), np.arange(len(labels)), steps
        self.augment, self.fill_mode, self.flip = augment, fill_mode, flip
        self.on_epoch_end()

    def __len__(self):
        n = -(-len(self.labels) // self.batch_size)
        return min(n, self.steps) if self.steps else n

    def __getitem__(self, i):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted reads from the mmap
        x = np.asarray(self.images[rows])
        if self.augment is not None:
            m = augment.random_matrices(len(x), self.augment, x.shape[1], x.shape[2], self.rng)
            x = augment.warp_uint8(x, m, self.fill_mode)
        x = x.astype(np.float32)
        batch = (np.flip(x, self.flip) if self.flip else x, self.labels[rows])
        return batch if self.weights is None else (*batch, self.weights[rows])

    def flipped(self, axes: tuple[int, ...]) -> "Batches":
        """The same batches (same order, no labels' weights) with every image flipped along `axes`."""
        return Batches(self.images, self.labels, self.batch_size, steps=self.steps, flip=axes)

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)


def fit(model, train, val, *, epochs, batch_size, patience, class_weight=None, extra_callbacks=(), verbose=2):
    """Shuffled every epoch; keeps the weights of the best val_loss (ModelCheckpoint), stops early, lowers the LR.

    `train`/`val` are (x, y) arrays or `Batches`."""
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.weights.h5"
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience),
            keras.callbacks.ModelCheckpoint(str(best), monitor="val_loss", save_best_only=True, save_weights_only=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, patience // 3)),
            *extra_callbacks,
        ]
        if isinstance(train, tuple):
            history = model.fit(*train, validation_data=val, epochs=epochs, batch_size=batch_size, shuffle=True,
                                class_weight=class_weight, callbacks=callbacks, verbose=verbose)
        else:
            history = model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=verbose)
        if best.exists():
            model.load_weights(best)
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame


def probabilities(model, x, batch_size: int = 64, flips=((),)) -> np.ndarray:
    """P(class 1) as (N,) for two classes, else (N, C); x is an array or `Batches`.

    With `flips` (see `flip_axes`), the mean over those flipped copies of every input (test-time augmentation)."""
    if isinstance(x, Batches):
        runs = [model.predict(x.flipped(axes), verbose=0) for axes in flips]
    else:
        runs = [model.predict(np.flip(x, axes) if axes else x, batch_size=batch_size, verbose=0) for axes in flips]
    prob = np.mean([np.asarray(r, dtype=np.float64) for r in runs], axis=0)
    return prob[:, 0] if prob.shape[1] == 1 else prob


def load_predictions(name: str, fix: str = "rerun `dvc repro`") -> dict:
    """{val_prob, val_y, test_prob, test_y, classes} that `save_predictions` wrote for model `name`."""
    file = paths.PREDICTIONS_DIR / f"{name}.npz"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {fix}")
    with np.load(file) as f:
        return dict(f)


def same_rows(predictions: dict[str, dict]) -> None:
    """Every prediction file must hold the same validation and test rows (the current split): predictions from
    different splits can be neither averaged nor compared."""
    names = list(predictions)
    for name in names[1:]:
        for split in ("val_y", "test_y"):
            if not np.array_equal(predictions[name][split], predictions[names[0]][split]):
                raise ValueError(f"the predictions of {name} and {names[0]} hold different {split.split('_')[0]} "
                                 f"rows: they come from different splits; rerun `dvc repro`")


def save_predictions(name: str, classes, val: tuple, test: tuple) -> None:
    target = paths.PREDICTIONS_DIR / f"{name}.npz"
    with io.atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, val_prob=val[0], val_y=val[1], test_prob=test[0], test_y=test[1], classes=np.array(classes))


def save_history(history: pd.DataFrame, stage: str, run=None, y_train=None) -> list:
    """history.csv (for `dvc plots`) and learning_curves.png (loss and accuracy per epoch); the diagnosis of the
    curves (`pipeline.diagnose`) is printed and, with an MLflow `run`, set as its tags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline import diagnose

    findings = diagnose.diagnose(history, None if y_train is None else diagnose.majority_share(y_train))
    for f in findings:
        print(f"diagnosis {stage}: {f.line()}")
    if run is not None:
        run.set_tags(diagnose.tags(findings))

    out = paths.PLOTS / stage
    io.write_csv(out / "history.csv", history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(history["epoch"], history[key], style, marker="o", label=key)
        ax.set(xlabel="epoch", title=f"{stage}: {metric}")
        ax.legend()
    fig.tight_layout()
    return [out / "history.csv", io.save_figure(fig, out / "learning_curves.png")]
