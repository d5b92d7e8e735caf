"""The classic from-scratch baseline: four conv + max-pool blocks (32, 64, 128, 128 filters), random init.

The dense classifier on top is added by the head stage. Pixels are scaled to 0..1 inside the model.
"""
from __future__ import annotations

import keras
from keras import layers

FILTERS = (32, 64, 128, 128)


def build_model(image_size: int = 224) -> keras.Model:
    """Raw RGB 0..255 in, the block4_pool feature map out (12x12x128 at 224 px; needs image_size >= 46)."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="preprocess")(inputs)
    for block, filters in enumerate(FILTERS, start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"block{block}_conv")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")
