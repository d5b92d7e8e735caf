"""The classic from-scratch baseline: four conv + max-pool blocks (32, 64, 128, 128 filters), random init.

The dense classifier on top is added by the head stage. Pixels are scaled to 0..1 inside the model.
"""
from __future__ import annotations

import keras
from keras import layers

from pipeline.backbones.core import Spec

# From scratch: everything is trainable, and the head sits on the last pooling layer.
SPEC = Spec(
    "small_cnn", "Small CNN", "block4_pool", "block1_conv", 46, "x / 255 on RGB 0..255",
    weights={"default": "none", "none": "none"}, sources={"none": "from scratch, random init"},
    weights_hint="it is always trained from scratch, use 'default' or 'none'")

FILTERS = (32, 64, 128, 128)


def build(image_size: int, weights: str) -> keras.Model:
    """Raw RGB 0..255 in, the block4_pool feature map out (12x12x128 at 224 px; needs image_size >= 46).

    `weights` is always 'none' (see `SPEC.weights`): the layers keep their random initialisation.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="preprocess")(inputs)
    for block, filters in enumerate(FILTERS, start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"block{block}_conv")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")
