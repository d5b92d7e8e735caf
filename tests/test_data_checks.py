"""Knowing the data: near-copies (perceptual hash under flips and turns, pooled features) kept in one split and
flagged as leaks, suspected label errors from out-of-fold predictions, the learning curve over the amount of data,
and a reviewed exclusion list."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_folder, run_stages, set_params
from pipeline import heads, io, learning_curve, manifest, near_copies, paths, phash, report, split
from pipeline.params import Data, Head, Split

T = Image.Transpose


def photo_like(seed: int, size: int = 96) -> Image.Image:
    """A smooth random picture (blobs at several scales), more like a photo than pixel noise."""
    rng = np.random.default_rng(seed)
    a = sum(np.asarray(Image.fromarray(rng.integers(0, 256, (s, s), dtype=np.uint8)).resize((size, size),
                                                                                            Image.BICUBIC), float)
            for s in (3, 6, 12))
    return Image.fromarray(np.clip(a / 3, 0, 255).astype(np.uint8)).convert("RGB")


def test_the_hash_sees_through_flips_and_turns_and_tells_pictures_apart():
    a, b = photo_like(0), photo_like(1)
    hashes = [phash.hashes(a)] + [phash.hashes(a.transpose(o)) for o in phash.ORIENTATIONS[1:]] + [phash.hashes(b)]
    assert len(hashes[0].split()) == 8 and all(len(h) == 64 for h in hashes[0].split())  # 8 x 256 bits, as hex
    pairs = {(i, j): d for i, j, d in phash.close_pairs(hashes, 256)}
    assert all(pairs[(0, k)] <= 8 for k in range(1, 8)), pairs  # each orientation: a few bits of 256 (resampling)
    assert pairs[(0, 8)] > 40  # another picture
    groups = phash.groups(hashes, 16)
    assert len(set(groups[:8])) == 1 and groups[0] >= 0 and groups[8] == -1
    assert (phash.groups(hashes, None) == -1).all()


def add_copies(root, originals):
    """Turned and mirrored copies of `originals` (paths under `root`) beside them: {original: [copies]}."""
    out = {}
    for rel in originals:
        with Image.open(root / rel) as im:
            im.load()
        stem = (root / rel).with_suffix("")
        made = []
        for tag, o in (("r90", T.ROTATE_90), ("flip", T.FLIP_LEFT_RIGHT), ("r270flip", T.TRANSVERSE)):
            im.transpose(o).save(f"{stem}_{tag}.png")
            made.append(f"{rel[:-4]}_{tag}.png")
        out[rel] = made
    return out


def photo_folder(root, per_class=10, seed=0):
    for label, name in enumerate(("cats", "dogs")):
        for i in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            photo_like(seed + 100 * label + i, 48).save(root / name / f"{name}_{i:03d}.png")
    return root


def test_planted_copies_are_grouped_kept_in_one_split_and_fold_and_named(project, tiny_images):
    copies = add_copies(tiny_images, ["cats/cats_001.png", "dogs/dogs_004.png", "dogs/dogs_007.png"])
    set_params({"near_copies": {"cosine": 1.0}})  # random-weight features call all toy pictures alike: hash only
    run_stages("split", "validate", "cache", "extract", "near_copies")
    table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False)
    for original, made in copies.items():
        group = table[table["path"].isin([original, *made])]
        assert len(group) == 4 and group["near_copy"].nunique() == 1 and group["near_copy"].iloc[0] == original
        assert group["split"].nunique() == 1 and group["fold"].nunique() == 1
    assert (table.loc[~table["path"].isin([p for o, m in copies.items() for p in (o, *m)]), "near_copy"] == "").all()
    checked = io.read_json(paths.VALIDATE_REPORT)
    assert checked["success"] and sorted(g["files"][0] for g in checked["near_copies"]) == sorted(copies)
    found = pd.read_csv(paths.NEAR_COPIES, keep_default_na=False)
    by_hash = found[found["kind"] == "hash"]
    assert set(by_hash["path"]) == {p for o, m in copies.items() for p in (o, *m)} and not by_hash["leak"].any()
    summary = io.read_json(paths.METRICS / "near_copies.json")
    assert summary["hash"]["groups"] == 3 and summary["hash"]["images"] == 12 and summary["hash"]["across_splits"] == 0
    page = report.near_copies_part()  # the report page's part: every planted file named
    assert all(p in page for o, m in copies.items() for p in (o, *m))
    assert (paths.DATA_PLOTS / "near_copies.png").stat().st_size > 0


def test_a_test_image_with_a_copy_in_train_is_a_leak(project, tmp_path):
    root = tmp_path / "presplit"
    for part, seed in (("train", 0), ("validation", 50), ("test", 90)):
        photo_folder(root / part, per_class=6 if part == "train" else 3, seed=seed)
    with Image.open(root / "train" / "dogs" / "dogs_002.png") as im:
        im.transpose(T.ROTATE_180).save(root / "test" / "dogs" / "copied.png")  # the folders' own split leaks it
    # the folders' split is honoured; a random-weight CNN's pooled features call all pictures alike: hash only here
    set_params({"data": {"path": str(root), "existing_split": "honour"}, "near_copies": {"cosine": 1.0}})
    run_stages("split", "validate", "cache", "extract", "near_copies")
    checked = io.read_json(paths.VALIDATE_REPORT)
    straddling = [e for e in checked["expectations"] if e["column"] == "splits_per_near_copy"]
    assert not straddling[0]["success"] and straddling[0]["severity"] == "warning"  # validate.duplicates: report
    summary = io.read_json(paths.METRICS / "near_copies.json")
    assert summary["leaks"] == 1 and summary["leak_files"] == ["test/dogs/copied.png"]
    assert "test/dogs/copied.png" in report.near_copies_part()


def test_pooled_features_find_what_the_hash_missed_and_flag_the_leak():
    split_table = pd.DataFrame({"path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
                                "split": ["train", "train", "val", "test", "test"],
                                "class_name": ["x", "y", "x", "x", "y"], "near_copy": ["", "", "", "", ""]})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16))
    x[3] = x[0] * 1.01 + 0.001  # d (test) is a look-alike of a (train): a crop or colour shift the hash missed
    found = near_copies.find(split_table, split_table[["path", "split"]], x, 0.995)
    assert found[["kind", "group", "path", "leak"]].values.tolist() == [["features", "a.png", "a.png", False],
                                                                        ["features", "a.png", "d.png", True]]
    summary = near_copies.summarize(found, 16, 0.995)
    assert summary["leaks"] == 1 and summary["leak_files"] == ["d.png"] and summary["features"]["groups"] == 1
    assert summary["hash"]["groups"] == 0


def test_planted_label_errors_are_found(project, tmp_path):
    """Dark against bright pictures, 5 % of them put in the other class's folder: the out-of-fold models disagree
    with at least 70 % of the flipped labels and with fewer than 5 % of the clean ones."""
    root, rng = tmp_path / "shades", np.random.default_rng(7)
    flipped = set()
    for label, name in enumerate(("dark", "bright")):
        for i in range(60):
            base = 50 + 140 * label + rng.integers(-25, 25)
            a = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            wrong = i % 20 == 3  # 3 of every 60: 5 %
            folder = ("dark", "bright")[1 - label] if wrong else name
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(root / folder / f"{name}_{i:03d}.png")
            if wrong:
                flipped.add(f"{folder}/{name}_{i:03d}.png")
    set_params({"data": {"path": str(root)}, "split": {"ratios": [0.7, 0.2, 0.1]},
                "head": {"designs": ["pooled"], "epochs": 15, "patience": 5}})
    run_stages("split", "validate", "cache", "extract", "cv@pooled-0", "cv@pooled-1", "choose", "label_issues")
    table = pd.read_csv(paths.SPLIT_TABLE)
    seen = set(table.loc[table["split"].isin(["train", "val"]), "path"])  # what cross-validation scores
    planted, clean = flipped & seen, seen - flipped
    issues = pd.read_csv(paths.LABEL_ISSUES)
    found = set(issues["path"])
    assert len(planted) >= 4
    assert len(found & planted) >= 0.7 * len(planted), (sorted(found), sorted(planted))
    assert len(found & clean) < 0.05 * len(clean), sorted(found - planted)
    row = issues[issues["path"].isin(planted)].iloc[0]
    assert row["suggested"] != row["given"] and row["quality"] < 0.5
    assert issues["quality"].is_monotonic_increasing  # worst first
    summary = io.read_json(paths.METRICS / "label_issues.json")
    assert summary["issues"] == len(issues) and summary["rows"] == len(seen)
    assert "data.exclude" in report.label_issues_part()


def test_a_reviewed_list_leaves_its_files_out_and_says_so(tmp_path):
    root = make_folder(tmp_path / "img", per_class=8)
    reviewed = tmp_path / "reviewed.csv"
    pd.DataFrame({"path": ["dogs/dogs_003.png", "cats/cats_005.png"], "given": ["dogs", "cats"]}).to_csv(reviewed,
                                                                                                         index=False)
    table, classes = manifest.ingest(Data(source="folder", path=str(root), exclude=str(reviewed)), workers=1)
    out = split.assign(table, classes, Split(ratios=(0.5, 0.25, 0.25), folds=2), seed=0)
    left = out[out["split"] == "excluded"]
    assert sorted(left["path"]) == ["cats/cats_005.png", "dogs/dogs_003.png"] and (left["fold"] == -1).all()
    assert len(out) == 16 and split.summarize(out, classes, Split(), "folder")["excluded"] == 2
    pd.DataFrame({"path": ["dogs/none.png"]}).to_csv(reviewed, index=False)
    with pytest.raises(manifest.SourceError, match=r"names 1 file\(s\) that are not in the data source: dogs/none.png"):
        manifest.ingest(Data(source="folder", path=str(root), exclude=str(reviewed)), workers=1)
    with pytest.raises(manifest.SourceError, match="which is not a file"):
        manifest.ingest(Data(source="folder", path=str(root), exclude=str(tmp_path / "gone.csv")), workers=1)


def test_editing_the_reviewed_list_reruns_split(project, tmp_path):
    reviewed = tmp_path / "reviewed.csv"
    pd.DataFrame({"path": ["cats/cats_000.png"]}).to_csv(reviewed, index=False)
    set_params({"data": {"exclude": str(reviewed)}})
    run_stages("sources")
    before = paths.SOURCE_INDEX.read_text()
    pd.DataFrame({"path": ["cats/cats_001.png"]}).to_csv(reviewed, index=False)
    run_stages("sources", "split")
    assert paths.SOURCE_INDEX.read_text() != before  # split depends on the listing
    assert "data.exclude" in paths.SOURCE_INDEX.read_text()
    table = pd.read_csv(paths.SPLIT_TABLE)
    assert table.loc[table["split"] == "excluded", "path"].tolist() == ["cats/cats_001.png"]


def test_the_learning_curve_rises_where_more_data_helps():
    """Two Gaussian classes in 40 dimensions: a head trained on a tenth of the rows overfits, on all of them it
    nears the Bayes accuracy; the power law fitted to it extrapolates to a finite gain."""
    rng = np.random.default_rng(0)
    n, d = 600, 40
    y = np.repeat([0, 1], n // 2)
    x = (rng.normal(0, 1, (n, d)) + np.where(y[:, None] == 1, 0.3, -0.3)).astype(np.float32)
    folds = np.arange(n) % 2
    p = heads.recipe(Head(epochs=40, patience=6, dropout=0.0, learning_rate=0.01, batch_size=16), "pooled")
    full = {}
    for k in (0, 1):
        train_rows, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        prob, _, fitted = heads.cross_fit(x, y, train_rows, held, 2, p, 42 + k)
        full[k] = (prob, fitted)
    result = learning_curve.curve(x, y, folds, [0, 1], [0.1, 0.25, 0.5], p, 2, 42, full)
    acc = [q["accuracy_mean"] for q in result["points"]]
    rows = [q["rows"] for q in result["points"]]
    assert rows == sorted(rows) and rows[0] < 30 < 250 < rows[-1]
    assert acc[-1] > acc[0] + 0.05, acc
    law = result["power_law"]
    assert law["b"] > 0 and np.isfinite([law["accuracy_2x"], law["gain_2x_points"]]).all()
    assert 0 < law["gain_2x_points"] < 100 * (1 - law["fitted_accuracy"])  # never past a perfect score
    json.dumps(result)  # what the stage writes to metrics/learning_curve.json


def test_the_power_law_is_finite_when_nothing_is_wrong():
    law = learning_curve.power_law([100, 200, 400], [0.9, 0.95, 1.0], floor=0.001)
    assert np.isfinite([law["a"], law["b"], law["accuracy_2x"]]).all() and law["accuracy_2x"] <= 1.0
    flat = learning_curve.power_law([100, 200, 400], [0.8, 0.8, 0.8], floor=0.001)
    assert flat["b"] == pytest.approx(0, abs=1e-9) and flat["gain_2x_points"] == pytest.approx(0, abs=1e-6)


def test_the_subsample_is_stratified_and_seeded():
    y = np.array([0] * 90 + [1] * 10)
    a = learning_curve.subsample(y, 0.1, 3)
    assert np.bincount(y[a]).tolist() == [9, 2] and np.array_equal(a, learning_curve.subsample(y, 0.1, 3))
    assert not np.array_equal(a, learning_curve.subsample(y, 0.1, 4))
