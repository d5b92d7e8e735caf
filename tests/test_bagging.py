"""Bagging stage: members trained on bootstrap resamples; the ensemble stage averages exactly the members params
name, as one image-in model."""
import keras
import numpy as np
import pytest

from conftest import run_stages, set_params
from pipeline import bagging, models, paths


def test_bootstrap_resamples_with_replacement():
    rows = bagging.bootstrap(100, 1.0, seed=3)
    assert len(rows) == 100 and len(np.unique(rows)) < 100
    assert not np.array_equal(rows, bagging.bootstrap(100, 1.0, seed=4))
    assert len(bagging.bootstrap(100, 0.5, seed=3)) == 50


def test_members_and_ensemble(trained_copy):
    run_stages("bagging@0", "bagging@1", "ensemble")
    assert models.read_meta("bagging/member_0")["input"] == "features"
    m0, m1 = (np.load(paths.PREDICTIONS_DIR / "bagging" / f"member_{i}.npz") for i in (0, 1))
    assert not np.allclose(m0["test_prob"], m1["test_prob"])
    with np.load(paths.PREDICTIONS_DIR / "bagging.npz") as e:
        np.testing.assert_allclose(e["test_prob"], (m0["test_prob"] + m1["test_prob"]) / 2)
        assert not np.allclose(e["test_prob"], m0["test_prob"])
    assert models.read_meta("bagging")["members"] == ["bagging/member_0", "bagging/member_1"]
    assert (paths.PLOTS / "bagging" / "member_1" / "history.csv").exists()


def test_a_dropped_member_is_not_averaged_in(trained_copy):
    run_stages("bagging@0", "bagging@1")
    set_params({"bagging": {"members": [1]}})
    run_stages("ensemble")  # member 0's files are still on disk
    with np.load(paths.PREDICTIONS_DIR / "bagging.npz") as e, np.load(paths.PREDICTIONS_DIR / "bagging/member_1.npz") as m1:
        np.testing.assert_allclose(e["test_prob"], m1["test_prob"])
    model, meta = models.load("bagging")
    assert meta["members"] == ["bagging/member_1"]
    assert [l.name for l in model.get_layer("classifier").layers if isinstance(l, keras.Model)] == ["member_1"]
    set_params({"bagging": {"members": [1, 5]}})
    try:
        run_stages("ensemble")
        raise AssertionError("an untrained member must be an error")
    except FileNotFoundError as e:
        assert "member_5" in str(e) and "dvc repro bagging@5" in str(e)


def test_an_empty_member_list_is_a_clear_error(trained_copy):
    from pipeline import ensemble

    set_params({"bagging": {"members": []}})
    with pytest.raises(ValueError, match="bagging.members: List should have at least 1 item"):
        ensemble.main([])  # refused by the params schema before anything is read or written


def test_members_on_several_backbones(trained_copy):
    """bagging.backbones: member i on backbones[i % n]; extract writes the others' features beside the main ones,
    and the ensemble is one image-in model with a (features, classifier) pair per backbone."""
    from pipeline import features, io, report

    set_params({"bagging": {"backbones": ["small_cnn", "efficientnet_lite0"], "members": [0, 1, 2]}})
    run_stages("extract", "bagging@0", "bagging@1", "bagging@2", "ensemble")
    lite = io.read_json(features.features_dir("efficientnet_lite0") / "meta.json")
    assert lite["name"] == "efficientnet_lite0" and lite["cut_layer"] == "block5c_add"
    assert io.read_json(paths.FEATURES_DIR / "meta.json")["name"] == "small_cnn"
    assert [models.read_meta(f"bagging/member_{i}")["backbone"]["name"] for i in (0, 1, 2)] == \
        ["small_cnn", "efficientnet_lite0", "small_cnn"]
    model, meta = models.load("bagging")
    assert [b["name"] for b in meta["backbones"]] == ["small_cnn", "efficientnet_lite0"]
    parts = models.group_parts(model)
    assert [f.name for f, _ in parts] == ["features", "features_1"]
    assert [[l.name for l in c.layers if isinstance(l, keras.Model)] for _, c in parts] == \
        [["member_0", "member_2"], ["member_1"]]
    images, y = io.load_pair(paths.CACHE_DIR / "val")
    with np.load(paths.PREDICTIONS_DIR / "bagging.npz") as e:  # the file's model gives the stage's mean of members
        np.testing.assert_allclose(models.predict(model, images), e["val_prob"], atol=1e-4)
    cams = report.grad_cam(model, np.asarray(images[:2]), y[:2])
    assert cams.shape == (2, *images.shape[1:3]) and cams.max() <= 1.0
    # both backbones' maps count: the mean differs from the first pair's map alone, and no image's map is blank
    (f0, c0), _ = parts
    assert not np.allclose(cams, report._grad_cam(f0, c0, np.asarray(images[:2]), y[:2]))
    assert (cams.reshape(2, -1).max(1) > 0).all()
