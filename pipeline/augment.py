"""Fine-tune augmentation: one random affine warp per image (rotation, shear, zoom, shift, flips), fused.

The seeds trained through ImageDataGenerator(rotation_range, width_shift_range, height_shift_range, shear_range,
zoom_range, horizontal_flip), which warps one image at a time in NumPy/SciPy on the CPU. Chaining Keras'
RandomRotation, RandomZoom, RandomTranslation and RandomFlip layers instead resamples the batch once per layer,
and on JAX each resampling goes through `map_coordinates` (an 8-corner, 3-D interpolation), which costs many
times a training step on a GPU.

Here every image gets ONE 2x3 matrix, composed from its random draws (`params.Augment`: one parameter set) as

    input = Rotation . Shift . Shear . Zoom . Flip . output     (centred coordinates, like ImageDataGenerator)

and is resampled ONCE, bilinearly, with edge pixels repeated outside the image ("nearest", as the seeds) or
mirrored ("reflect"). There are two implementations of that resampling, one per place the warp can run
(`placement`), and a test holds them to the same pixels (within uint8 rounding):

- in the model, for an accelerator (`Augment`, `warp`): bilinear sampling written with `keras.ops.take` on the
  flattened batch (4 row gathers of C values), so it runs on every Keras backend and compiles with XLA. (Keras'
  `ops.image.affine_transform` is `map_coordinates` on JAX, 4-6x slower, and has no XLA kernel on TensorFlow.)
- in the CPU training loader (`warp_uint8`, used by `loader.Batches(augment=...)`): OpenCV's `warpAffine` on the
  uint8 images, which takes the same output-to-input matrix (`WARP_INVERSE_MAP`), the same pixel-centre
  convention and both border rules (`BORDER_REPLICATE`, `BORDER_REFLECT`), and spreads over every core itself.
  It is ~3x Pillow's affine transform per image (`make bench`).

Draws per image (all uniform, independent): angle in [-rotation, rotation] degrees; shifts in
[-width_shift, width_shift] x width and [-height_shift, height_shift] x height pixels; shear angle in
[-shear, shear] radians (Keras 2's ImageDataGenerator read shear_range in DEGREES, so the seeds' 0.2 was a
0.2-degree shear); zoom factors zx, zy in [1 - zoom, 1 + zoom] each (> 1 zooms out, as the seeds); a horizontal
(vertical) flip with probability 1/2 when enabled.

Coordinates: x is the column, y the row, pixel centres at integers; the centre of the image is
((W - 1) / 2, (H - 1) / 2), so a flip or a 90-degree turn of a square image maps the pixel grid onto itself.
A positive angle turns the content counter-clockwise on screen (90 degrees == numpy.rot90(image, 1)).

The matrices are computed in float32 whatever the dtype policy (coordinates in bfloat16 would be off by whole
pixels); the pixels are resampled in the layer's compute dtype, float32 unless told otherwise.
"""
from __future__ import annotations

import math
from typing import Mapping

import keras
import numpy as np
from keras import ops

from pipeline import params

FILL_MODES = ("nearest", "reflect")
DRAWS = ("angle", "tx", "ty", "shear", "zx", "zy", "flip_x", "flip_y")  # the columns `affine_matrices` takes


def as_params(p) -> params.Augment:
    """`params.Augment` from itself, a dict (as in a saved config) or None (the defaults); its flips must be
    decided (the fine-tune stage fills a `null` flip from the head's design before it augments)."""
    if p is None:
        p = params.Augment()
    elif isinstance(p, Mapping):
        p = params.Augment(**p)
    elif not isinstance(p, params.Augment):
        raise TypeError(f"augment params must be params.Augment or a dict, got {type(p).__name__}")
    if p.horizontal_flip is None or p.vertical_flip is None:
        raise ValueError("augment: horizontal_flip and vertical_flip must be true or false here; `null` means "
                         "'as the head's chosen design' and is resolved by the fine-tune stage")
    return p


def is_identity(p: params.Augment) -> bool:
    """True when every range is zero and both flips are off: the warp would change nothing."""
    return not (p.rotation or p.width_shift or p.height_shift or p.shear or p.zoom
                or p.horizontal_flip or p.vertical_flip)


def random_draws(batch, p: params.Augment, height: int, width: int, seed) -> dict:
    """One set of random draws per image, each a (batch,) float32 tensor (see `DRAWS`).

    All of them come from ONE (batch, 8) uniform draw, so `seed` is used once: a `keras.random.SeedGenerator`
    (advanced by one step), an int, or on JAX a seed array (for a pure function under `jax.jit`)."""
    u = keras.random.uniform((batch, len(DRAWS)), dtype="float32", seed=seed)
    return draws_from_uniform(u, p, height, width, ops)


def draws_from_uniform(u, p: params.Augment, height: int, width: int, xp=np) -> dict:
    """The draws (see `DRAWS`) from a (batch, 8) uniform [0, 1) array `u`; `xp` is `numpy` or `keras.ops`."""
    ranges = {"angle": p.rotation * (math.pi / 180.0), "tx": p.width_shift * float(width),
              "ty": p.height_shift * float(height), "shear": p.shear}
    out = {k: (2.0 * u[:, i] - 1.0) * r for i, (k, r) in enumerate(ranges.items())}
    out["zx"] = 1.0 + (2.0 * u[:, 4] - 1.0) * p.zoom
    out["zy"] = 1.0 + (2.0 * u[:, 5] - 1.0) * p.zoom
    out["flip_x"] = xp.where(u[:, 6] < 0.5, 1.0, 0.0) * float(p.horizontal_flip)
    out["flip_y"] = xp.where(u[:, 7] < 0.5, 1.0, 0.0) * float(p.vertical_flip)
    return out


def affine_matrices(draws: Mapping, height: int, width: int, xp=ops):
    """(B, 6) float32 rows [a0, a1, a2, b0, b1, b2]: output pixel (x, y) samples input (a0 x + a1 y + a2,
    b0 x + b1 y + b2). `draws` maps each name in `DRAWS` to a (B,) tensor or array: angle and shear in radians,
    tx/ty in pixels, zx/zy factors, flip_x/flip_y 0 or 1.

    Closed form of Rotation . Shift . Shear . Zoom . Flip about the image centre, with
    Rotation = [[cos, -sin], [sin, cos]], Shear = [[1, -sin(s)], [0, cos(s)]], Zoom = diag(zx, zy),
    Flip = diag(1 - 2 flip_x, 1 - 2 flip_y) and Shift adding (tx, ty) before the rotation.
    With `xp=numpy` it computes on NumPy arrays (no backend call: what the CPU loader uses).
    """
    if xp is np:
        d = {k: np.asarray(draws[k], np.float32) for k in DRAWS}
    else:
        d = {k: ops.cast(ops.convert_to_tensor(draws[k]), "float32") for k in DRAWS}
    cos, sin = xp.cos(d["angle"]), xp.sin(d["angle"])
    sh_sin, sh_cos = xp.sin(d["shear"]), xp.cos(d["shear"])
    fx, fy = 1.0 - 2.0 * d["flip_x"], 1.0 - 2.0 * d["flip_y"]
    sx, sy = d["zx"] * fx, d["zy"] * fy  # Zoom . Flip
    # L = Rotation . Shear . diag(sx, sy)
    a0 = cos * sx
    a1 = (-cos * sh_sin - sin * sh_cos) * sy
    b0 = sin * sx
    b1 = (-sin * sh_sin + cos * sh_cos) * sy
    # translation: Rotation . (tx, ty), then centring: c - L c
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a2 = cos * d["tx"] - sin * d["ty"] + cx - (a0 * cx + a1 * cy)
    b2 = sin * d["tx"] + cos * d["ty"] + cy - (b0 * cx + b1 * cy)
    return xp.stack([a0, a1, a2, b0, b1, b2], axis=1)


def check_fill_mode(fill_mode: str) -> str:
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got '{fill_mode}'")
    return fill_mode


def placement(augment_in: str, accelerator: bool) -> str:
    """Where fine-tuning augments: 'model' (the `Augment` layer, inside the compiled step) or 'loader'
    (`warp_uint8` in the training loader). `augment_in: auto` is the model with an accelerator, else the loader,
    where OpenCV's uint8 warp on every core costs far less than a float warp inside the model."""
    return augment_in if augment_in != "auto" else ("model" if accelerator else "loader")


def random_matrices(n: int, p, height: int, width: int, rng: np.random.Generator):
    """(n, 6) float32 NumPy matrices (see `affine_matrices`) of `n` random draws from `rng`, distributed as the
    layer's, computed in NumPy."""
    u = rng.random((n, len(DRAWS)), dtype=np.float32)
    return affine_matrices(draws_from_uniform(u, as_params(p), height, width, np), height, width, xp=np).astype(np.float32)


# ------------------------------------------------------------------------------------ in the model (keras.ops)

def _fold(coord, size: int, fill_mode: str):
    """Map sampling coordinates outside [0, size - 1] back inside, then clamp for the bilinear corners."""
    if fill_mode == "reflect" and size > 1:  # (d c b a | a b c d | d c b a): mirror about the pixel edges
        period = 2.0 * size
        c = coord + 0.5
        c = c - period * ops.floor(c / period)
        c = ops.where(c >= size, period - c, c) - 0.5
        coord = c
    return ops.clip(coord, 0.0, float(size - 1))


def warp(images, matrices, fill_mode: str = "nearest"):
    """Resample a float (B, H, W, C) batch bilinearly through per-image (B, 6) matrices (see `affine_matrices`)."""
    check_fill_mode(fill_mode)
    shape = ops.shape(images)
    b, h, w, c = shape[0], images.shape[1], images.shape[2], images.shape[3]
    if h is None or w is None or c is None:
        raise ValueError(f"Augment needs static height, width and channels, got {images.shape}")
    m = ops.cast(matrices, "float32")
    ys, xs = ops.meshgrid(ops.arange(h, dtype="float32"), ops.arange(w, dtype="float32"), indexing="ij")
    xs, ys = ops.reshape(xs, (1, h * w)), ops.reshape(ys, (1, h * w))
    x = m[:, 0:1] * xs + m[:, 1:2] * ys + m[:, 2:3]  # (B, H*W) source coordinates
    y = m[:, 3:4] * xs + m[:, 4:5] * ys + m[:, 5:6]
    x, y = _fold(x, w, fill_mode), _fold(y, h, fill_mode)
    x0f, y0f = ops.floor(x), ops.floor(y)
    wx, wy = x - x0f, y - y0f  # weights of the right / lower neighbours
    x0, y0 = ops.cast(x0f, "int32"), ops.cast(y0f, "int32")
    x1, y1 = ops.minimum(x0 + 1, w - 1), ops.minimum(y0 + 1, h - 1)
    base = ops.reshape(ops.arange(b, dtype="int32") * (h * w), (-1, 1))
    flat = ops.reshape(images, (-1, c))  # (B*H*W, C): one gather fetches all channels of a pixel

    def at(yy, xx):
        return ops.take(flat, ops.reshape(base + yy * w + xx, (-1,)), axis=0)  # (B*H*W, C)

    dtype = images.dtype
    wx = ops.cast(ops.reshape(wx, (-1, 1)), dtype)
    wy = ops.cast(ops.reshape(wy, (-1, 1)), dtype)
    top_left, bottom_left = at(y0, x0), at(y1, x0)
    top = top_left + wx * (at(y0, x1) - top_left)
    bottom = bottom_left + wx * (at(y1, x1) - bottom_left)
    out = top + wy * (bottom - top)
    return ops.reshape(out, (b, h, w, c))


def augment_batch(images, p, seed_generator, fill_mode: str = "nearest"):
    """Randomly warp a float (B, H, W, C) batch, one affine transform per image; shape and dtype are kept
    (integer images, e.g. uint8, come back as float32).

    `p` is a `params.Augment` (or its dict); `seed_generator` a `keras.random.SeedGenerator` (or a seed, see
    `random_draws`)."""
    p = as_params(p)
    images = ops.convert_to_tensor(images)
    if not keras.backend.is_float_dtype(images.dtype):
        images = ops.cast(images, "float32")
    if is_identity(p):
        return images
    h, w = images.shape[1], images.shape[2]
    draws = random_draws(ops.shape(images)[0], p, h, w, seed_generator)
    return warp(images, affine_matrices(draws, h, w), fill_mode=fill_mode)


@keras.saving.register_keras_serializable(package="pipeline")
class Augment(keras.layers.Layer):
    """Random per-image affine warp of float RGB (B, H, W, 3) batches in 0..255, active only when training=True;
    the identity at inference. `p` is a `params.Augment` or its dict (that is what `get_config` stores)."""

    def __init__(self, p: params.Augment | Mapping | None = None, seed: int | None = None,
                 fill_mode: str = "nearest", **kw):
        kw.pop("method", None)  # files saved when the layer had a choice of warps
        kw.setdefault("dtype", "float32")  # resample in float32 under mixed precision; the backbone casts after
        super().__init__(**kw)
        self.p, self.seed, self.fill_mode = as_params(p), seed, check_fill_mode(fill_mode)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, inputs, training=None):
        if not training:
            return inputs
        return augment_batch(inputs, self.p, self.seed_generator, self.fill_mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"params": self.p.model_dump(), "seed": self.seed, "fill_mode": self.fill_mode})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["p"] = config.pop("params", None)
        return super().from_config(config)


# ------------------------------------------------------------------------------------ in the CPU loader (OpenCV)

def warp_uint8(images: np.ndarray, matrices: np.ndarray, fill_mode: str = "nearest") -> np.ndarray:
    """The same warp as `warp`, for a uint8 (B, H, W, C) NumPy batch on the CPU, with OpenCV's bilinear
    `warpAffine` (fixed-point weights; uint8 out, rounded). OpenCV splits each image over its own threads, one
    per core, outside the GIL. This is what a loader feeding a CPU training step uses."""
    import cv2

    border = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT}[check_fill_mode(fill_mode)]
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"warp_uint8 takes a uint8 (B, H, W, C) batch, got {images.dtype} {images.shape}")
    _, h, w, c = images.shape
    out = np.empty_like(images)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # the matrix maps output pixels to input pixels
    for i, m in enumerate(np.asarray(matrices, np.float64).reshape(-1, 2, 3)):
        # OpenCV warps at most 4 channels at once; the training images are RGB (3)
        for lo in range(0, c, 4):
            out[i, ..., lo:lo + 4] = cv2.warpAffine(images[i, ..., lo:lo + 4], m, (w, h), flags=flags,
                                                    borderMode=border).reshape(h, w, -1)
    return out
