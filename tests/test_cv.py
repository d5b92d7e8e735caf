"""Cross-validation makes the choices: folds over train+val only, the one-standard-error rule, the threshold rule,
the out-of-fold table, and no test row read before evaluate."""
import numpy as np
import pandas as pd
import pytest

from conftest import CV, MEMBERS, run_stages
from pipeline import choose, ensemble, features, io, paths, selection


def fold_labels(n_folds=5, per_fold=100, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, n_folds * per_fold), np.repeat(np.arange(n_folds), per_fold)


def scoring(y, folds, accuracy_per_fold, seed=1, confidence=0.8):
    """Probabilities (`confidence` or 1 - it) right on exactly the given share of each fold's rows."""
    rng = np.random.default_rng(seed)
    prob = np.where(y == 1, confidence, 1 - confidence).astype(float)
    for k, acc in enumerate(accuracy_per_fold):
        rows = np.flatnonzero(folds == k)
        wrong = rng.choice(rows, round((1 - acc) * len(rows)), replace=False)
        prob[wrong] = 1 - prob[wrong]
    return prob


def test_folds_are_disjoint_and_cover_train_and_val_exactly(trained_copy):
    x, y, folds = features.train_val()
    index = pd.read_csv(paths.FEATURES_DIR / "index.csv")
    table = pd.read_csv(paths.SPLIT_TABLE)
    assert len(x) == len(y) == len(folds) == (table["split"] != "test").sum()
    held = [features.fold_rows(folds, k)[1] for k in (0, 1)]
    assert not set(held[0]) & set(held[1]) and sorted([*held[0], *held[1]]) == list(range(len(y)))
    train0, held0 = features.fold_rows(folds, 0)
    assert not set(train0) & set(held0)
    assert set(index.loc[index["split"] != "test", "path"]) == set(table.loc[table["split"] != "test", "path"])
    with pytest.raises(ValueError, match="fold 7 holds no rows"):
        features.fold_rows(folds, 7)


def test_a_candidate_lucky_on_the_validation_split_loses_in_cv():
    """`pooled` is perfect on fold 0 (as if it were the validation split) and poor elsewhere; `map_hv` is steady.
    Judged on fold 0 alone, pooled would win; cross-validation chooses map_hv."""
    y, folds = fold_labels()
    lucky = scoring(y, folds, [1.0, 0.7, 0.7, 0.7, 0.7])
    steady = scoring(y, folds, [0.85] * 5, seed=2)
    on_val = {name: ((p[folds == 0] >= 0.5) == y[folds == 0]).mean() for name, p in (("pooled", lucky), ("map_hv", steady))}
    assert on_val["pooled"] > on_val["map_hv"]
    result = choose.choose(y, folds, {"pooled": lucky, "map_hv": steady}, {"pooled": [3] * 5, "map_hv": [4, 5, 6, 7, 9]})
    assert result["design"] == "map_hv" and result["epochs"] == 6  # the median of its folds' best epochs
    assert result["designs"]["pooled"]["fold_accuracy"] == pytest.approx([1.0, 0.7, 0.7, 0.7, 0.7])


def test_within_one_standard_error_the_simpler_wins_and_rounding_cannot_flip_it():
    scores = {"map_hv": {"balanced_accuracy_mean": 0.86, "balanced_accuracy_se": 0.03},
              "map_h": {"balanced_accuracy_mean": 0.84, "balanced_accuracy_se": 0.01},
              "pooled": {"balanced_accuracy_mean": 0.80, "balanced_accuracy_se": 0.02}}
    order = sorted(scores, key=selection.design_rank)
    assert order == ["pooled", "map_h", "map_hv"]
    assert selection.one_standard_error(scores, order) == "map_h"  # 0.84 >= 0.86 - 0.03; pooled is not
    for eps in (1e-12, -1e-12):  # a rounding-size change to any score
        nudged = {d: {**s, "balanced_accuracy_mean": s["balanced_accuracy_mean"] + eps * (i + 1)} for i, (d, s) in enumerate(scores.items())}
        assert selection.one_standard_error(nudged, order) == "map_h"
    at_bar = {**scores, "pooled": {"balanced_accuracy_mean": 0.83 - 1e-12, "balanced_accuracy_se": 0.0}}  # on the bar, give or take
    assert selection.one_standard_error(at_bar, order) == "pooled"
    tie = {"map_h": {"balanced_accuracy_mean": 0.85, "balanced_accuracy_se": 0.0},
           "map": {"balanced_accuracy_mean": 0.85, "balanced_accuracy_se": 0.0}}
    assert selection.one_standard_error(tie, ["map", "map_h"]) == "map"  # a tie goes to the simpler, always


def test_the_threshold_rule_keeps_0_5_unless_a_tuned_one_wins_in_cv():
    y, folds = fold_labels()
    good = scoring(y, folds, [0.9] * 5)
    rule, t, scores = selection.threshold_rule(y, good, folds)
    assert rule == "0.5" and t == 0.5 and set(scores) == {"0.5", "tuned"}
    shifted = np.where(y == 1, 0.4, 0.1) + np.random.default_rng(3).uniform(0, 0.05, len(y))  # all below 0.5
    rule, t, scores = selection.threshold_rule(y, shifted, folds)
    assert rule == "tuned" and 0.15 < t <= 0.45 and scores["tuned"]["accuracy_mean"] >= 0.99
    assert scores["0.5"]["accuracy_mean"] == pytest.approx((y == 0).mean())  # 0.5 calls every row negative
    assert selection.threshold_rule(y, np.stack([1 - good, good], 1), folds)[0] == "argmax"


def test_the_number_of_members_is_chosen_the_same_way():
    y, folds = fold_labels()
    head = scoring(y, folds, [0.8] * 5)
    same = [head.copy(), head.copy()]
    assert ensemble.choose_count(y, folds, head, same)["members"] == 0  # members that add nothing: the head alone
    weak = scoring(y, folds, [0.8] * 5, confidence=0.6)
    strong = scoring(y, folds, [0.95] * 5, seed=4, confidence=0.9)  # it outvotes the head
    picked = ensemble.choose_count(y, folds, weak, [strong, strong.copy()])
    assert set(picked["counts"]) == {"0", "1", "2"} and picked["counts"]["1"]["accuracy_mean"] > 0.9
    assert picked["members"] == 1  # a second copy adds nothing: the fewer members


def test_choose_stage_writes_the_recipe_and_out_of_fold_table(trained):
    result = io.read_json(trained / paths.METRICS / "cv.json")
    recipe = io.read_json(trained / paths.RECIPE)
    assert set(result["designs"]) == {"pooled", "map"} and recipe["design"] == result["design"]
    for s in result["designs"].values():
        assert s["folds"] == 2 and len(s["fold_accuracy"]) == 2 and "log_loss_mean" in s
    oof = pd.read_csv(trained / paths.OOF_TABLE)
    table = pd.read_csv(trained / paths.SPLIT_TABLE)
    trainval = table.loc[table["split"] != "test"]
    assert len(oof) == 2 * len(trainval) and set(oof["design"]) == {"pooled", "map"}
    assert set(oof["path"]) == set(trainval["path"]) and not oof["path"].str.startswith("/").any()
    np.testing.assert_allclose(oof["prob_cats"] + oof["prob_dogs"], 1.0, atol=1e-6)
    merged = oof.merge(trainval[["path", "fold"]], on="path", suffixes=("", "_split"))
    assert (merged["fold"] == merged["fold_split"]).all()  # each row predicted by the fold that held it out


def test_no_test_row_is_read_before_evaluate(trained_copy):
    """Every test feature replaced by noise: the CV folds, the choices and the member count come out identical (and
    two runs give the same numbers: seeded, deterministic ops)."""
    run_stages(*MEMBERS, "ensemble")
    before = {f: io.read_json(f) for f in (paths.METRICS / "cv.json", paths.METRICS / "cv_bagging.json", paths.RECIPE)}
    folds = {f: np.load(f)["prob"] for f in sorted(paths.CV_DIR.rglob("fold_*.npz"))}
    rng = np.random.default_rng(0)
    for name in ("test_x.npy", "test_pooled.npy"):
        clean = io.load_npy(paths.FEATURES_DIR / name, mmap=False)
        io.save_npy(paths.FEATURES_DIR / name, rng.normal(0, 100, clean.shape).astype(clean.dtype))
    run_stages(*CV, "head", *MEMBERS, "ensemble")
    assert {f: io.read_json(f) for f in before} == before
    after = {f: np.load(f)["prob"] for f in sorted(paths.CV_DIR.rglob("fold_*.npz"))}
    assert list(after) == list(folds) and all(np.array_equal(after[f], folds[f]) for f in folds)
    assert len(folds) == len(CV) - 1 + len(MEMBERS)  # every design's and every member's folds were compared
