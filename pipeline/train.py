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

from pipeline import io, paths  # noqa: E402
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


def build_head(input_shape, n_classes: int, p: Head, name: str = "head") -> keras.Model:
    """Pooling, dropout, dense, dropout, then sigmoid (2 classes) or softmax (more)."""
    inputs = keras.Input(input_shape, name=f"{name}_features")
    x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(inputs) if len(input_shape) == 3 else inputs
    if p.hidden:
        x = keras.layers.Dropout(p.dropout, name=f"{name}_dropout_in")(x)
        x = keras.layers.Dense(p.hidden, activation="relu", name=f"{name}_dense")(x)
    x = keras.layers.Dropout(p.dropout, name=f"{name}_dropout")(x)
    units, act = (1, "sigmoid") if n_classes == 2 else (n_classes, "softmax")
    outputs = keras.layers.Dense(units, activation=act, name=f"{name}_output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


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
    """float32 batches from uint8 images (memory-mapped or not), reshuffled every epoch when `shuffle`."""

    def __init__(self, images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, weights=None, steps=None):
        super().__init__()
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.weights = None if weights is None else np.array([weights[k] for k in labels], np.float32)
        self.rng, self.order, self.steps = np.random.default_rng(seed), np.arange(len(labels)), steps
        self.on_epoch_end()

    def __len__(self):
        n = -(-len(self.labels) // self.batch_size)
        return min(n, self.steps) if self.steps else n

    def __getitem__(self, i):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted reads from the mmap
        batch = (np.asarray(self.images[rows], np.float32), self.labels[rows])
        return batch if self.weights is None else (*batch, self.weights[rows])

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


def probabilities(model, x, batch_size: int = 64) -> np.ndarray:
    """P(class 1) as (N,) for two classes, else (N, C); x is an array or `Batches`."""
    if isinstance(x, Batches):
        prob = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    else:
        prob = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    return prob[:, 0] if prob.shape[1] == 1 else prob


def save_predictions(name: str, classes, val: tuple, test: tuple) -> None:
    target = paths.PREDICTIONS_DIR / f"{name}.npz"
    with io.atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, val_prob=val[0], val_y=val[1], test_prob=test[0], test_y=test[1], classes=np.array(classes))


def save_model(model: keras.Model, name: str, meta: dict) -> None:
    with io.atomic_path(paths.MODELS / f"{name}.keras", suffix=".keras") as tmp:
        model.save(tmp)
    io.write_json(paths.MODELS / f"{name}.json", meta)


def save_history(history: pd.DataFrame, stage: str) -> list:
    """history.csv (for `dvc plots`) and learning_curves.png (loss and accuracy per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with io.atomic_path(out / "learning_curves.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return [out / "history.csv", out / "learning_curves.png"]
