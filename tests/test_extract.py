"""Extract stage: every row run, in order, aligned with the cached labels; no predict_generator truncation."""
import numpy as np

from pipeline import backbones, extract, io, paths


def test_features_align_with_cache(trained):
    meta = io.read_json(trained / paths.FEATURES_DIR / "meta.json")
    assert meta["label"].startswith("Small CNN") and meta["cut_layer"] == "block4_pool"
    for split in paths.SPLITS:
        x, y = io.load_pair(trained / paths.CACHE_DIR / split)
        f, fy = io.load_pair(trained / paths.FEATURES_DIR / split)
        assert len(f) == len(x) and fy.tolist() == y.tolist()
        assert list(f.shape) == meta["shapes"][split] and f.dtype == np.float16
    assert (trained / paths.FEATURES_DIR / "index.csv").read_text() == (trained / paths.CACHE_DIR / "index.csv").read_text()


def test_alignment_survives_a_shuffle_and_partial_batches():
    base = backbones.build_base("small_cnn", "none", 48)
    images = np.random.default_rng(0).integers(0, 255, (13, 48, 48, 3), dtype=np.uint8)  # 13 = 3 batches of 5, last partial
    ref = extract.extract(base, images, batch_size=5, dtype="float32")
    perm = np.random.default_rng(1).permutation(13)
    shuffled = extract.extract(base, images[perm], batch_size=5, dtype="float32")
    assert ref.shape == (13, 1, 1, 128)
    np.testing.assert_allclose(shuffled, ref[perm], rtol=1e-4, atol=1e-4)
    one = np.asarray(base.predict_on_batch(images[12:13].astype(np.float32)))
    np.testing.assert_allclose(ref[12:13], one, rtol=1e-4, atol=1e-4)  # the last, partial batch is there


def test_default_backbone_features_on_tiny_images():
    base = backbones.build_base("efficientnet_lite0", "default", 32)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    f = extract.extract(base, images, batch_size=2)
    assert f.shape == (3, 2, 2, 112) and np.isfinite(f.astype(np.float32)).all()  # block5c_add: 1/16, 112 channels
