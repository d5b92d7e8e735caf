"""Fine-tune stage: phase order enforced, top of the base unfrozen with BatchNorm frozen, augmentation in front."""
import keras
import numpy as np
import pytest

from conftest import run_stages, set_params
from pipeline import backbones, finetune, io, paths


def test_refuses_to_start_without_a_trained_head(trained_copy):
    (paths.MODELS / "head.keras").unlink()
    with pytest.raises(finetune.PhaseOrderError, match="needs a trained head first"):
        run_stages("finetune")


def test_refuses_a_head_trained_for_another_base(trained_copy):
    meta = io.read_json(paths.MODELS / "head.json")
    io.write_json(paths.MODELS / "head.json", {**meta, "cut_layer": "block3_pool"})
    with pytest.raises(finetune.PhaseOrderError, match="another base"):
        run_stages("finetune")


def test_unfreezes_from_the_named_layer_and_keeps_batchnorm_frozen():
    base = backbones.build_base("efficientnet_lite0", "default", 32)
    names = backbones.unfreeze_from(base, "block5a_expand_conv", "efficientnet_lite0")
    trainable = [l for l in base.layers if l.trainable and l.weights]
    assert names[0] == "block5a_expand_conv" and names[-1] == "block5c_add" and trainable
    assert all(l.name in names for l in trainable)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in trainable)
    assert not base.get_layer("stem_conv").trainable
    with pytest.raises(ValueError, match="finetune.unfreeze_from 'nope'"):
        backbones.unfreeze_from(base, "nope", "efficientnet_lite0")


@pytest.mark.parametrize("where", ["model", "loader"])
def test_stage_trains_under_the_head(trained_copy, where):
    head = keras.saving.load_model(paths.MODELS / "head.keras")
    before = [w.copy() for w in head.get_weights()]
    set_params({"finetune": {"epochs": 2, "augment_in": where}})
    run_stages("finetune")
    model = keras.saving.load_model(paths.MODELS / "finetune.keras")
    assert ([l.name for l in model.layers][1] == "augment") == (where == "model")  # else the loader augments
    assert io.read_json(paths.MODELS / "finetune.json")["augment_in"] == where
    tuned_head = model.layers[-1]
    assert tuned_head.name == "head" and any(not np.allclose(a, b) for a, b in zip(before, tuned_head.get_weights()))
    meta = io.read_json(paths.MODELS / "finetune.json")
    assert meta["input"] == "images" and meta["unfreeze_from"] == "block1_conv"
    with np.load(paths.PREDICTIONS_DIR / "finetune.npz") as p:
        assert p["test_prob"].shape == p["test_y"].shape
    x = io.load_npy(paths.CACHE_DIR / "test_x.npy")[:4].astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), model.predict(x, verbose=0))  # no augmentation at inference
    assert (paths.PLOTS / "finetune" / "learning_curves.png").exists()


def test_augmentation_goes_to_the_loader_on_a_cpu():
    from pipeline.params import Finetune

    assert finetune.augment_where(Finetune(), "CPU") == "loader"
    assert finetune.augment_where(Finetune(), "GPU") == "model"
    assert finetune.augment_where(Finetune(augment_in="model"), "CPU") == "model"
