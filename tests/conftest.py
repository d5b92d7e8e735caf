"""Shared fixtures: tiny generated image folders and a tiny copy of the project to run stages in.

Everything is small on purpose (a few dozen 32-px images) so the whole suite runs in minutes on two cores; the
real-data tests (ELPV subset, cats-vs-dogs photos) are few and marked `slow` but still run in CI.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import cluster_check
from pipeline.params import merge

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "cats_vs_dogs_small"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_PARAMS = {
    "data": {"source": "folder"},
    "split": {"ratios": [0.5, 0.25, 0.25], "folds": 2, "stratify": []},
    "validate": {"min_side": 8},
    "cache": {"image_size": 48, "workers": 2},
    "backbone": {"name": "small_cnn", "weights": "none"},
    "extract": {"batch_size": 16},
    # the toy classes differ left from right: no left-right flips here (tests of the flips use their own data)
    "head": {"designs": ["pooled", "map"], "conv_filters": 8, "hidden": 16, "epochs": 6, "batch_size": 8,
             "patience": 3, "learning_rate": 0.01},
    "finetune": {"start_from": ["head"], "epochs": 1, "batch_size": 8, "augment": {"horizontal_flip": False}},
    "bagging": {"members": [1], "backbones": []},
    "cv": {"folds": [0, 1]},
    "evaluate": {"models": ["head", "finetune", "bagging"], "gate": {"min_adjusted_balanced_accuracy": -1.0, "min_roc_auc": 0.0}},
}


def make_image(path: Path, label: int, rng, size: int = 24, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A learnable toy image: class 0 bright on the left, class 1 bright on the right, class 2 and above bright on
    the top, plus noise."""
    a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    if label >= 2:
        a[: size // 2] += 150
    else:
        a[:, slice(0, size // 2) if label == 0 else slice(size // 2, size)] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert(mode).save(path, fmt)
    return path


def make_folder(root: Path, per_class: int = 12, classes=("cats", "dogs"), seed: int = 0, ext: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i:03d}{ext}", label, rng)
    return root


def copy_project(dest: Path, params_over: dict, images: Path | None = None) -> Path:
    """A copy of the project (files git tracks or would, not its run's results) with params.yaml overridden
    (tests that need git/DVC `git init` it)."""
    over = params_over if images is None else merge(params_over, {"data": {"path": str(images)}})
    return cluster_check.copy_project(ROOT, dest, over)


@contextlib.contextmanager
def chdir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


@pytest.fixture
def tiny_images(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture
def project(tmp_path, tiny_images, monkeypatch):
    """A tiny project copy as the working directory, with a temporary MLflow store."""
    dest = copy_project(tmp_path / "project", TINY_PARAMS, tiny_images)
    monkeypatch.chdir(dest)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_RUN_ID", "test-run")
    return dest


def set_params(over: dict) -> None:
    """Override params.yaml in the current project copy."""
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), over), sort_keys=False))


# the options a `stage@item` passes: foreach stages one, matrix stages (`cv@map-0`) one per value, joined by "-"
STAGE_ARGS = {"bagging": ("member", "fold"), "cv": ("design", "fold"), "finetune": ("start-from",)}


def run_stages(*stages: str) -> None:
    """Run stage `main()`s in this process, in order (one TensorFlow import for the whole suite)."""
    import importlib

    for stage in stages:
        name, _, arg = stage.partition("@")
        module = importlib.import_module(f"pipeline.{name}")
        values = arg.rsplit("-", len(STAGE_ARGS[name]) - 1) if arg else []
        argv = [w for option, v in zip(STAGE_ARGS.get(name, ()), values) for w in (f"--{option}", v)]
        assert module.main(argv) == 0, f"stage {stage} failed"


UPSTREAM = ("split", "validate", "cache", "extract")
CV = tuple(f"cv@{d}-{k}" for d in TINY_PARAMS["head"]["designs"] for k in TINY_PARAMS["cv"]["folds"]) + ("choose",)
MEMBERS = tuple(f"bagging@{m}-{k}" for m in TINY_PARAMS["bagging"]["members"] for k in TINY_PARAMS["cv"]["folds"])


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny project run through extract, cross-validation, choose and the head's refit, shared read-only by the
    model-stage tests.

    Tests that write copy it first with `fresh_copy`."""
    tmp = tmp_path_factory.mktemp("trained")
    images = make_folder(tmp / "images", per_class=16)
    dest = copy_project(tmp / "project", TINY_PARAMS, images)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PIPELINE_RUN_ID": "session"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with chdir(dest):
            run_stages(*UPSTREAM, *CV, "head")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return dest


@pytest.fixture
def trained_copy(trained, tmp_path, monkeypatch):
    """A private copy of the session's trained tiny project, as the working directory."""
    dest = tmp_path / "project"
    shutil.copytree(trained, dest, symlinks=True)
    monkeypatch.chdir(dest)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_RUN_ID", "test-run")
    return dest


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the cats-vs-dogs photos are not at {SHARED}")
