"""The fine-tune augmentation: one fused affine warp per image, identity at inference, saved inside models; the
in-model warp and the CPU loader's (OpenCV) warp meet the same geometric definitions and give the same pixels."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from pipeline import augment, params

SIZE = 16
SEEDS_RECIPE = params.Augment(rotation=40, width_shift=0.2, height_shift=0.2, shear=0.2, zoom=0.2,
                              horizontal_flip=True, vertical_flip=True)
NOTHING = params.Augment(rotation=0, width_shift=0, height_shift=0, shear=0, zoom=0,
                         horizontal_flip=False, vertical_flip=False)
WARPS = ("model", "loader")  # augment.warp (keras.ops) and augment.warp_uint8 (OpenCV)


def images(n: int = 4, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Whole-number pixel values as float32: exact in uint8 too, so both warps can be held to the same tolerance."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("float32")


def draws(n: int, **given) -> dict:
    """Deterministic draws: the identity unless overridden."""
    out = {k: np.zeros(n, np.float32) for k in augment.DRAWS}
    out["zx"][:] = out["zy"][:] = 1.0
    for k, v in given.items():
        out[k] = np.broadcast_to(np.asarray(v, np.float32), (n,)).copy()
    return out


def warp(x, where="model", fill_mode="nearest", **given):
    m = augment.affine_matrices(draws(len(x), **given), x.shape[1], x.shape[2], xp=np)
    if where == "loader":
        return augment.warp_uint8(x.astype(np.uint8), m, fill_mode).astype(np.float32)
    return np.asarray(augment.warp(x, m, fill_mode=fill_mode))


@pytest.mark.parametrize("where", WARPS)
def test_identity_matrix_returns_the_input(where):
    x = images()
    np.testing.assert_allclose(warp(x, where), x, atol=1e-3)


def test_all_params_zero_is_the_identity_in_training():
    x = images()
    layer = augment.Augment(NOTHING, seed=1)
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), x, atol=1e-3)


def test_inference_is_the_identity():
    x = images()
    layer = augment.Augment(SEEDS_RECIPE, seed=1)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(layer(x)), x)


@pytest.mark.parametrize("where", WARPS)
def test_flips(where):
    x = images()
    np.testing.assert_allclose(warp(x, where, flip_x=1), x[:, :, ::-1], atol=1e-3)
    np.testing.assert_allclose(warp(x, where, flip_y=1), x[:, ::-1], atol=1e-3)


def test_horizontal_flip_alone_flips_about_half_the_images():
    x = images(64, 8)
    p = NOTHING.model_copy(update={"horizontal_flip": True})
    y = np.asarray(augment.augment_batch(x, p, keras.random.SeedGenerator(3)))
    same = np.all(np.abs(y - x) < 1e-3, axis=(1, 2, 3))
    flipped = np.all(np.abs(y - x[:, :, ::-1]) < 1e-3, axis=(1, 2, 3))
    assert np.all(same | flipped)
    assert 10 < flipped.sum() < 54


@pytest.mark.parametrize("where", WARPS)
def test_rotation_by_90_degrees_turns_counter_clockwise(where):
    x = images()
    np.testing.assert_allclose(warp(x, where, angle=math.pi / 2), np.rot90(x, 1, axes=(1, 2)), atol=1e-3)
    np.testing.assert_allclose(warp(x, where, angle=-math.pi / 2), np.rot90(x, -1, axes=(1, 2)), atol=1e-3)


@pytest.mark.parametrize("where", WARPS)
def test_shift_moves_content_and_repeats_the_edge(where):
    x = images()
    y = warp(x, where, tx=3)  # output column j samples input column j + 3
    np.testing.assert_allclose(y[:, :, :-3], x[:, :, 3:], atol=1e-3)
    np.testing.assert_allclose(y[:, :, -3:], np.repeat(x[:, :, -1:], 3, axis=2), atol=1e-3)  # fill 'nearest'
    r = warp(x, where, tx=3, fill_mode="reflect")
    np.testing.assert_allclose(r[:, :, -3:], x[:, :, ::-1][:, :, :3], atol=1e-3)  # d c b a | a b c d


@pytest.mark.parametrize("where", WARPS)
def test_zoom_and_shear_match_their_definition(where):
    x = images(2, 9)
    # zoom 2 about the centre: output column j samples input column 4 + 2 (j - 4), clamped
    y = warp(x, where, zx=2.0, zy=1.0)
    cols = np.clip(4 + 2 * (np.arange(9) - 4), 0, 8)
    np.testing.assert_allclose(y, x[:, :, cols], atol=1e-3)
    # a shear keeps the centre row in place
    s = warp(x, where, shear=0.3)
    np.testing.assert_allclose(s[:, 4], x[:, 4], atol=1e-3)


def test_shape_and_dtype_kept_and_values_in_range():
    x = images(3, 24)
    y = augment.Augment(SEEDS_RECIPE, seed=0)(x, training=True)
    assert tuple(y.shape) == x.shape and keras.backend.standardize_dtype(y.dtype) == "float32"
    y = np.asarray(y)
    assert y.min() >= x.min() - 1e-3 and y.max() <= x.max() + 1e-3  # bilinear mixes, never extrapolates
    rect = np.random.default_rng(1).uniform(0, 255, (2, 12, 20, 3)).astype("float32")
    assert np.asarray(augment.Augment(SEEDS_RECIPE, seed=0)(rect, training=True)).shape == rect.shape


def test_each_image_gets_its_own_transform_and_calls_differ():
    x = np.repeat(images(1), 6, axis=0)  # six copies of one image
    layer = augment.Augment(SEEDS_RECIPE, seed=5)
    y = np.asarray(layer(x, training=True))
    diffs = [np.abs(y[i] - y[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 1.0
    assert np.abs(np.asarray(layer(x, training=True)) - y).mean() > 1.0  # the seed generator moves on


def test_same_seed_same_warps():
    x = images()
    a = np.asarray(augment.Augment(SEEDS_RECIPE, seed=11)(x, training=True))
    b = np.asarray(augment.Augment(SEEDS_RECIPE, seed=11)(x, training=True))
    np.testing.assert_array_equal(a, b)


def test_params_from_dict_and_bad_options():
    layer = augment.Augment(SEEDS_RECIPE.model_dump(), seed=1)
    assert layer.p == SEEDS_RECIPE
    with pytest.raises(ValueError):
        augment.Augment(SEEDS_RECIPE, fill_mode="constant")
    with pytest.raises(Exception):
        augment.Augment({"rotation": 20, "rotaton": 3})


def test_save_and_load_inside_a_keras_model(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = augment.Augment(SEEDS_RECIPE, seed=3, name="augment")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile("adam", "binary_crossentropy")
    data = images(8)
    model.fit(data, np.arange(8) % 2, epochs=1, batch_size=4, verbose=0)  # the warp runs inside fit
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("augment")
    assert isinstance(layer, augment.Augment)
    assert layer.p == SEEDS_RECIPE and layer.seed == 3 and layer.fill_mode == "nearest"
    np.testing.assert_allclose(loaded.predict(data, verbose=0), model.predict(data, verbose=0), atol=1e-6)


def test_mixed_precision_keeps_the_warp_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = augment.Augment(NOTHING.model_copy(update={"rotation": 10.0}), seed=0)
        x = images(2)
        y = layer(x, training=True)
        assert keras.backend.standardize_dtype(y.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_uint8_images_come_back_as_float32():
    x = images(2).round().astype("uint8")
    y = augment.augment_batch(x, NOTHING.model_copy(update={"horizontal_flip": True}), keras.random.SeedGenerator(0))
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    y = np.asarray(y)
    for i in range(2):
        assert np.allclose(y[i], x[i]) or np.allclose(y[i], x[i, :, ::-1])


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
@pytest.mark.parametrize("channels", [3, 1])
def test_loader_warp_gives_the_layers_pixels(fill_mode, channels):
    """`warp_uint8` (OpenCV, in the CPU loader) and `warp` (keras.ops, in the model) resample alike: the same
    matrices give the same pixels up to uint8 rounding, borders ("nearest" / "reflect") included."""
    x = np.random.default_rng(2).integers(0, 256, (8, 20, 24, channels), dtype=np.uint8)
    m = augment.random_matrices(8, SEEDS_RECIPE, 20, 24, np.random.default_rng(5))
    expected = np.asarray(augment.warp(x.astype(np.float32), m, fill_mode))
    got = augment.warp_uint8(x, m, fill_mode)
    assert got.dtype == np.uint8 and got.shape == x.shape
    assert np.abs(got.astype(np.float32) - expected).max() <= 1.0
    assert not np.array_equal(got, x)


def test_loader_warp_refuses_what_it_cannot_take():
    m = augment.random_matrices(2, SEEDS_RECIPE, 8, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        augment.warp_uint8(np.zeros((2, 8, 8, 3), np.float32), m)
    with pytest.raises(ValueError, match="fill_mode"):
        augment.warp_uint8(np.zeros((2, 8, 8, 3), np.uint8), m, "constant")


def test_augmenting_loader_keeps_labels_and_draws_anew_each_time():
    from pipeline.loader import Batches

    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    plain = Batches(x, np.arange(6), 3)
    loader = Batches(x, np.arange(6), 3, augment=SEEDS_RECIPE, seed=1)
    a, ya = loader[0]
    b, yb = loader[0]
    assert a.dtype == np.float32 and a.shape == plain[0][0].shape and ya.tolist() == yb.tolist() == [0, 1, 2]
    assert not np.array_equal(a, plain[0][0]) and not np.array_equal(a, b)


def test_numpy_matrices_equal_the_backend_ones():
    """The loader's NumPy draws and matrices follow the layer's formulas exactly."""
    u = np.random.default_rng(3).random((6, len(augment.DRAWS)), dtype=np.float32)
    ours = augment.affine_matrices(augment.draws_from_uniform(u, SEEDS_RECIPE, 20, 24, np), 20, 24, xp=np)
    backend = augment.affine_matrices(augment.draws_from_uniform(keras.ops.convert_to_tensor(u), SEEDS_RECIPE, 20, 24,
                                                                 keras.ops), 20, 24)
    np.testing.assert_allclose(ours, np.asarray(backend), rtol=1e-5, atol=1e-4)
