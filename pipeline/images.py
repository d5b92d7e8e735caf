"""Decoding an image file: any PIL mode to 8-bit RGB at a square size. The cache stage, `predict` and the served model
decode with this one function, so an image gives the same array wherever it is read; the pictures of the data
checks find those decoded copies in the cache (`cached`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline import io

HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK, 16-bit and float."""
    if im.mode in HIGH_BIT_MODES:
        a = np.asarray(im, dtype=np.float32)
        scale = 257.0 if a.max(initial=0) > 255 else 1.0  # 16-bit range down to 8-bit
        im = Image.fromarray(np.clip(a / scale, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_rgb(path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode one image file (a path or a binary file object) to a (size, size, 3) uint8 array; EXIF orientation
    applied, squashed to a square. With `max_pixels`, a larger image is refused before it is decoded."""
    with Image.open(path) as im:
        if max_pixels and im.width * im.height > max_pixels:
            raise ValueError(f"{im.width}x{im.height} pixels, more than the limit of {max_pixels:,}")
        im.draft("RGB", (size, size))  # let the JPEG decoder downscale by 2/4/8 when the image is much larger
        im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def sample(cache_dir, split: str, n: int, seed: int) -> np.ndarray:
    """`n` images of one split of the cache (a seeded draw without replacement, in cache order; all when fewer)."""
    x = io.load_npy(Path(cache_dir) / f"{split}_x.npy")
    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(n, len(x)), replace=False))
    return np.asarray(x[rows])


def cached(files, cache_dir) -> dict[str, np.ndarray]:
    """{path: image} for the files (as the split table names them) that the cache stage decoded into `cache_dir`."""
    index = pd.read_csv(cache_dir / "index.csv")
    index = index[index["path"].isin(set(files))]
    out = {}
    for split, rows in index.groupby("split"):
        x = io.load_npy(cache_dir / f"{split}_x.npy")  # memory-mapped: only the rows asked for are read
        out.update({path: np.asarray(x[row]) for path, row in zip(rows["path"], rows["row"])})
    return out
