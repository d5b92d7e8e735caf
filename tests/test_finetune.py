"""Fine-tune stage: phase order enforced, top of the base unfrozen with BatchNorm frozen, augmentation in front."""
import keras
import numpy as np
import pytest

from conftest import run_stages, set_params
from pipeline import backbones, finetune, heads, io, models, paths, train


def test_refuses_to_start_without_a_trained_head(trained_copy):
    (paths.MODELS / "head.keras").unlink()
    with pytest.raises(finetune.PhaseOrderError, match="needs a trained head first"):
        run_stages("finetune")


def test_refuses_a_head_trained_for_another_base(trained_copy):
    meta = io.read_json(paths.MODELS / "head.json")
    io.write_json(paths.MODELS / "head.json", {**meta, "backbone": {**meta["backbone"], "cut_layer": "block3_pool"}})
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


def test_unfrozen_weights_change_while_batchnorm_statistics_do_not():
    """One real fine-tuning fit: a layer above `unfreeze_from` learns; BatchNorm's moving statistics (and the
    frozen layers below) stay exactly as they were, because the base runs in inference mode."""
    from pipeline.params import Finetune, Head

    keras.utils.set_random_seed(0)
    base = backbones.build_base("efficientnet_lite0", "default", 32)
    classifier = heads.build(base.output_shape[1:], 2, heads.recipe(Head(conv_filters=4), "map"))
    backbones.unfreeze_from(base, "block5a_expand_conv", "efficientnet_lite0")
    before = {l.name: [w.copy() for w in l.get_weights()] for l in base.layers if l.weights}
    model = train.compile_for(finetune.build(base, classifier, Finetune(), seed=0, in_model=False), 2, 1e-2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (16, 32, 32, 3)).astype(np.float32), np.array([0, 1] * 8)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    changed = {n for n, ws in before.items()
               if any(not np.array_equal(a, b) for a, b in zip(ws, base.get_layer(n).get_weights()))}
    assert "block5a_expand_conv" in changed and "block5c_project_conv" in changed
    bn = [l.name for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and not changed & set(bn), sorted(changed & set(bn))  # moving mean/variance (and gamma/beta) fixed
    assert "stem_conv" not in changed and "block4a_expand_conv" not in changed  # below the unfreeze point


@pytest.mark.parametrize("where", ["model", "loader"])
def test_stage_trains_under_the_head(trained_copy, where):
    head_model, _ = models.load("head")
    before = [w.copy() for w in head_model.get_layer("classifier").get_layer("head").get_weights()]
    set_params({"finetune": {"epochs": 2, "augment_in": where}})
    run_stages("finetune")
    model, meta = models.load("finetune")
    assert meta["augment_in"] == where  # augmented in the model or by the loader while training ...
    assert "augment" not in [l.name for l in model.layers]  # ... never in the delivered model
    tuned_head = model.get_layer("classifier").get_layer("head")
    assert any(not np.allclose(a, b) for a, b in zip(before, tuned_head.get_weights()))
    assert meta["input"] == "images" and meta["unfreeze_from"] == "block1_conv"
    with np.load(paths.PREDICTIONS_DIR / "finetune.npz") as p:
        assert p["test_prob"].shape == p["test_y"].shape
    x = io.load_npy(paths.CACHE_DIR / "test_x.npy")[:4].astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), model.predict(x, verbose=0))  # no augmentation at inference
    assert (paths.PLOTS / "finetune" / "learning_curves.png").exists()


def test_augmentation_goes_to_the_loader_on_a_cpu():
    from pipeline.params import Finetune

    from pipeline.device import Device

    cpu, gpu = Device("tensorflow", "", "CPU", ()), Device("jax", "", "GPU", ("gpu:H100",))
    assert finetune.augment_where(Finetune(), cpu) == "loader"
    assert finetune.augment_where(Finetune(), gpu) == "model"
    assert finetune.augment_where(Finetune(augment_in="model"), cpu) == "model"
    assert (cpu.mixed_policy, gpu.mixed_policy) == ("mixed_bfloat16", "mixed_float16")


def test_open_flips_follow_the_heads_design():
    """`null` fine-tune flips take the head's chosen design (a flip cross-validation did not keep is not assumed to
    keep the label); a flip set in params stays; an open flip never reaches the warp."""
    from pipeline import augment
    from pipeline.params import Augment

    design = {"horizontal_flip": True, "vertical_flip": False}
    got = finetune.augmentation(Augment(horizontal_flip=None, vertical_flip=None), design)
    assert (got.horizontal_flip, got.vertical_flip) == (True, False)
    assert finetune.augmentation(Augment(vertical_flip=True), design).vertical_flip is True
    with pytest.raises(ValueError, match="resolved by the fine-tune stage"):
        augment.Augment(Augment(vertical_flip=None))
