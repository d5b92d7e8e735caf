"""predict CLI: same preprocessing as training (from the model's metadata), CSV of path, probability, label and
every class's probability."""
from pathlib import Path

import pandas as pd

from conftest import make_image
from pipeline import params, predict


def test_predict_with_the_head(trained_copy, capsys):
    images = Path(params.load().data.path)  # the tiny image folder the project was trained on
    assert predict.main(["--model", "models/head.keras", "--out", "preds.csv", str(images / "cats"), str(images / "dogs")]) == 0
    table = pd.read_csv("preds.csv")
    assert list(table.columns) == ["path", "probability", "label", "prob_cats", "prob_dogs"] and len(table) == 32
    assert (table["prob_cats"] + table["prob_dogs"]).round(5).eq(1).all() and table["prob_dogs"].eq(table["probability"]).all()
    assert set(table["label"]) <= {"cats", "dogs"} and table["probability"].between(0, 1).all()
    truth = table["path"].str.contains("/dogs/").map({True: "dogs", False: "cats"})
    assert (table["label"] == truth).mean() >= 0.75


def test_predict_prints_csv_for_one_file(trained_copy, tmp_path, capsys):
    import numpy as np

    img = make_image(tmp_path / "one.jpg", 1, np.random.default_rng(0))
    assert predict.main(["--model", "models/head.keras", "--threshold", "0.5", str(img)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "path,probability,label,prob_cats,prob_dogs" and out[1].startswith(str(img))


def test_bad_inputs_are_clear(trained_copy, tmp_path, capsys):
    assert predict.main(["--model", "models/head.keras", str(tmp_path / "missing.png")]) == 2
    assert "missing.png not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict.main(["--model", "models/head.keras", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    (tmp_path / "m.keras").write_bytes(b"")
    assert predict.main(["--model", str(tmp_path / "m.keras"), str(tmp_path)]) == 2
    assert "m.json not found" in capsys.readouterr().err
