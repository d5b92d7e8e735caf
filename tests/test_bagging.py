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
