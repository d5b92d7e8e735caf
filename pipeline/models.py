"""Model files: where a model lives, how it is composed, saved and loaded, and how its probabilities become labels.

Every model the pipeline can hand over (head, finetune, the bagging ensemble, any later ensemble) is one image-in
Keras file, `models/<name>.keras`: raw RGB pixels (uint8 or float 0..255, shape (N, S, S, 3), any batch) in,
class probabilities out ((N, 1) sigmoid for two classes, (N, C) softmax otherwise). Inside, always the same shape:

    image --[Flip(a) for each test-time image flip a]--> features --> classifier --> mean over the flips

- `features`: the backbone up to its cut layer, preprocessing included (a nested model named "features");
- `classifier`: a nested model from the feature map to probabilities; it averages over the feature-map flips the
  head was trained with and, for an ensemble, over its members.

Beside it, `models/<name>.json`: classes, the decision threshold chosen by cross-validation, image size, backbone,
flips, and the data and code it came from (`pipeline.lineage`). Heads on features (the cv and bagging stages'
fold models) are never saved: their predictions are what choosing needs.

Everything else (head, finetune, ensemble, evaluate, tracking, predict, serving) calls this module instead
of building paths or loading files on its own.
"""
from __future__ import annotations

from pathlib import Path

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from pipeline import io, paths  # noqa: E402

SUFFIX = ".keras"
TFLITE = ".tflite"  # the export stage's files: `load` and `predict` take them like a .keras file


# ------------------------------------------------------------------------------------------------ decisions

def labels(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices from probabilities: P(class 1) >= threshold for two classes, argmax for more."""
    prob = np.asarray(prob)
    return (prob >= threshold).astype(int) if prob.ndim == 1 else prob.argmax(1)


def choose_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold with the best balanced accuracy (mean of the two classes' recalls; ties: the one nearest 0.5)
    on these rows; NaN (argmax) for several classes."""
    prob = np.asarray(prob)
    if prob.ndim > 1:
        return float("nan")
    candidates = np.unique(np.concatenate([prob, [0.5]]))
    called = prob[None, :] >= candidates[:, None]  # (threshold, row): called positive
    recalls = [(called[:, y == c] == bool(c)).mean(1) for c in np.unique(y)]
    score = np.mean(recalls, 0)
    best = candidates[score == score.max()]
    return float(best[np.argmin(np.abs(best - 0.5))])


def flip_axes(p) -> tuple[tuple[int, ...], ...]:
    """The flips a model is trained to ignore, as tuples of axes of a (N, H, W, C) batch: always the identity,
    then left-right (axis 2), up-down (axis 1) and both, as `p.horizontal_flip` / `p.vertical_flip` enable
    (`p` is the `Head` or the fine-tune's `Augment` params). Predictions average over them (`compose`,
    `predictions.probabilities`)."""
    if not all(isinstance(f, bool) for f in (p.horizontal_flip, p.vertical_flip)):
        raise ValueError(f"flips must be decided (true or false), got {p.horizontal_flip!r}, {p.vertical_flip!r}")
    out = [()]
    if p.horizontal_flip:
        out.append((2,))
    if p.vertical_flip:
        out.append((1,))
    if p.horizontal_flip and p.vertical_flip:
        out.append((1, 2))
    return tuple(out)


def threshold_of(meta: dict) -> float:
    """The recorded decision threshold (0.5 when none, or NaN for an argmax model)."""
    t = meta.get("threshold")
    return 0.5 if t is None or (isinstance(t, float) and np.isnan(t)) else float(t)


# ------------------------------------------------------------------------------------------------ files

def path(name: str) -> Path:
    """`models/<name>.keras` for a model name such as 'head' or 'bagging/member_0'; a path (.keras, .tflite) is
    returned as is."""
    p = Path(name)
    return p if p.suffix in (SUFFIX, TFLITE) else paths.MODELS / f"{name}{SUFFIX}"


def meta_path(name: str) -> Path:
    return path(name).with_suffix(".json")


def read_meta(name: str) -> dict:
    file = meta_path(name)
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: it is written beside the model by the stage that trained it "
                                f"(rerun that stage, e.g. `dvc repro`)")
    return io.read_json(file)


def custom_objects() -> dict:
    """Every custom layer a model file of this project may hold."""
    from pipeline import augment, backbones

    return {"Flip": Flip, "Augment": augment.Augment, **backbones.custom_objects()}


def save(model, name: str, meta: dict) -> Path:
    """Write the model and its JSON atomically (the JSON last, so a reader never sees new metadata on an old model).
    The same model gives the same bytes (`_same_bytes`), so DVC and its run-cache see the same model everywhere."""
    target = path(name)
    with io.atomic_path(target, suffix=SUFFIX) as tmp:
        model.save(tmp)
        _same_bytes(tmp)
    io.write_json(meta_path(name), meta)
    return target


def _same_bytes(file: Path) -> None:
    """Rewrite a `.keras` zip without what the clock and the process put in it: Keras stamps the weights entry with
    the time of writing and `metadata.json` with `date_saved`, and numbers the objects layers share (a dtype policy)
    by their memory address (`shared_object_id`); these are renumbered in order of appearance."""
    import json
    import zipfile

    ids: dict = {}

    def renumber(node):
        if isinstance(node, dict):
            return {k: ids.setdefault(v, len(ids) + 1) if k == "shared_object_id" else renumber(v)
                    for k, v in node.items()}
        return [renumber(v) for v in node] if isinstance(node, list) else node

    with zipfile.ZipFile(file) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(file, "w") as z:
        for info, data in entries:
            if info.filename == "metadata.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "date_saved"}).encode()
            elif info.filename == "config.json":
                data = json.dumps(renumber(json.loads(data))).encode()
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data,
                       compress_type=info.compress_type)


class TFLite:
    """A `.tflite` file behind the `predict` of a Keras model: pixels (uint8 or float 0..255, (N, S, S, 3)) in,
    probabilities out. A full-integer file's uint8 input and output are quantized and dequantized here with the
    file's own scale and zero point. One image per invoke, on `threads` threads."""

    def __init__(self, file: Path, threads: int = 1):
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(model_path=str(file), num_threads=threads)
        self.input, self.output = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        self.interpreter.resize_tensor_input(self.input["index"], [1, *self.input["shape"][1:]])
        self.interpreter.allocate_tensors()

    def predict(self, images, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        dtype, out = self.input["dtype"], []
        for image in np.asarray(images):
            x = image[None].astype(np.float32)
            if dtype != np.float32:
                scale, zero = self.input["quantization"]
                x = np.clip(np.round(x / scale + zero), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
            self.interpreter.set_tensor(self.input["index"], x)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])[0]
            if self.output["dtype"] != np.float32:
                scale, zero = self.output["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            out.append(y)
        return np.stack(out).astype(np.float32)


def inference_copy(model):
    """The model with its training-only random layers (`RandomFlip`, `Dropout`: the identity at inference) as
    `Identity`, sharing every other layer and weight: TFLite has no kernel for their random ops."""
    random = (keras.layers.RandomFlip, keras.layers.Dropout, keras.layers.SpatialDropout1D,
              keras.layers.SpatialDropout2D, keras.layers.GaussianNoise, keras.layers.GaussianDropout)

    def swap(layer):
        return keras.layers.Identity(name=layer.name) if isinstance(layer, random) else layer

    return keras.models.clone_model(model, clone_function=swap, recursive=True)


def export_saved_model(model, directory: Path) -> Path:
    """The image-in model as a TensorFlow SavedModel (for TF Serving): endpoint `serve`, float32 pixels (N, S, S, 3)
    in 0..255, probabilities out, as `predict` gives them. What the TFLite files are converted from."""
    inference_copy(model).export(str(directory), format="tf_saved_model", verbose=False)
    return Path(directory)


def load(name: str, threads: int = 1):
    """(model, meta) for a model name, a `.keras` path or a `.tflite` path (run on `threads` threads); the model is
    ready to `predict` (not compiled)."""
    file = path(name)
    meta = read_meta(str(file))
    if not file.exists():
        raise FileNotFoundError(f"{file} not found beside {meta_path(str(file))}: rerun the stage that trains it")
    try:
        model = TFLite(file, threads) if file.suffix == TFLITE else \
            keras.saving.load_model(file, custom_objects=custom_objects(), compile=False)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        kind = "TFLite" if file.suffix == TFLITE else "Keras"
        raise ValueError(f"{file} cannot be loaded as a {kind} model ({str(e).splitlines()[0][:200]}): "
                         f"rerun the stage that wrote it") from None
    return model, meta


def meta_for(name: str, *, classes, threshold: float, image_size: int, backbone: dict, image_flips, map_flips,
             lineage: dict, **extra) -> dict:
    """The JSON beside an image-in model (one layout for every model)."""
    return {"name": name, "input": "images", "classes": list(classes), "threshold": threshold,
            "image_size": image_size, "backbone": backbone,
            "tta_flips": {"image": [list(a) for a in image_flips], "features": [list(a) for a in map_flips]},
            "lineage": lineage, **extra}


# ------------------------------------------------------------------------------------------------ composition

@keras.saving.register_keras_serializable(package="pipeline")
class Flip(keras.layers.Layer):
    """Flip a (N, H, W, C) batch along `axes` (1: up-down, 2: left-right); () is the identity."""

    def __init__(self, axes=(), **kwargs):
        super().__init__(**kwargs)
        self.axes = tuple(int(a) for a in axes)

    def call(self, x):
        return ops.flip(x, self.axes) if self.axes else x

    def get_config(self):
        return {**super().get_config(), "axes": list(self.axes)}


def _flip_mean(inputs, fn, flips, name: str):
    """mean over `flips` of fn(flip(inputs)); just fn(inputs) without flips."""
    flips = [tuple(a) for a in flips] or [()]
    outs = [fn(Flip(a, name=f"{name}_flip_{'_'.join(map(str, a)) or 'none'}")(inputs)) for a in flips]
    return outs[0] if len(outs) == 1 else keras.layers.Average(name=f"{name}_mean")(outs)


def classifier(heads, map_flips=((),), name: str = "classifier"):
    """Feature map -> probabilities: the mean over `heads` (one, or an ensemble's members) and over `map_flips`."""
    heads = list(heads)
    inputs = keras.Input(heads[0].input_shape[1:], name="feature_map")
    outs = [_flip_mean(inputs, h, map_flips, name=f"{h.name}") for h in heads]
    out = outs[0] if len(outs) == 1 else keras.layers.Average(name="members_mean")(outs)
    return keras.Model(inputs, out, name=name)


def compose(features, heads, *, map_flips=((),), image_flips=((),), name: str = "model", more=()):
    """The image-in model: mean over `image_flips` of classifier(features(flip(image))).

    `more`: further (features, heads) pairs on other backbones (a cross-backbone ensemble). Pair i gets the parts
    `features_<i>` and `classifier_<i>` (`group_parts`), and the output is the mean over every head of every pair,
    each head counting once."""
    groups = []
    for i, (f, hs) in enumerate([(features, heads), *more]):
        suffix = f"_{i}" if i else ""
        if f.name != f"features{suffix}":  # one tensor in, one out (a list would not match the classifier's input)
            f = keras.Model(f.input, f.output, name=f"features{suffix}")
        hs = list(hs)
        groups.append((f, classifier(hs, map_flips, name=f"classifier{suffix}"), len(hs)))

    def forward(x):
        outs = [out for f, clf, n in groups for out in [clf(f(x))] * n]
        return outs[0] if len(groups) == 1 else keras.layers.Average()(outs)

    inputs = keras.Input(features.input_shape[1:], name="image")
    return keras.Model(inputs, _flip_mean(inputs, forward, image_flips, name="image"), name=name)


def group_parts(model) -> list[tuple]:
    """The (features, classifier) parts of an image-in model (`compose`): one pair per backbone."""
    names, parts, suffix = {layer.name for layer in model.layers}, [], ""
    while f"features{suffix}" in names:
        parts.append((model.get_layer(f"features{suffix}"), model.get_layer(f"classifier{suffix}")))
        suffix = f"_{len(parts)}"
    return parts


def predict(model, images, batch_size: int = 32) -> np.ndarray:
    """P(class 1) as (N,) for two classes, else (N, C), from an image-in model on uint8 or float images."""
    prob = np.asarray(model.predict(np.asarray(images), batch_size=batch_size, verbose=0), np.float64)
    return prob[:, 0] if prob.shape[1] == 1 else prob


def table(prob: np.ndarray, classes, threshold: float):
    """The prediction table of `predict` and the pyfunc: `probability` (P(class 1) for two classes, else the top
    class's), `label`, and every class's probability (`prob_<class>`)."""
    import pandas as pd

    prob = np.asarray(prob, np.float64)
    names = np.array(list(classes), dtype=object)
    top = prob if prob.ndim == 1 else prob.max(1)
    each = np.stack([1 - prob, prob], 1) if prob.ndim == 1 else prob
    return pd.DataFrame({"probability": top.round(6), "label": names[labels(prob, threshold)],
                         **{f"prob_{c}": each[:, k].round(6) for k, c in enumerate(names)}})
