"""Frozen feature extractors ("backbones") shared by the extract, finetune and predict stages.

Every backbone takes raw RGB pixels in 0..255 (float) and carries its own preprocessing as its first layer
(named `preprocess`), so a saved model never depends on the caller knowing it. `build_base` returns the model
up to a cut layer; `Spec` names each backbone's default cut and the layer fine-tuning unfreezes from.

Weights: "default" (offline, shipped with a package), "imagenet" (VGG16: Keras' download; Lite0: = default),
"none" (random init), or the path of a `.weights.h5` file saved from `full_model(name, ...)`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import keras

from pipeline.backbones import efficientnet_lite, small_cnn, vgg16

NAMED_WEIGHTS = ("default", "imagenet", "none")


@dataclass(frozen=True)
class Spec:
    name: str
    label: str              # human label with the default weights; `label(name, weights)` for others
    default_cut: str        # layer whose output the extract stage stores
    default_unfreeze: str   # first layer made trainable by fine-tuning (everything from it upward)
    min_size: int           # smallest image_size the architecture accepts
    preprocessing: str      # what the `preprocess` layer does


SPECS = {
    # Cut at the end of stage 5 (block5c_add: 112 channels at 1/16 of the input, 19x19 at 300 px), not at the
    # 1280-channel top (1/32): defects such as fine cracks are local, and the head's small convolutions find them
    # on the finer map (ELPV, measured: a conv head on block5c_add reached ~89-90 % on validation, pooled top
    # features ~86 %). It also skips stages 6-7, a third of the forward cost. Fine-tuning opens stage 5
    # (block5a..block5c), the last stage below the cut; the early, generic stages stay frozen.
    "efficientnet_lite0": Spec(
        "efficientnet_lite0", "EfficientNet-Lite0 (ImageNet)", "block5c_add", "block5a_expand_conv", 32,
        "(x - 127) / 128 on RGB 0..255"),
    # The HED-trained trunk's block5 drifted furthest from ImageNet (linear probe 84 % at block4_pool vs
    # 78 % at block5_pool), so the cut is block4_pool. Fine-tuning trains the model up to the cut, so it
    # unfreezes the last block below the cut (block4), not block5, which is not part of the model.
    "vgg16": Spec(
        "vgg16", "VGG16 (HED-trained trunk)", "block4_pool", "block4_conv1", 32,
        "RGB -> BGR, minus the caffe ImageNet mean [103.939, 116.779, 123.68] (= keras vgg16.preprocess_input)"),
    # From scratch: everything is trainable, and the head sits on the last pooling layer.
    "small_cnn": Spec(
        "small_cnn", "Small CNN (from scratch, random init)", "block4_pool", "block1_conv", 46,
        "x / 255 on RGB 0..255"),
}

_MODULES = {"efficientnet_lite0": efficientnet_lite, "vgg16": vgg16, "small_cnn": small_cnn}
_PRETTY = {"efficientnet_lite0": "EfficientNet-Lite0", "vgg16": "VGG16", "small_cnn": "Small CNN"}


def spec(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"backbone.name '{name}' is unknown; choose one of {sorted(SPECS)}")
    return SPECS[name]


def resolve_weights(name: str, weights: str) -> str:
    """Map `weights` to what is actually loaded: 'imagenet', 'hed', 'none', or a checked file path."""
    spec(name)
    weights = str(weights)
    if weights in NAMED_WEIGHTS or weights == "hed":
        # Keras ships no Lite0: its 'imagenet' is the same offline, converted ImageNet weights as 'default'.
        resolved = {"efficientnet_lite0": {"default": "imagenet", "imagenet": "imagenet", "none": "none"},
                    "vgg16": {"default": "hed", "hed": "hed", "imagenet": "imagenet", "none": "none"},
                    "small_cnn": {"default": "none", "none": "none"}}[name].get(weights)
        if resolved is None:
            raise ValueError(f"backbone.weights '{weights}' is not available for backbone '{name}'"
                             + (": it is always trained from scratch, use 'default' or 'none'" if name == "small_cnn" else ""))
        return resolved
    if not weights.endswith(".weights.h5"):
        raise ValueError(f"backbone.weights '{weights}' is unknown: use one of {list(NAMED_WEIGHTS)} "
                         f"or the path of a .weights.h5 file")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"backbone.weights: file '{weights}' not found")
    return weights


def label(name: str, weights: str = "default") -> str:
    """An honest human label, e.g. 'VGG16 (HED-trained trunk)' or 'VGG16 (ImageNet)'."""
    w = resolve_weights(name, weights)
    if name == "small_cnn":
        return spec(name).label
    pretty = _PRETTY[name]
    return {"imagenet": f"{pretty} (ImageNet)", "hed": f"{pretty} (HED-trained trunk)",
            "none": f"{pretty} (random init)"}.get(w, f"{pretty} (weights from {Path(w).name})")


def describe(name: str, weights: str = "default", cut_layer: str | None = None, image_size: int | None = None) -> dict:
    """Small JSON-able description of a backbone, for model metadata (cut layer resolved to the default)."""
    s = spec(name)
    out = {"name": name, "label": label(name, weights), "weights": str(weights),
           "weights_resolved": resolve_weights(name, weights), "preprocessing": s.preprocessing,
           "input": "RGB float 0..255, preprocessing inside the model", "cut_layer": cut_layer or s.default_cut}
    return out if image_size is None else {**out, "image_size": image_size}


RANDOM_INIT_SEED = 0


def full_model(name: str, weights: str = "default", image_size: int = 224) -> keras.Model:
    """The whole backbone with weights loaded (for efficientnet_lite0 including its 1000-way ImageNet head)."""
    s, w = spec(name), resolve_weights(name, weights)
    if image_size < s.min_size:
        raise ValueError(f"cache.image_size {image_size} is too small for backbone '{name}' (at least {s.min_size})")
    module = _MODULES[name]
    if w == "none":  # a random-init base must come out the same at extract, finetune and predict
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
    if name == "vgg16":
        model = module.build_model(image_size, imagenet=(w == "imagenet"))
        if w == "hed":
            module.load_hed(model)
    else:
        model = module.build_model(image_size)
        if w == "imagenet":
            efficientnet_lite.load_imagenet(model)
    if w not in ("imagenet", "hed", "none"):
        _load_weights_file(model, w, name)
    return model


def _load_weights_file(model: keras.Model, path: str, name: str) -> None:
    """Load a `.weights.h5` strictly: Keras only warns about parts it skips, here that is an error."""
    problem = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except Exception as e:
            problem = str(e)
    problem = problem or next((str(c.message) for c in caught if issubclass(c.category, UserWarning)), None)
    if problem:
        first = problem.strip().split("\n")[0][:300]
        raise ValueError(f"backbone.weights '{path}' does not fit backbone '{name}' (expected weights saved from "
                         f"pipeline.backbones.full_model('{name}')): {first}")


def cut_layers(model: keras.Model) -> list[str]:
    """Names of the layers that can be a cut: those with a 4-D feature-map output (not the input)."""
    return [l.name for l in model.layers
            if not isinstance(l, keras.layers.InputLayer) and len(l.output.shape) == 4]


def check_layer(model: keras.Model, layer: str, param: str) -> None:
    valid = cut_layers(model)
    if layer not in valid:
        raise ValueError(f"{param} '{layer}' is not a layer of backbone '{model.name}' with a feature-map output; "
                         f"valid names: {', '.join(valid)}")


def build_base(name: str, weights: str = "default", image_size: int = 224, cut_layer: str | None = None) -> keras.Model:
    """The backbone from raw pixels to the 4-D feature map at `cut_layer` (default: the spec's `default_cut`)."""
    cut = cut_layer or spec(name).default_cut
    model = full_model(name, weights, image_size)
    check_layer(model, cut, "backbone.cut_layer")
    return keras.Model(model.inputs, model.get_layer(cut).output, name=f"{name}_base")


def unfreeze_from(base: keras.Model, layer: str | None, name: str | None = None) -> list[str]:
    """Make `base` trainable from `layer` (default: the spec's `default_unfreeze`) upward; return those names.

    BatchNormalization layers stay frozen: fine-tuning should also call the base with training=False.
    """
    layer = layer or spec(name or base.name.removesuffix("_base")).default_unfreeze
    check_layer(base, layer, "finetune.unfreeze_from")
    names = [l.name for l in base.layers]
    start = names.index(layer)
    base.trainable = True
    for i, l in enumerate(base.layers):
        l.trainable = i >= start and not isinstance(l, keras.layers.BatchNormalization)
    return names[start:]
