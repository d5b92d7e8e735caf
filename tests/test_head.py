"""Head stage: a dense classifier on the features, with its model file, metadata, predictions and curves."""
import keras
import numpy as np

from pipeline import io, paths, train
from pipeline.params import Head


def test_head_outputs(trained):
    meta = io.read_json(trained / paths.MODELS / "head.json")
    assert meta["input"] == "features" and meta["classes"] == ["cats", "dogs"] and meta["image_size"] == 48
    model = keras.saving.load_model(trained / paths.MODELS / "head.keras")
    assert model.output_shape == (None, 1)
    with np.load(trained / paths.PREDICTIONS_DIR / "head.npz") as p:
        x, y = io.load_pair(trained / paths.FEATURES_DIR / "test")
        assert p["test_prob"].shape == (len(y),) and p["test_y"].tolist() == y.tolist()
        np.testing.assert_allclose(p["test_prob"], train.probabilities(model, x), atol=1e-5)
        assert ((p["val_prob"] >= 0.5) == p["val_y"]).mean() >= 0.75  # the toy classes are learnable
    history = (trained / "plots/head/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and "val_loss" in history[0] and len(history) >= 2
    assert (trained / "plots/head/learning_curves.png").stat().st_size > 1000


def test_class_weights_balance_the_classes():
    y = np.array([0] * 30 + [1] * 10)
    w = train.class_weights(y, 2, "balanced")
    assert w[0] * 30 == w[1] * 10 == 20
    assert train.class_weights(y, 2, "none") is None


def test_softmax_for_more_than_two_classes():
    model = train.build_head((4, 4, 8), 3, Head(hidden=8))
    assert model.output_shape == (None, 3) and model.layers[-1].activation.__name__ == "softmax"
    assert train.build_head((4, 4, 8), 2, Head(hidden=0)).layers[-1].activation.__name__ == "sigmoid"


def test_batches_reshuffle_every_epoch_and_keep_pairs():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(10)
    b = train.Batches(images, labels, 4, shuffle=True, seed=0)
    epoch1 = np.concatenate([b[i][1] for i in range(len(b))])
    b.on_epoch_end()
    epoch2 = np.concatenate([b[i][1] for i in range(len(b))])
    assert sorted(epoch1) == list(range(10)) and not np.array_equal(epoch1, epoch2)
    for i in range(len(b)):
        x, y = b[i]
        assert x.dtype == np.float32 and (x[:, 0, 0, 0] == y).all()  # images stay with their labels
