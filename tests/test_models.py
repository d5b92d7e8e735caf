"""Model files: every handed-over model is image-in (backbone, preprocessing and flips inside), with its JSON;
the predict CLI, the registered MLflow pyfunc and its REST server give the same labels on the same images."""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_stages
from pipeline import io, models, params, paths, predict

NAMES = ("head", "finetune", "bagging")


@pytest.fixture
def all_models(trained_copy):
    run_stages("finetune", "bagging@0", "bagging@1", "ensemble")
    return trained_copy


def test_every_model_is_image_in_and_matches_its_stage(all_models):
    x = io.load_npy(paths.CACHE_DIR / "test_x.npy")
    for name in NAMES:
        model, meta = models.load(name)
        assert meta["input"] == "images" and meta["classes"] == ["cats", "dogs"] and meta["image_size"] == 48
        assert set(meta["lineage"]) >= {"code_sha256", "split_sha256", "inputs_md5"}
        assert "git_commit" not in meta["lineage"]  # an output that named its commit could not be reproduced later
        assert meta["lineage"]["split_sha256"] == io.sha256_file(paths.SPLIT_TABLE)
        assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 1)
        assert {"features", "classifier"} <= {layer.name for layer in model.layers}
        with np.load(paths.PREDICTIONS_DIR / f"{name}.npz") as p:
            val_y, val_prob, test_prob = p["val_y"], p["val_prob"], p["test_prob"]
        got = models.predict(model, x)  # uint8 straight from the cache
        np.testing.assert_allclose(got, test_prob, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(models.predict(model, np.asarray(x, np.float32)), got, atol=1e-6)
        assert meta["threshold"] == models.choose_threshold(val_y, val_prob)  # chosen on validation
    members = models.read_meta("bagging")["members"]
    assert members == ["bagging/member_0", "bagging/member_1"]


def test_flip_averaging_is_inside_the_head_model(trained_copy):
    import keras

    from pipeline import predictions

    model, meta = models.load("head")
    flips = [tuple(a) for a in meta["tta_flips"]["features"]]
    head = model.get_layer("classifier").get_layer("head")
    x = io.load_npy(paths.CACHE_DIR / "val_x.npy")
    features = keras.Model(model.get_layer("features").inputs, model.get_layer("features").outputs)
    expected = predictions.probabilities(head, features.predict(np.asarray(x, np.float32), verbose=0), flips=flips)
    np.testing.assert_allclose(models.predict(model, x), expected, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model_uri: str, env: dict, cwd: Path):
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError("the model server did not answer /ping within 240 s")


def _listening_on_all_interfaces(port: int) -> bool:
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[1] == f"00000000:{port:04X}" and r[3] == "0A" for r in rows)


def test_predict_cli_registry_pyfunc_and_rest_server_agree(all_models, tmp_path):
    import mlflow

    from pipeline import serving, tracking

    images = Path(params.load().data.path)
    files = sorted((images / "cats").glob("*.png"))[:3] + sorted((images / "dogs").glob("*.png"))[:3]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,  # the server runs `uvicorn` from the virtualenv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in NAMES:
        cli = predict.predict(models.path(name), [str(f) for f in files])
        with mlflow.start_run(run_name=f"round trip {name}"):
            serving.log_model(mlflow, models.path(name), registered_model_name=f"round-trip-{name}")
        version = tracking.latest_version(mlflow.MlflowClient(), f"round-trip-{name}").version
        loaded = mlflow.pyfunc.load_model(f"models:/round-trip-{name}/{version}")
        by_path = loaded.predict(pd.DataFrame({"path": [str(f) for f in files]}))
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
        by_bytes = loaded.predict(pd.DataFrame({"image": encoded}))
        from pipeline.images import load_rgb

        by_array = loaded.predict(np.stack([load_rgb(str(f), 48) for f in files]))
        for table in (by_path, by_bytes, by_array):
            assert table["label"].tolist() == cli["label"].tolist(), name
            np.testing.assert_allclose(table["probability"], cli["probability"], atol=1e-5)
        strict = loaded.predict(pd.DataFrame({"path": [str(f) for f in files]}), params={"threshold": 1.01})
        assert set(strict["label"]) == {"cats"}  # the threshold param overrides the recorded one

        server, port = _serve(f"models:/round-trip-{name}/{version}", env, all_models)
        try:
            assert not _listening_on_all_interfaces(port)
            body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                answer = json.loads(r.read())
        finally:
            server.terminate()
            server.wait(timeout=30)
        rest = pd.DataFrame(answer["predictions"])
        assert rest["label"].tolist() == cli["label"].tolist(), name
        np.testing.assert_allclose(rest["probability"], cli["probability"], atol=1e-5)
