"""Perceptual hashes and near-copy groups: images that are the same picture flipped, turned by 90 degrees, re-saved,
resized or lightly retouched.

Each image gets the pHash (`imagehash.phash`, 256 bits) of each of its 8 orientations (the 4 rotations by 90 degrees,
with and without a mirror flip); two images are near-copies when one's hash is within `max_bits` differing bits of
any orientation of the other's. Near-copies are grouped transitively (connected components). The manifest hashes
every image when it decodes it; the split stage keeps each group in one split and fold.
"""
from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_SIZE = 16  # a 16x16 DCT block: 256 bits (the usual 64 bits call most solar cells alike)
T = Image.Transpose
ORIENTATIONS = (None, T.ROTATE_90, T.ROTATE_180, T.ROTATE_270, T.FLIP_LEFT_RIGHT, T.FLIP_TOP_BOTTOM, T.TRANSPOSE,
                T.TRANSVERSE)


def hashes(image: Image.Image) -> str:
    """The pHash of each of the image's 8 orientations, as hex, space-separated (the image as it is first)."""
    small = image.convert("L").resize((4 * HASH_SIZE,) * 2, Image.Resampling.LANCZOS)  # what phash looks at
    return " ".join(str(imagehash.phash(small if o is None else small.transpose(o), hash_size=HASH_SIZE))
                    for o in ORIENTATIONS)


def _signs(hexes: list[str]) -> np.ndarray:
    """(N, 8, bits) of +1 / -1 from `hashes` strings."""
    bits = [[imagehash.hex_to_hash(h).hash.ravel() for h in s.split()] for s in hexes]
    return np.where(np.asarray(bits, bool), 1.0, -1.0).astype(np.float32)


def close_pairs(hexes: list[str], max_bits: int, chunk: int = 512) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j: the fewest differing bits between image i and any orientation of image j, where
    that is at most `max_bits`. Blank hashes (undecodable files) are never close to anything."""
    rows = [i for i, h in enumerate(hexes) if isinstance(h, str) and h.strip()]
    if len(rows) < 2:
        return []
    s = _signs([hexes[i] for i in rows])
    n, bits = len(rows), s.shape[2]
    best = {}
    for start in range(0, n, chunk):
        a = s[start:start + chunk, 0]  # (c, bits): as they are
        agree = np.max(np.einsum("cb,nob->cno", a, s, optimize=True), axis=2)  # best orientation of each other image
        dist = np.rint((bits - agree) / 2).astype(int)
        for ci, j in zip(*np.nonzero(dist <= max_bits)):
            i = start + int(ci)
            if i != j:  # each pair is seen from both sides: keep the closer look
                key = (rows[min(i, j)], rows[max(i, j)])
                best[key] = min(int(dist[ci, j]), best.get(key, bits))
    return sorted((i, j, d) for (i, j), d in best.items())


def groups(hexes: list[str], max_bits: int | None) -> np.ndarray:
    """A group number per image, -1 for an image with no near-copy (or with `max_bits` None)."""
    n = len(hexes)
    pairs = close_pairs(hexes, max_bits) if max_bits is not None else []
    if not pairs:
        return np.full(n, -1)
    i, j, _ = np.asarray(pairs).T
    return components(n, i, j)


def components(n: int, i, j) -> np.ndarray:
    """Near-copy groups from pairs (i[k], j[k]) of n images, joined transitively: a group number per image, -1 for
    an image in no pair."""
    if not len(i):
        return np.full(n, -1)
    _, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    size = np.bincount(label)
    return np.where(size[label] > 1, label, -1)
