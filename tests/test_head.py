"""Head stage: the chosen recipe refit on train+val, with its model file, metadata, predictions and curves; the
head designs as recipes."""
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import features, heads, io, loader, models, paths, predictions, train
from pipeline.params import DESIGNS, Head


def test_head_outputs(trained):
    meta = io.read_json(trained / paths.MODELS / "head.json")
    assert meta["input"] == "images" and meta["classes"] == ["cats", "dogs"] and meta["image_size"] == 48
    model, _ = models.load(str(trained / paths.MODELS / "head.keras"))
    assert model.output_shape == (None, 1)
    head = model.get_layer("classifier").get_layer("head")  # the head on its features, inside the image-in model
    with np.load(trained / paths.PREDICTIONS_DIR / "head.npz") as p:
        x, y = io.load_pair(trained / paths.FEATURES_DIR / "test")
        if meta["design"]["features"] == "pooled":
            x = io.load_npy(trained / paths.FEATURES_DIR / "test_pooled.npy")
        assert p["test_prob"].shape == (len(y),) and p["test_y"].tolist() == y.tolist()
        np.testing.assert_allclose(p["test_prob"], predictions.probabilities(head, x), atol=1e-5)
        assert ((p["cv_prob"] >= 0.5) == p["cv_y"]).mean() >= 0.75  # the toy classes are learnable, out of fold
    history = (trained / "plots/head/history.csv").read_text().splitlines()
    recipe = io.read_json(trained / paths.RECIPE)
    assert meta["design"]["name"] == recipe["design"] and meta["threshold"] == recipe["threshold"]
    assert history[0].startswith("epoch,") and len(history) == 1 + recipe["epochs"]  # exactly the epochs CV chose
    assert (trained / "plots/head/learning_curves.png").stat().st_size > 1000


def test_class_weights_balance_the_classes():
    y = np.array([0] * 30 + [1] * 10)
    w = train.class_weights(y, 2, "balanced")
    assert w[0] * 30 == w[1] * 10 == 20
    assert train.class_weights(y, 2, "none") is None


def test_softmax_for_more_than_two_classes():
    model = heads.build((4, 4, 8), 3, heads.recipe(Head(hidden=8), "map_h"))
    assert model.output_shape == (None, 3) and model.layers[-1].activation.__name__ == "softmax"
    assert heads.build((4, 4, 8), 2, heads.recipe(Head(hidden=0), "map")).layers[-1].activation.__name__ == "sigmoid"


def test_batches_reshuffle_every_epoch_and_keep_pairs():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(10)
    b = loader.Batches(images, labels, 4, shuffle=True, seed=0)
    epoch1 = np.concatenate([b[i][1] for i in range(len(b))])
    b.on_epoch_end()
    epoch2 = np.concatenate([b[i][1] for i in range(len(b))])
    assert sorted(epoch1) == list(range(10)) and not np.array_equal(epoch1, epoch2)
    for i in range(len(b)):
        x, y = b[i]
        assert x.dtype == np.float32 and (x[:, 0, 0, 0] == y).all()  # images stay with their labels


def test_conv_head_or_pooling_head():
    conv = heads.build((6, 6, 8), 2, heads.recipe(Head(conv_filters=4, conv_layers=2, hidden=0), "map_h"))
    convs = [l for l in conv.layers if isinstance(l, keras.layers.Conv2D)]
    assert [l.name for l in convs] == ["head_conv1", "head_conv2"] and convs[0].filters == 4
    assert conv.get_layer("head_flip").mode == "horizontal"  # left-right flips only
    pooled = heads.build((6, 6, 8), 2, heads.recipe(Head(conv_filters=0), "map"))
    assert not any(isinstance(l, (keras.layers.Conv2D, keras.layers.RandomFlip)) for l in pooled.layers)
    flat = heads.build((8,), 2, heads.recipe(Head(), "pooled"))  # a flat feature vector: no map-only layers
    assert flat.output_shape == (None, 1) and not any(isinstance(l, keras.layers.Conv2D) for l in flat.layers)


def test_feature_stats_standardise_per_channel():
    x = np.random.default_rng(0).normal(3.0, 2.0, (50, 4, 4, 3)).astype(np.float16)
    mean, var = heads.feature_stats(x, chunk=7)
    flat = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, flat.var(0), rtol=1e-4)
    model = heads.build((4, 4, 3), 2, heads.recipe(Head(conv_filters=0), "map"), stats=(mean, var))
    standardised = keras.Model(model.inputs, model.get_layer("head_standardise").output).predict(x, verbose=0)
    np.testing.assert_allclose(standardised.reshape(-1, 3).mean(0), 0, atol=1e-3)


def test_flip_axes_and_test_time_average():
    assert models.flip_axes(heads.recipe(Head(), "map")) == ((),)
    assert models.flip_axes(heads.recipe(Head(), "map_hv")) == ((), (2,), (1,), (1, 2))
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs)))
    x = np.random.default_rng(1).normal(size=(5, 4, 4, 1)).astype(np.float32)
    flips = models.flip_axes(heads.recipe(Head(), "map_hv"))
    expected = np.mean([model.predict(np.flip(x, a) if a else x, verbose=0)[:, 0] for a in flips], axis=0)
    np.testing.assert_allclose(predictions.probabilities(model, x, flips=flips), expected, rtol=1e-5)
    batches = loader.Batches(x, np.zeros(5, np.int64), 2)
    np.testing.assert_allclose(predictions.probabilities(model, batches, flips=flips), expected, rtol=1e-5)
    assert not np.allclose(predictions.probabilities(model, x), expected)  # the flips do change this model's answer


def test_conv_head_finds_a_local_spot_wherever_it_is():
    """Class 1 maps hold one bright 2x2 spot at a random place, class 0 none (a crack somewhere in a cell): the
    convolutional head, max-pooled over the map and trained on flipped maps, finds it."""

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (320, 10, 10, 4)).astype(np.float32)
    y = np.arange(320) % 2
    for i in np.where(y == 1)[0]:
        r, c = rng.integers(0, 9, 2)
        x[i, r:r + 2, c:c + 2, :] += 2.5
    p = heads.recipe(Head(conv_filters=8, conv_layers=2, epochs=25, batch_size=32, learning_rate=0.01, patience=25),
                     "map_hv")
    model, _ = heads.train_head((x[:240], y[:240]), (x[240:], y[240:]), 2, p, seed=0, verbose=0)
    prob = predictions.probabilities(model, x[240:], flips=models.flip_axes(p))
    assert ((prob >= 0.5) == y[240:]).mean() >= 0.9


def test_head_designs_as_recipes():
    got = {d: heads.recipe(Head(), d) for d in DESIGNS}
    assert [(r.features, r.horizontal_flip, r.vertical_flip) for r in got.values()] == [
        ("pooled", False, False), ("map", False, False), ("map", True, False), ("map", True, True)]
    assert heads.flips_of(got["pooled"]) == ((),)  # a vector has no flips
    assert heads.flips_of(got["map_hv"]) == ((), (2,), (1,), (1, 2))
    assert heads.recipe(got["map_h"], "pooled", epochs=7).features == "pooled"  # a recipe re-designed
    with pytest.raises(ValueError):
        Head(designs=["map", "map"])


def test_refit_trains_on_train_and_val_rows_only_and_is_the_registered_file(trained_copy):
    """The refit sees every train+val row and no test row: its standardisation statistics are those of the
    train+val features exactly (test rows are different); the file registered is the refit model's."""
    import mlflow

    from conftest import run_stages, set_params

    set_params({"head": {"designs": ["map"]}, "evaluate": {"models": ["head"]}})
    run_stages("choose", "head")  # the map design's folds are there already
    meta = models.read_meta("head")
    x, y, _ = features.train_val()
    assert meta["design"]["name"] == "map" and meta["trained_on"] == {"splits": ["train", "val"], "rows": len(y)}
    layer = models.load("head")[0].get_layer("classifier").get_layer("head").get_layer("head_standardise")
    mean = np.asarray(layer.mean).reshape(-1)
    np.testing.assert_allclose(mean, heads.feature_stats(x)[0], rtol=1e-5)
    with_test = np.concatenate([x, features.load_features("test")[0]])
    assert not np.allclose(mean, heads.feature_stats(with_test)[0], rtol=1e-5)
    run_stages("evaluate", "export")  # registers the delivered model (the gate is open here)
    version = mlflow.MlflowClient().search_model_versions("name = 'image-classifier'")[0]
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/image-classifier/{version.version}"))
    assert [f.read_bytes() for f in logged.rglob("*.keras")] == [models.path("head").read_bytes()]


def test_a_refit_decays_the_learning_rate_along_a_cosine():
    """With no rows held back there is no plateau to watch: the rate falls from its compiled value towards zero."""
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    p = heads.recipe(Head(epochs=4, learning_rate=0.01, batch_size=8, hidden=0), "pooled")
    model, history = heads.train_head((x, y), None, 2, p, seed=0, verbose=0)
    assert len(history) == 4 and "val_loss" not in history
    np.testing.assert_allclose(history["learning_rate"], [0.01 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)],
                               rtol=1e-5)
