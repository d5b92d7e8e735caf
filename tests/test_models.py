"""Model files: every handed-over model is image-in (backbone, preprocessing and flips inside), with its JSON;
the predict CLI, the registered MLflow pyfunc and its REST server give the same labels on the same images."""
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import MEMBERS, ROOT, run_stages
from pipeline import io, models, params, paths, predict

NAMES = ("head", "finetune", "bagging")


@pytest.fixture
def all_models(trained_copy):
    run_stages("finetune", *MEMBERS, "ensemble")
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
            test_prob = p["test_prob"]
        got = models.predict(model, x)  # uint8 straight from the cache
        np.testing.assert_allclose(got, test_prob, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(models.predict(model, np.asarray(x, np.float32)), got, atol=1e-6)
    assert models.read_meta("head")["threshold"] == io.read_json(paths.RECIPE)["threshold"]  # chosen by CV
    assert models.read_meta("finetune")["threshold"] == models.read_meta("head")["threshold"]
    chosen = io.read_json(paths.METRICS / "cv_bagging.json")["members"]
    assert models.read_meta("bagging")["parts"] == ["head"] + [f"bagging/member_{m}" for m in (1,)[:chosen]]


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


def _post(port: int, payload, raw: bytes | None = None) -> tuple[int, dict]:
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"message": text}


def _hostile_requests_get_400s(port: int, good: str, tmp_path: Path) -> None:
    """Each hostile body: a 400 with a message, no stack trace, no server path; the server keeps answering."""
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 100 KB on disk, 200 MP decoded
    hostile = {
        "garbage base64": {"dataframe_split": {"columns": ["image"], "data": [["!!not base64!!"]]}},
        "text as an image": {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"hello").decode()]]}},
        "empty bytes": {"dataframe_split": {"columns": ["image"], "data": [[""]]}},
        "decompression bomb": {"dataframe_split": {"columns": ["image"],
                                                   "data": [[base64.b64encode(bomb.read_bytes()).decode()]]}},
        "wrong column": {"dataframe_split": {"columns": ["picture"], "data": [[good]]}},
        "wrong tensor shape": {"inputs": [[1.0, 2.0, 3.0]]},
        "a server path": {"dataframe_split": {"columns": ["path"], "data": [["../../../../usr/share/pixmaps/x.png"]]}},
        "an absolute path": {"dataframe_split": {"columns": ["path"], "data": [["/etc/passwd"]]}},
        "the second row bad": {"dataframe_split": {"columns": ["image"], "data": [[good], ["@@"]]}},
    }
    for what, payload in hostile.items():
        status, body = _post(port, payload)
        assert status == 400 and body.get("message"), (what, status, body)
        text = json.dumps(body)
        assert "stack_trace" not in body and "Traceback" not in text and str(ROOT) not in text, (what, body)
        assert str(Path(sys.prefix)) not in text and str(tmp_path) not in text, (what, body)
    assert "row 1" in _post(port, hostile["the second row bad"])[1]["message"]  # the row that is wrong
    assert "reads no files" in _post(port, hostile["an absolute path"])[1]["message"]
    status, body = _post(port, None, raw=b"{not json")
    assert status == 400 and "stack_trace" not in body


def test_predict_cli_registry_pyfunc_and_rest_server_agree(all_models, tmp_path):
    import mlflow

    from pipeline import serving

    images = Path(params.load().data.path)
    files = sorted((images / "cats").glob("*.png"))[:3] + sorted((images / "dogs").glob("*.png"))[:3]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,  # the server runs `uvicorn` from the virtualenv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in NAMES:
        cli = predict.predict(models.path(name), [str(f) for f in files])
        with mlflow.start_run(run_name=f"round trip {name}"):
            logged = serving.log_model(mlflow, models.path(name), registered_model_name=f"round-trip-{name}")
        version = logged.registered_model_version
        loaded = mlflow.pyfunc.load_model(f"models:/round-trip-{name}/{version}")
        by_path = loaded.predict(pd.DataFrame({"path": [str(f) for f in files]}))
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
        by_bytes = loaded.predict(pd.DataFrame({"image": encoded}))
        from pipeline.images import load_rgb

        by_array = loaded.predict(np.stack([load_rgb(str(f), 48) for f in files]))
        for table in (by_path, by_bytes, by_array):
            assert table["label"].tolist() == cli["label"].tolist(), name
            np.testing.assert_allclose(table["probability"], cli["probability"], atol=1e-5)
        many = serving.local(models.path(name)).classify(np.zeros((serving.MAX_ROWS + 1, 48, 48, 3), np.uint8))
        assert len(many) == serving.MAX_ROWS + 1  # the REST limits do not bind in-process callers (the registry)
        strict = loaded.predict(pd.DataFrame({"path": [str(f) for f in files]}), params={"threshold": 1.01})
        assert set(strict["label"]) == {"cats"}  # the threshold param overrides the recorded one

        # the first server reads no files; the second may read the image folder (`make serve SERVE_ROOT=...`)
        root = {} if name == NAMES[0] else {"PIPELINE_SERVE_ROOT": str(images)}
        server, port = _serve(f"models:/round-trip-{name}/{version}", {**env, **root}, all_models)
        try:
            assert not _listening_on_all_interfaces(port)
            answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}})[1]
            if name == NAMES[0]:
                _hostile_requests_get_400s(port, encoded[0], tmp_path)
                assert _post(port, {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]]]}})[0] == 200
            elif name == NAMES[1]:
                inside = [str(f.relative_to(images)) for f in files]
                status, by_rest_path = _post(port, {"dataframe_split": {"columns": ["path"], "data": [[p] for p in inside]}})
                assert status == 200 and [r["label"] for r in by_rest_path["predictions"]] == cli["label"].tolist()
                for outside in ("../../../../etc/passwd", "/etc/passwd", "/etc/nonexistent.png",
                                str(images.parent / "elsewhere.png")):
                    status, body = _post(port, {"dataframe_split": {"columns": ["path"], "data": [[outside]]}})
                    assert status == 400 and "outside the folder" in body["message"], (outside, body)
        finally:
            server.terminate()
            server.wait(timeout=30)
        rest = pd.DataFrame(answer["predictions"])
        assert rest["label"].tolist() == cli["label"].tolist(), name
        np.testing.assert_allclose(rest["probability"], cli["probability"], atol=1e-5)
