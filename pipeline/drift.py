"""How far a batch of images is from the images a model was trained on, in that model's own features: one figure.

The figure is the mean, over the channels of the model's (first) backbone, of |batch mean - training mean| /
training SD of the globally pooled feature map: 0 when the batch's features average like the training images',
1 when they sit one training SD away on average. Images from another camera, another site, another kind of object
move it; a new mix of the same kinds of images barely does. A batch of n images from the training distribution
still scores about 0.8 / sqrt(n) (sampling noise), so the threshold (`score.drift_threshold`) is meant for batches
of dozens of images or more.

The registry stores the training reference (`reference`, on up to `REFERENCE_IMAGES` training images) with every
version it registers (artifact `drift/reference.json`); the `score_new_images` DAG compares each batch with the
reference of the version that scored it.
"""
from __future__ import annotations

import numpy as np

from pipeline import models

REFERENCE_IMAGES = 500  # training images (a seeded draw) the reference is computed on
ARTIFACT = "drift/reference.json"


def pooled(model, images, batch_size: int = 32) -> np.ndarray:
    """(N, channels) global-average-pooled feature maps of an image-in model's first backbone (`models.compose`)."""
    features = models.group_parts(model)[0][0]
    maps = np.asarray(features.predict(np.asarray(images), batch_size=batch_size, verbose=0), np.float64)
    return maps.mean(axis=(1, 2)) if maps.ndim == 4 else maps


def reference(model, images) -> dict:
    """The training images' per-channel mean and SD of the pooled features."""
    f = pooled(model, images)
    return {"mean": f.mean(0).tolist(), "sd": f.std(0).tolist(), "images": int(len(f))}


def distance(ref: dict, features: np.ndarray) -> float:
    """The drift figure of a batch's pooled `features` against a `reference`."""
    mean, sd = np.asarray(ref["mean"]), np.asarray(ref["sd"])
    keep = sd > 1e-8  # a channel constant in training (a dead unit) says nothing
    return float(np.mean(np.abs(np.asarray(features).mean(0)[keep] - mean[keep]) / sd[keep]))
