"""Bagging stage: members trained on bootstrap resamples; the ensemble differs from any single member."""
import numpy as np

from conftest import run_stages
from pipeline import bagging, evaluate, paths


def test_bootstrap_resamples_with_replacement():
    rows = bagging.bootstrap(100, 1.0, seed=3)
    assert len(rows) == 100 and len(np.unique(rows)) < 100
    assert not np.array_equal(rows, bagging.bootstrap(100, 1.0, seed=4))
    assert len(bagging.bootstrap(100, 0.5, seed=3)) == 50


def test_members_and_ensemble(trained_copy):
    run_stages("bagging@0", "bagging@1")
    assert (paths.MODELS / "bagging" / "member_0.keras").exists()
    m0, m1 = (np.load(paths.PREDICTIONS_DIR / "bagging" / f"member_{i}.npz") for i in (0, 1))
    assert not np.allclose(m0["test_prob"], m1["test_prob"])
    ensemble = evaluate.load_predictions("bagging")
    np.testing.assert_allclose(ensemble["test_prob"], (m0["test_prob"] + m1["test_prob"]) / 2)
    assert not np.allclose(ensemble["test_prob"], m0["test_prob"])
    assert len(ensemble["members"]) == 2
