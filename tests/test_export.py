"""The export stage: the delivered model as a SavedModel (TF Serving) and TFLite float16 / int8, each scored against
the Keras model; `predict` runs a .tflite file; the registry logs them with the version and moves `champion`."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package

from bench import run  # noqa: E402
from pipeline import export, io, manifest, models, params, paths, predict, registry  # noqa: E402


def test_exports_load_and_agree_with_the_keras_model(trained_copy, tmp_path):
    import mlflow
    import tensorflow as tf

    from conftest import run_stages, set_params

    set_params({"evaluate": {"models": ["head"]}})
    run_stages("evaluate", "export")  # the gate is open: export registers the head, with its exports

    report = io.read_json(paths.METRICS / "export.json")
    assert report["model"] == "head" and set(report["formats"]) == set(export.FORMATS)
    for split in ("val", "test"):
        f = {fmt: r[split] for fmt, r in report["formats"].items()}
        assert f["keras"]["agreement"] == 1.0 and f["keras"]["max_abs_probability_difference"] == 0.0
        assert f["saved_model"]["max_abs_probability_difference"] < 1e-5
        assert f["tflite_float16"]["max_abs_probability_difference"] < 1e-3
        assert f["tflite_int8"]["agreement"] >= 0.95
    sizes = {fmt: r["bytes"] for fmt, r in report["formats"].items()}
    assert sizes["tflite_int8"] < sizes["tflite_float16"] < sizes["saved_model"]

    # the files themselves: the .tflite files with their JSON, through `predict` as any model file
    x, y = io.load_pair(paths.CACHE_DIR / "test")
    keras_prob = models.predict(models.load("head")[0], np.asarray(x))
    threshold, lite_probs = models.threshold_of(models.read_meta("head")), {}
    for fmt in ("tflite_float16", "tflite_int8"):
        file = paths.EXPORTS / export.FILES[fmt]
        assert io.read_json(file.with_suffix(".json"))["classes"] == models.read_meta("head")["classes"]
        lite, _ = models.load(str(file))
        prob = lite_probs[fmt] = models.predict(lite, np.asarray(x))
        assert prob.shape == keras_prob.shape
        same = (models.labels(prob, threshold) == models.labels(keras_prob, threshold)).mean()
        assert same == report["formats"][fmt]["test"]["agreement"]  # the stage's figure is this file's
    np.testing.assert_allclose(lite_probs["tflite_float16"], keras_prob, atol=1e-3)
    folder = tmp_path / "imgs"
    index = pd.read_csv(paths.CACHE_DIR / "index.csv")
    root = manifest.root_of(params.load().data)
    files = [root / p for p in index.loc[index["split"] == "test", "path"]]
    keras_table = predict.predict(models.path("head"), files)
    lite_table = predict.predict(paths.EXPORTS / export.FILES["tflite_float16"], files)
    assert (lite_table["label"] == keras_table["label"]).all()
    np.testing.assert_allclose(lite_table["probability"], keras_table["probability"], atol=1e-3)
    assert predict.main(["--model", str(paths.EXPORTS / export.FILES["tflite_int8"]), "--out", str(folder / "p.csv"),
                         *map(str, files)]) == 0
    assert len(pd.read_csv(folder / "p.csv")) == len(files)

    # the registered version carries the SavedModel (it serves like the Keras model) and the TFLite files
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("image-classifier", registry.CHAMPION)
    saved = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="saved_model",
                                                     dst_path=str(tmp_path / "sm")))
    loaded = tf.saved_model.load(str(saved))
    served = loaded.serve(tf.constant(np.asarray(x), tf.float32)).numpy()
    np.testing.assert_allclose(served.reshape(keras_prob.shape), keras_prob, atol=1e-5)
    logged = {Path(a.path).name for a in client.list_artifacts(version.run_id, "tflite")}
    assert {"model_float16.tflite", "model_int8.tflite", "model_int8.json", "export.json"} <= logged
    assert client.get_run(version.run_id).data.metrics["export_tflite_int8_test_agreement"] >= 0.95

    # the benchmark's latency group measures every format of this project (numbers, not speeds, are asserted)
    bench = run.bench_exports(Path.cwd(), seconds=0.2)
    assert bench["model"] == "head" and set(bench["bytes"]) == set(export.FORMATS)
    assert {"keras", "saved_model", "tflite_float16_1t", "tflite_int8_1t"} <= set(bench["ms_per_image"])
    assert all(ms and ms > 0 for ms in bench["ms_per_image"].values()), bench
