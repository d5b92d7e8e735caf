"""Any number of classes, end to end: three classes, one of them rare, through every stage (in process), the report,
`predict` and the pyfunc. Labels and per-class probabilities agree; every evaluate output exists; the rare class is
data, not an error."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from conftest import CV, MEMBERS, TINY_PARAMS, UPSTREAM, copy_project, make_folder, run_stages
from pipeline import io, models, paths, predict, serving
from pipeline.params import merge

CLASSES = ("birds", "cats", "dogs")  # sorted: label 0 birds (the rare class, bright on the left), ...


def test_three_classes_one_rare_through_every_stage(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "images", per_class=14, classes=("birds", "cats", "dogs"))
    for f in sorted((images / "birds").glob("*.png"))[5:]:
        f.unlink()  # 5 birds, 14 cats, 14 dogs
    over = merge(TINY_PARAMS, {"data": {"path": str(images)}, "finetune": {"start_from": []},
                               "evaluate": {"models": ["head", "bagging"]}})
    dest = copy_project(tmp_path / "project", over)
    monkeypatch.chdir(dest)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_REGISTER", "off")
    run_stages(*UPSTREAM, *CV, "head", *MEMBERS, "ensemble", "evaluate")

    report = io.read_json(paths.VALIDATE_REPORT)
    assert report["success"] and report["class_shares"]["all"]["birds"] < 0.2  # rare, and not an error
    summary = json.loads((paths.METRICS / "evaluate.json").read_text())
    trainval = int((pd.read_csv(paths.SPLIT_TABLE)["split"] != "test").sum())  # every row out of fold, once
    for name, result in summary["models"].items():
        assert set(result["cv"]["per_class"]) == set(CLASSES) and result["cv"]["n"] == trainval, name
        test = result["test"]
        assert set(test["per_class"]) == set(CLASSES), name
        assert np.array(test["confusion_matrix"]).shape == (3, 3)
        matrix = np.array(test["confusion_matrix"])  # rows: true class; the per-class figures follow from it
        recall = matrix.diagonal() / matrix.sum(1)
        np.testing.assert_allclose([test["per_class"][c]["recall"] for c in CLASSES], recall)
        assert [test["per_class"][c]["n"] for c in CLASSES] == matrix.sum(1).tolist()
        assert abs(test["balanced_accuracy"] - recall.mean()) < 1e-12
        assert abs(test["macro_f1"] - np.mean([test["per_class"][c]["f1"] for c in CLASSES])) < 1e-12
        assert abs(test["accuracy"] - matrix.trace() / matrix.sum()) < 1e-12
    roc = pd.read_csv(paths.PLOTS / "evaluate" / "roc.csv")
    calibration = pd.read_csv(paths.PLOTS / "evaluate" / "calibration.csv")
    assert set(roc["class"]) <= set(CLASSES) and len(set(roc["class"])) >= 2 and len(calibration)
    for png in ("roc_calibration.png", "confusion.png", "gallery.png"):
        assert (paths.PLOTS / "evaluate" / png).stat().st_size > 1000, png
    page = (dest / "reports" / "index.html").read_text()
    assert "Per class" in page and "birds" in page

    files = sorted(str(f) for f in images.rglob("*.png"))[:6]
    cli = predict.predict(models.path("bagging"), files)
    pyfunc = serving.local(models.path("bagging")).classify(pd.DataFrame({"path": files}))
    assert cli["label"].tolist() == pyfunc["label"].tolist()
    each = pyfunc[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(each.sum(1), 1.0, atol=1e-5)  # every class's probability, softmax
    assert [CLASSES[k] for k in each.argmax(1)] == pyfunc["label"].tolist()
    np.testing.assert_allclose(pyfunc["probability"], each.max(1), atol=1e-6)
