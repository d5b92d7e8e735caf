"""The validate stage: Great Expectations over small hand-built split tables, and `main()` end to end."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from pipeline import io, paths
from pipeline.params import Validate
from pipeline.validate import main, summary_md, validate

CLASSES = ["good", "bad"]


def make_table(per_class=(("train", 10), ("val", 4), ("test", 4))) -> pd.DataFrame:
    rows = []
    for split, n in per_class:
        for label, name in enumerate(CLASSES):
            for i in range(n):
                rows.append({"path": f"/data/{name}/{split}_{i}.png", "class_name": name, "label": label,
                             "sha256": f"{split}-{name}-{i}".ljust(64, "0"), "width": 64, "height": 64, "mode": "RGB",
                             "decodable": True, "error": "", "split": split, "fold": i % 2 if split != "test" else -1})
    return pd.DataFrame(rows).sort_values("path", ignore_index=True)


def row(table, path):
    return table.index[table["path"] == path][0]


def failed(report, column=None):
    return [e for e in report["expectations"] if not e["success"] and column in (None, e["column"])]


def copy_sha(table, source, target):
    """Make `target` an exact duplicate of `source`."""
    table.loc[row(table, target), "sha256"] = table.loc[row(table, source), "sha256"]


def make_undecodable(table, path, error="UnidentifiedImageError: cannot identify image file"):
    i = row(table, path)
    table.loc[i, ["decodable", "error", "width", "height", "mode"]] = [False, error, 0, 0, ""]


def test_clean_table_passes():
    report = validate(make_table(), Validate(), CLASSES)
    assert report["success"], failed(report)
    assert report["skipped"] == [] and report["duplicates"] == [] and report["reasons"] == {}
    assert report["counts"] == {"train": {"good": 10, "bad": 10}, "val": {"good": 4, "bad": 4},
                                "test": {"good": 4, "bad": 4}}
    assert all(e["success"] and e["severity"] in ("critical", "warning") for e in report["expectations"])
    assert {"expectation", "column", "success", "details"} <= set(report["expectations"][0])
    json.dumps(report)  # the report is plain JSON


def test_unknown_label_and_class_fail():
    table = make_table()
    table.loc[row(table, "/data/good/train_3.png"), "label"] = 7
    table.loc[row(table, "/data/bad/val_1.png"), "class_name"] = "ugly"
    report = validate(table, Validate(), CLASSES)
    assert not report["success"]
    [label] = [e for e in failed(report, "label") if e["expectation"] == "expect_column_values_to_be_in_set"]
    assert label["files"] == ["/data/good/train_3.png"] and "label=7" in label["details"]
    assert failed(report, "class_name")[0]["files"] == ["/data/bad/val_1.png"]


def test_label_must_match_class_name():
    table = make_table()
    table.loc[row(table, "/data/bad/train_0.png"), "label"] = 0  # a known label, but not the one of `bad`
    report = validate(table, Validate(), CLASSES)
    assert not report["success"]
    assert failed(report, "label = class_label")[0]["files"] == ["/data/bad/train_0.png"]


def test_nulls_and_unknown_split_fail():
    table = make_table()
    table.loc[row(table, "/data/good/train_0.png"), "split"] = "holdout"
    table.loc[row(table, "/data/good/train_1.png"), "class_name"] = ""
    report = validate(table, Validate(), CLASSES)
    assert not report["success"]
    assert failed(report, "split")[0]["files"] == ["/data/good/train_0.png"]
    assert any(e["expectation"] == "expect_column_values_to_not_be_null" and e["files"] == ["/data/good/train_1.png"]
               for e in failed(report, "class_name"))


def test_missing_class_in_a_split_fails():
    table = make_table()
    table = table[~((table["split"] == "val") & (table["class_name"] == "bad"))]
    report = validate(table, Validate(), CLASSES)
    assert not report["success"]
    [missing] = [e for e in failed(report) if e["expectation"] == "expect_column_distinct_values_to_contain_set"]
    assert missing["where"] == "split == val" and "bad" in missing["details"]


def test_an_empty_split_may_be_absent():
    report = validate(make_table((("train", 10), ("val", 4))), Validate(), CLASSES)  # test ratio 0
    assert report["success"], failed(report)
    assert set(report["counts"]) == {"train", "val"}


def test_duplicate_across_splits_fails():
    table = make_table()
    copy_sha(table, "/data/good/train_0.png", "/data/good/test_0.png")
    report = validate(table, Validate(), CLASSES)
    assert not report["success"]
    [straddles] = failed(report, "splits_per_sha256")
    assert sorted(straddles["files"]) == ["/data/good/test_0.png", "/data/good/train_0.png"]
    assert report["duplicates"] == [["/data/good/test_0.png", "/data/good/train_0.png"]]


def test_duplicate_under_two_classes_fails_naming_both_files():
    table = make_table()
    copy_sha(table, "/data/good/train_5.png", "/data/bad/train_2.png")
    report = validate(table, Validate(duplicates="report"), CLASSES)
    assert not report["success"]
    [dup] = failed(report, "classes_per_sha256")
    assert dup["severity"] == "critical"
    assert sorted(dup["files"]) == ["/data/bad/train_2.png", "/data/good/train_5.png"]
    assert "/data/bad/train_2.png" in dup["details"] and "/data/good/train_5.png" in dup["details"]


@pytest.mark.parametrize("mode", ["report", "fail"])
def test_duplicates_within_a_split_reported_or_failed(mode):
    table = make_table()
    copy_sha(table, "/data/good/train_1.png", "/data/good/train_2.png")
    report = validate(table, Validate(duplicates=mode), CLASSES)
    assert report["duplicates"] == [["/data/good/train_1.png", "/data/good/train_2.png"]]
    assert report["success"] == (mode == "report")
    [unique] = failed(report, "sha256")
    assert unique["severity"] == ("warning" if mode == "report" else "critical")


def test_undecodable_skipped_and_still_succeeds():
    table = make_table()
    make_undecodable(table, "/data/bad/train_4.png")
    report = validate(table, Validate(on_undecodable="skip"), CLASSES)
    assert report["success"], failed(report)
    assert report["skipped"] == ["/data/bad/train_4.png"]
    assert "UnidentifiedImageError" in report["reasons"]["/data/bad/train_4.png"]
    assert report["counts"]["train"]["bad"] == 9 and report["n_kept"] == report["n_images"] - 1


@pytest.mark.parametrize("size", [(1, 1), (64, 16)])
def test_too_small_image_skipped_or_failed(size):
    table = make_table()
    table.loc[row(table, "/data/good/val_0.png"), ["width", "height"]] = size
    skipped = validate(table, Validate(on_undecodable="skip", min_side=32), CLASSES)
    assert skipped["success"] and skipped["skipped"] == ["/data/good/val_0.png"]
    assert "min_side 32" in skipped["reasons"]["/data/good/val_0.png"]
    refused = validate(table, Validate(on_undecodable="fail", min_side=32), CLASSES)
    assert not refused["success"] and refused["skipped"] == []
    assert any(e["files"] == ["/data/good/val_0.png"] for e in failed(refused))
    assert validate(table, Validate(min_side=1), CLASSES)["success"]


def test_skipping_every_image_of_a_class_in_a_split_fails():
    table = make_table()
    for i in range(4):
        make_undecodable(table, f"/data/bad/test_{i}.png")
    report = validate(table, Validate(on_undecodable="skip"), CLASSES)
    assert not report["success"] and len(report["skipped"]) == 4
    assert any(e["where"] == "split == test" and "bad" in e["details"] for e in failed(report))


def test_a_rare_class_is_data_but_shares_that_differ_between_splits_fail():
    table = make_table(per_class=(("train", 40), ("val", 20), ("test", 20)))
    rare = table.index[table["class_name"] == "bad"]
    keep_bad = set(table.index[(table["class_name"] == "bad") & (table["split"] == "train")][:2]) | \
        set(table.index[(table["class_name"] == "bad") & (table["split"] != "train")][::20])
    table = table.drop([i for i in rare if i not in keep_bad])  # 2 of 42 train, 1 of 21 val, 1 of 21 test: ~5 %
    report = validate(table, Validate(), CLASSES)
    assert report["success"], failed(report)
    assert report["class_shares"]["train"]["bad"] == pytest.approx(2 / 42)
    assert "Class shares" in summary_md(report)
    # the same rare class, but missing from most of the test split's share: a broken split, not rare data
    broken = make_table(per_class=(("train", 40), ("val", 20), ("test", 20)))
    broken = broken.drop(broken.index[(broken["class_name"] == "bad") & (broken["split"] == "test")][3:])
    report = validate(broken, Validate(), CLASSES)
    assert not report["success"]
    [gap] = failed(report, "share_excess")
    assert gap["where"] == "split == test" and "bad 0.130 here" in gap["details"]


def test_missing_column_is_refused():
    with pytest.raises(ValueError, match="sha256"):
        validate(make_table().drop(columns="sha256"), Validate(), CLASSES)


# --- main(): params.yaml and data/ in a temporary project -----------------------------------------------------


def project(tmp_path, monkeypatch, table, **validate_params):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"validate": validate_params}))
    io.write_csv(paths.SPLIT_TABLE, table)
    io.write_json(paths.SPLIT_SUMMARY, {"classes": CLASSES, "counts": {}, "n_images": len(table), "folds": 2,
                                        "duplicate_groups": 0, "source": "folder"})


def test_main_writes_report_and_summary_atomically(tmp_path, monkeypatch, capsys):
    table = make_table()
    make_undecodable(table, "/data/good/train_7.png")
    table.loc[row(table, "/data/good/train_7.png"), "sha256"] = ""  # unreadable file: the split stage leaves it empty
    project(tmp_path, monkeypatch, table, on_undecodable="skip")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "/data/good/train_7.png" in out
    assert sorted(p.name for p in (tmp_path / "data" / "validate").iterdir()) == ["report.json", "summary.md"]
    report = io.read_json(paths.VALIDATE_REPORT)
    assert report["success"] and report["skipped"] == ["/data/good/train_7.png"]
    summary = paths.VALIDATE_SUMMARY.read_text()
    assert summary.startswith("# Validate: passed") and "✓" in summary and "⚠" in summary
    assert "/data/good/train_7.png | undecodable: UnidentifiedImageError" in summary
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left behind


def test_main_undecodable_with_fail_exits_1_naming_the_file(tmp_path, monkeypatch, capsys):
    table = make_table()
    make_undecodable(table, "/data/bad/val_2.png", "OSError: image file is truncated")
    project(tmp_path, monkeypatch, table, on_undecodable="fail")
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "/data/bad/val_2.png" in err and str(paths.SPLIT_TABLE) in err and str(paths.VALIDATE_REPORT) in err
    report = io.read_json(paths.VALIDATE_REPORT)  # written anyway, for the user to read
    assert not report["success"] and report["skipped"] == []
    assert report["reasons"] == {"/data/bad/val_2.png": "undecodable: OSError: image file is truncated"}
    assert "# Validate: FAILED" in paths.VALIDATE_SUMMARY.read_text() and "✗" in paths.VALIDATE_SUMMARY.read_text()


def test_main_names_both_files_of_a_cross_class_duplicate(tmp_path, monkeypatch, capsys):
    table = make_table()
    copy_sha(table, "/data/good/test_3.png", "/data/bad/test_3.png")
    project(tmp_path, monkeypatch, table)
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "classes_per_sha256" in err and "/data/bad/test_3.png" in err and "/data/good/test_3.png" in err


def test_main_without_split_table_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("validate: {}\n")
    assert main([]) == 1
    assert str(paths.SPLIT_TABLE) in capsys.readouterr().err
    assert not paths.VALIDATE_REPORT.exists()


def test_main_reads_blank_cells_of_split_csv_as_nulls(tmp_path, monkeypatch, capsys):
    table = make_table()
    table["label"] = table["label"].astype(object)
    table.loc[row(table, "/data/bad/train_1.png"), "label"] = ""
    project(tmp_path, monkeypatch, table)
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "expect_column_values_to_not_be_null on label" in err and "/data/bad/train_1.png" in err
