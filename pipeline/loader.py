"""The batch loader: training and prediction batches straight from the cached uint8 arrays.

The cache stage stores every split as one uint8 `.npy` (memory-mapped here), so a batch is a sorted read of its
rows and a cast, with no JPEG decoding. With `augment`, every image of a training batch is warped on the CPU by
OpenCV (`augment.warp_uint8`) with fresh random draws: the loader-side twin of the in-model `augment.Augment`
layer, used when fine-tuning without an accelerator.
"""
from __future__ import annotations

import keras
import numpy as np

from pipeline import augment as augmentation


class Batches(keras.utils.PyDataset):
    """float32 batches from uint8 images (memory-mapped or not), reshuffled every epoch when `shuffle`.

    `weights` (class -> weight) adds per-sample weights; `steps` caps the batches per epoch; `augment` (a
    `params.Augment`) warps training images; `flip` flips every image along those axes (test-time flips)."""

    def __init__(self, images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, weights=None, steps=None,
                 augment=None, fill_mode: str = "nearest", flip: tuple[int, ...] = ()):
        super().__init__()
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.weights = None if weights is None else np.array([weights[k] for k in labels], np.float32)
        self.rng, self.order, self.steps = np.random.default_rng(seed), np.arange(len(labels)), steps
        self.augment, self.fill_mode, self.flip = augment, augmentation.check_fill_mode(fill_mode), flip
        self.on_epoch_end()

    def __len__(self):
        n = -(-len(self.labels) // self.batch_size)
        return min(n, self.steps) if self.steps else n

    def __getitem__(self, i):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted reads from the mmap
        x = np.asarray(self.images[rows])
        if self.augment is not None:
            m = augmentation.random_matrices(len(x), self.augment, x.shape[1], x.shape[2], self.rng)
            x = augmentation.warp_uint8(x, m, self.fill_mode)
        x = x.astype(np.float32)
        batch = (np.flip(x, self.flip) if self.flip else x, self.labels[rows])
        return batch if self.weights is None else (*batch, self.weights[rows])

    def flipped(self, axes: tuple[int, ...]) -> "Batches":
        """The same batches (same order, no labels' weights) with every image flipped along `axes`."""
        return Batches(self.images, self.labels, self.batch_size, steps=self.steps, flip=axes)

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)
