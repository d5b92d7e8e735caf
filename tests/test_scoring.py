"""Batch scoring with the champion (`pipeline.scoring`, the work of the `score_new_images` DAG): only new images,
bad files listed and not fatal, the alias (not the newest version) decides, counts / confidence / drift recorded."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import drift, params, registry, scoring

from conftest import make_folder, run_stages, set_params


def summary_of(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_scoring_takes_new_images_only_lists_bad_ones_and_follows_the_alias(trained_copy, tmp_path, capsys):
    import mlflow

    set_params({"evaluate": {"models": ["head"]}})
    run_stages("evaluate", "export")  # version 1, the champion
    inbox = make_folder(tmp_path / "inbox", per_class=3, seed=7)
    (inbox / "cats" / "broken.png").write_bytes(b"not an image")
    assert scoring.main(["--folder", str(inbox)]) == 0
    first = summary_of(capsys)
    assert first["scored"] == 6 and first["skipped"] == 1 and first["skipped_files"] == ["cats/broken.png"]
    assert first["model_version"] == "1" and sum(first["counts"].values()) == 6
    assert first["drift"] is not None
    assert not first["drift_judged"] and not first["drift_above_threshold"]  # 6 images: under score.drift_min_images
    table = pd.read_csv(scoring.PREDICTIONS)
    classes = ["cats", "dogs"]
    assert len(table) == 6 and set(table["label"]) <= set(classes) and (table["model_version"] == 1).all()
    probs = table[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    low = params.load().score.low_confidence  # the share is of the rows written, at the configured bound
    assert first["low_confidence_share"] == (probs.max(1) < low).mean()
    assert first["counts"] == table["label"].value_counts().to_dict()
    assert {"file", "folder", "sha256", "scored_at"} <= set(table.columns)

    # a second version registered, then the alias moved back to version 1: the alias decides, not the newest
    registry.register()
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("image-classifier", registry.CHAMPION).version) == "2"
    client.set_registered_model_alias("image-classifier", registry.CHAMPION, "1")
    make_folder(tmp_path / "more", per_class=1, seed=8)
    for f in (tmp_path / "more").rglob("*.png"):
        shutil.copy2(f, inbox / f.parent.name / f"new_{f.name}")
    assert scoring.main(["--folder", str(inbox)]) == 0
    second = summary_of(capsys)
    assert second["scored"] == 2 and second["skipped"] == 0 and second["model_version"] == "1"
    assert len(pd.read_csv(scoring.PREDICTIONS)) == 8 and len(pd.read_csv(scoring.SKIPPED)) == 1

    # the batch is in MLflow, with its figures
    prm = params.load()
    exp = client.get_experiment_by_name(f"{prm.tracking.experiment}-scoring")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.metrics["scored"] for r in runs] == [6, 2] and runs[0].data.metrics["skipped"] == 1

    # a batch of noise, large enough to be judged: above the threshold (the DAG's check_drift task then fails)
    set_params({"score": {"drift_min_images": 4}})
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3)).astype(np.uint8)).save(noise / f"n{i}.png")
    assert scoring.main(["--folder", str(noise)]) == 0
    third = summary_of(capsys)
    assert third["drift_judged"] and third["drift_above_threshold"] and third["drift"] > third["drift_threshold"]


def test_drift_is_small_for_training_like_images_and_large_for_others(trained_copy):
    from pipeline import io, models, paths

    model, _ = models.load("head")
    x, _ = io.load_pair(paths.CACHE_DIR / "train")
    ref = drift.reference(model, np.asarray(x))
    same, _ = io.load_pair(paths.CACHE_DIR / "test")
    other = np.random.default_rng(0).integers(0, 255, np.asarray(same).shape).astype(np.uint8)  # noise, not toys
    near = drift.distance(ref, drift.pooled(model, np.asarray(same)))
    far = drift.distance(ref, drift.pooled(model, other))
    assert near < params.Score().drift_threshold < far, (near, far)
