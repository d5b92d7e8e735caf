"""Split stage: data sources, holdout by ratios or counts, folds, groups, duplicates, bad inputs."""
import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import make_folder, make_image, run_stages, set_params
from pipeline import io, manifest, paths, split
from pipeline.params import Data, Split


def ingest_folder(root, **kw):
    return manifest.ingest(Data(source="folder", path=str(root), **kw), workers=1)


def test_folder_source_nested_and_labelled(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    make_image(root / "dogs" / "deep" / "deeper" / "d.png", 1, np.random.default_rng(1))
    table, classes = ingest_folder(root)
    assert classes == ["cats", "dogs"]
    assert len(table) == 7 and (table["class_name"] == "dogs").sum() == 4
    assert list(table.columns[:9]) == ["path", "class_name", "label", "sha256", "width", "height", "mode",
                                       "decodable", "error"]
    assert table["path"].is_monotonic_increasing and table["decodable"].all()
    row = table.iloc[0]
    assert row["path"] == "cats/cats_000.png"  # relative to the data root: the same on every machine
    assert row["sha256"] == hashlib.sha256(open(root / row["path"], "rb").read()).hexdigest()


def test_folder_with_existing_split_honour_or_pool(tmp_path):
    for part in ("train", "validation", "test"):
        make_folder(tmp_path / "img" / part, per_class=2, seed=len(part))
    table, _ = ingest_folder(tmp_path / "img", existing_split="honour")
    out = split.assign(table, ["cats", "dogs"], Split(folds=2), seed=0)
    assert sorted(out["split"].unique()) == ["test", "train", "val"]
    assert (out.loc[out["path"].str.contains("/validation/"), "split"] == "val").all()
    pooled, _ = ingest_folder(tmp_path / "img", existing_split="pool")
    assert "orig_split" not in pooled and len(pooled) == 12


def test_kaggle_source(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        make_image(tmp_path / "k" / f"cat.{i}.jpg", 0, rng)
        make_image(tmp_path / "k" / f"dog.{i}.jpg", 1, rng)
    table, classes = manifest.ingest(Data(source="kaggle", path=str(tmp_path / "k")), workers=1)
    assert classes == ["cat", "dog"] and (table["class_name"] == "dog").sum() == 3


def test_csv_source_with_groups(tmp_path):
    root = make_folder(tmp_path / "img", per_class=4)
    rows = [{"path": str(p.relative_to(tmp_path)), "label": p.parent.name, "group": f"g{i // 2}", "site": "x"}
            for i, p in enumerate(sorted(root.rglob("*.png")))]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    table, classes = manifest.ingest(Data(source="csv", path=str(tmp_path / "m.csv")), workers=1)
    assert {"group", "site"} <= set(table.columns) and classes == ["cats", "dogs"]
    out = split.assign(table, classes, Split(ratios=(0.5, 0.25, 0.25), folds=2), seed=3)
    for _, g in out.groupby("group"):
        assert g["split"].nunique() == 1 and g["fold"].nunique() == 1


def test_elpv_source_reads_the_installed_package():
    table = manifest.elpv_rows(Data(source="elpv"))
    assert len(table) == 2624
    assert (table["class_name"] == "defective").sum() == 821  # probability >= 0.5
    assert set(table["type"]) == {"mono", "poly"}


def test_ratios_are_stratified_and_seeded(tmp_path):
    table, classes = ingest_folder(make_folder(tmp_path / "img", per_class=20))
    out = split.assign(table, classes, Split(ratios=(0.7, 0.2, 0.1), folds=3), seed=1)
    counts = out.groupby(["split", "class_name"]).size().unstack()
    assert counts.loc["train"].tolist() == [14, 14] and counts.loc["val"].tolist() == [4, 4]
    assert counts.loc["test"].tolist() == [2, 2]
    assert set(out.loc[out["split"] == "test", "fold"]) == {-1}
    folds = out[out["split"] != "test"].groupby("fold").size()
    assert folds.max() - folds.min() <= 1 and len(folds) == 3
    assert out.equals(split.assign(table, classes, Split(ratios=(0.7, 0.2, 0.1), folds=3), seed=1))
    assert not out["split"].equals(split.assign(table, classes, Split(ratios=(0.7, 0.2, 0.1), folds=3), seed=2)["split"])


def test_counts_balanced_per_class_and_too_many(tmp_path):
    table, classes = ingest_folder(make_folder(tmp_path / "img", per_class=10))
    out = split.assign(table, classes, Split(counts=(8, 4, 4), folds=0), seed=0)
    counts = out.groupby(["split", "class_name"]).size().unstack()
    assert counts.loc["train"].tolist() == [4, 4] and counts.loc["unused"].tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"needs 12 images per class, but there are cats: 10, dogs: 10"):
        split.assign(table, classes, Split(counts=(16, 4, 4)), seed=0)


def test_exact_duplicates_never_straddle_splits(tmp_path):
    root = make_folder(tmp_path / "img", per_class=10)
    for i in range(5):  # copies of one image, same class
        shutil.copy(root / "cats" / "cats_000.png", root / "cats" / f"copy_{i}.png")
    table, classes = ingest_folder(root)
    for seed in range(5):
        out = split.assign(table, classes, Split(ratios=(0.5, 0.25, 0.25), folds=2), seed=seed)
        dup = out[out["sha256"] == out.loc[out["path"].str.endswith("cats_000.png"), "sha256"].iloc[0]]
        assert len(dup) == 6 and dup["split"].nunique() == 1 and dup["fold"].nunique() == 1


def test_single_class_is_an_error(tmp_path):
    table, classes = ingest_folder(make_folder(tmp_path / "img", per_class=4, classes=("only",)))
    with pytest.raises(ValueError, match="only one class"):
        split.assign(table, classes, Split(), seed=0)


@pytest.mark.parametrize("setup, words", [
    (lambda root: None, "not found"),
    (lambda root: (make_folder(root, 2), (root / "empty").mkdir()), "holds no images"),
    (lambda root: root.mkdir(), "no class sub-folders"),
])
def test_bad_folders(tmp_path, setup, words):
    root = tmp_path / "img"
    setup(root)
    with pytest.raises(manifest.SourceError, match=words) as e:
        ingest_folder(root)
    assert "img" in str(e.value)


def test_bad_files_are_recorded_not_fatal(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3, ext=".jpg")
    (root / "cats" / "zero.jpg").write_bytes(b"")
    (root / "cats" / "text.jpg").write_text("not an image at all")
    good = (root / "dogs" / "dogs_000.jpg").read_bytes()
    (root / "dogs" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    table, _ = ingest_folder(root)
    bad = table.set_index(table["path"].str.rsplit("/", n=1).str[-1])
    for name in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert not bad.loc[name, "decodable"] and bad.loc[name, "error"], name
        assert str(tmp_path) not in bad.loc[name, "error"]  # the reason names the file as the table does
    assert bad["decodable"].sum() == 6


def test_stage_output_is_byte_identical(project):
    run_stages("split")
    first = paths.SPLIT_TABLE.read_bytes()
    summary = io.read_json(paths.SPLIT_SUMMARY)
    assert summary["classes"] == ["cats", "dogs"] and summary["n_images"] == 24
    assert sum(summary["counts"]["train"].values()) == 12
    run_stages("split")
    assert paths.SPLIT_TABLE.read_bytes() == first
    set_params({"seed": 7})
    run_stages("split")
    assert paths.SPLIT_TABLE.read_bytes() != first


def test_a_symlink_leading_outside_the_data_root_is_not_followed(tmp_path):
    from pipeline import inventory

    root = make_folder(tmp_path / "img", per_class=3)
    outside = make_image(tmp_path / "elsewhere" / "secret.png", 0, np.random.default_rng(2))
    (root / "cats" / "leak.png").symlink_to(outside)
    (root / "dogs" / "alias.png").symlink_to(root / "dogs" / "dogs_000.png")  # inside the root: read as usual
    table, _ = ingest_folder(root)
    rows = table.set_index(table["path"].str.rsplit("/", n=1).str[-1])
    assert not rows.loc["leak.png", "decodable"] and rows.loc["leak.png", "sha256"] == ""
    assert rows.loc["leak.png", "error"].startswith(inventory.OUTSIDE_ROOT)
    assert rows.loc["alias.png", "decodable"] and rows.loc["alias.png", "sha256"] == rows.loc["dogs_000.png", "sha256"]
    listed = {r["path"]: r["state"] for r in inventory.listing(root)}
    assert listed["cats/leak.png"] == inventory.OUTSIDE_ROOT and listed["dogs/alias.png"] != inventory.OUTSIDE_ROOT


def test_the_same_images_elsewhere_give_the_same_table(tmp_path):
    """Data identity by content: a copy of the data folder at another path (another machine, another mount) gives a
    byte-identical split table."""
    import shutil

    first = make_folder(tmp_path / "here" / "img", per_class=6)
    second = tmp_path / "elsewhere" / "deeper" / "images"
    shutil.copytree(first, second)
    tables = []
    for root in (first, second):
        table, classes = ingest_folder(root)
        out = split.assign(table, classes, Split(ratios=(0.5, 0.25, 0.25), folds=2), seed=3)
        tables.append(out.to_csv(index=False))
    assert tables[0] == tables[1] and str(tmp_path) not in tables[0]


def test_a_manifest_of_absolute_paths_outside_its_folder(tmp_path):
    """Rows such as /data/images/cell0001.png in /data/manifests/labels.csv: refused, with one message naming the
    key, until data.root holds them; then ingested, named relative to data.root."""
    images = make_folder(tmp_path / "data" / "images", per_class=3)
    (tmp_path / "data" / "manifests").mkdir()
    csv = tmp_path / "data" / "manifests" / "labels.csv"
    pd.DataFrame([{"path": str(p), "label": p.parent.name} for p in sorted(images.rglob("*.png"))]).to_csv(csv, index=False)
    with pytest.raises(manifest.SourceError, match=r"none of the 6 files .*data\.root") as e:
        manifest.ingest(Data(source="csv", path=str(csv)), workers=1)
    assert "symlink" not in str(e.value) and "cats/cats_000.png" in str(e.value)
    table, classes = manifest.ingest(Data(source="csv", path=str(csv), root=str(tmp_path / "data")), workers=1)
    assert classes == ["cats", "dogs"] and table["decodable"].all()
    assert table["path"].iloc[0] == "images/cats/cats_000.png"
    # relative to the manifest's folder works too, and names the same files the same way
    pd.DataFrame([{"path": f"../images/{p.parent.name}/{p.name}", "label": p.parent.name}
                  for p in sorted(images.rglob("*.png"))]).to_csv(csv, index=False)
    again, _ = manifest.ingest(Data(source="csv", path=str(csv), root=str(tmp_path / "data")), workers=1)
    assert again["path"].tolist() == table["path"].tolist()
    # a folder source under the same data.root names its files the same way
    folder, _ = manifest.ingest(Data(source="folder", path=str(images), root=str(tmp_path / "data")), workers=1)
    assert folder["path"].tolist() == table["path"].tolist() and folder["decodable"].all()


def test_a_source_or_class_that_cannot_be_read_is_one_clear_error(tmp_path):
    root = tmp_path / "img"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{cls}_{i}.png").write_text("not an image")
    with pytest.raises(manifest.SourceError, match=r"none of the 8 files .*cats/cats_0\.png.*data\.path"):
        ingest_folder(root)
    make_folder(root, per_class=2, classes=("dogs",))  # the dogs can be read now, the cats still cannot
    with pytest.raises(manifest.SourceError, match=r"class 'cats' lost all its 4 files"):
        ingest_folder(root)
