"""Bagging: members of the chosen recipe cross-validated on bootstrap resamples; the ensemble stage keeps the first n
by cross-validation and delivers the head and them as one image-in model."""
import keras
import numpy as np
import pytest

from conftest import MEMBERS, run_stages, set_params
from pipeline import ensemble, features, io, members, models, params, paths, predictions


def test_bootstrap_resamples_with_replacement():
    rows = members.bootstrap(100, 1.0, seed=3)
    assert len(rows) == 100 and len(np.unique(rows)) < 100
    assert not np.array_equal(rows, members.bootstrap(100, 1.0, seed=4))
    assert len(members.bootstrap(100, 0.5, seed=3)) == 50


def test_member_folds_and_the_ensemble(trained_copy):
    run_stages(*MEMBERS, "ensemble")
    _, y, folds = features.train_val(pooled=True)
    member = predictions.out_of_fold("bagging/member_1", folds, [0, 1])
    head = predictions.load("head")
    assert member.shape == head["cv_prob"].shape and not np.isnan(member).any()
    assert not np.allclose(member, head["cv_prob"])  # another seed and resample
    result = io.read_json(paths.METRICS / "cv_bagging.json")
    assert set(result["counts"]) == {"0", "1"} and result["members"] in (0, 1)
    meta = models.read_meta("bagging")
    assert meta["parts"] == ["head", "bagging/member_1"][:1 + result["members"]]
    assert meta["trained_on"]["rows"] == len(y)


def test_the_kept_members_are_refit_and_averaged_with_the_head(trained_copy):
    run_stages(*MEMBERS)
    prm = params.load()
    _, _, folds = features.train_val(pooled=True)
    kept = [predictions.out_of_fold("bagging/member_1", folds, [0, 1])]
    ensemble.deliver(prm, [1], predictions.load("head"), kept, {"threshold": 0.5})  # as if cross-validation had kept member 1
    model, meta = models.load("bagging")
    assert meta["parts"] == ["head", "bagging/member_1"] and meta["members"][0]["member"] == 1
    assert [l.name for l in model.get_layer("classifier").layers if isinstance(l, keras.Model)] == ["head", "member_1"]
    x = io.load_npy(paths.CACHE_DIR / "test_x.npy")
    with np.load(paths.PREDICTIONS_DIR / "bagging.npz") as e, np.load(paths.PREDICTIONS_DIR / "head.npz") as h:
        np.testing.assert_allclose(models.predict(model, x), e["test_prob"], atol=1e-4)  # the file is the mean
        assert not np.allclose(e["test_prob"], h["test_prob"])
        member_cv = predictions.out_of_fold("bagging/member_1", h["cv_fold"], [0, 1])
        np.testing.assert_allclose(e["cv_prob"], (h["cv_prob"] + member_cv) / 2)
    assert (paths.PLOTS / "ensemble" / "member_1" / "history.csv").exists()


def test_a_member_without_its_folds_is_a_clear_error(trained_copy):
    run_stages(*MEMBERS)
    set_params({"bagging": {"members": [1, 5]}})
    with pytest.raises(FileNotFoundError, match="bagging/member_5.*dvc repro"):
        ensemble.main([])


def test_no_members_delivers_the_head(trained_copy):
    set_params({"bagging": {"members": []}})
    run_stages("ensemble")
    assert io.read_json(paths.METRICS / "cv_bagging.json")["members"] == 0
    assert models.read_meta("bagging")["parts"] == ["head"]


def test_members_on_several_backbones(trained_copy):
    """bagging.backbones: member i on backbones[i % n]; extract writes the others' features beside the main ones,
    and the ensemble is one image-in model with a (features, classifier) pair per backbone."""
    from pipeline import report

    set_params({"bagging": {"backbones": ["small_cnn", "efficientnet_lite0"], "members": [1, 2]}})
    run_stages("extract", *MEMBERS, "bagging@2-0", "bagging@2-1")
    lite = io.read_json(features.features_dir("efficientnet_lite0") / "meta.json")
    assert lite["name"] == "efficientnet_lite0" and lite["cut_layer"] == "block5c_add"
    assert io.read_json(paths.FEATURES_DIR / "meta.json")["name"] == "small_cnn"
    _, _, folds = features.train_val(pooled=True)
    kept = [predictions.out_of_fold(f"bagging/member_{m}", folds, [0, 1]) for m in (1, 2)]
    ensemble.deliver(params.load(), [1, 2], predictions.load("head"), kept, {"threshold": 0.5})  # member 1 on Lite0, member 2 on small_cnn
    model, meta = models.load("bagging")
    assert [m["backbone"] for m in meta["members"]] == ["efficientnet_lite0", "small_cnn"]
    assert [b["name"] for b in meta["backbones"]] == ["small_cnn", "efficientnet_lite0"]
    parts = models.group_parts(model)
    assert [f.name for f, _ in parts] == ["features", "features_1"]
    assert [[l.name for l in c.layers if isinstance(l, keras.Model)] for _, c in parts] == \
        [["head", "member_2"], ["member_1"]]
    images, y = io.load_pair(paths.CACHE_DIR / "test")
    with np.load(paths.PREDICTIONS_DIR / "bagging.npz") as e:  # the file's model gives the stage's mean of parts
        np.testing.assert_allclose(models.predict(model, images), e["test_prob"], atol=1e-4)
    cams = report.grad_cam(model, np.asarray(images[:2]), y[:2])
    assert cams.shape == (2, *images.shape[1:3]) and cams.max() <= 1.0
    # both backbones' maps count: the mean differs from the first pair's map alone
    (f0, c0), _ = parts
    assert not np.allclose(cams, report._grad_cam(f0, c0, np.asarray(images[:2]), y[:2]))
    assert (cams.reshape(2, -1).max(1) > 0).all()
