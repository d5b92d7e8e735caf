"""The gated model registry: the model evaluate selected (by cross-validation), logged as a pyfunc (`pipeline.serving`)
and registered as `tracking.register_as` if it passes `evaluate.gate` and, with --if-better, scores a better balanced
accuracy than the version the alias `champion` points at on the current test split (both loaded as pyfunc models,
scored on the same images). The comparison holds only between models trained on the same split (the versions'
`lineage.split_sha256` tag): a champion trained on another split has seen some of today's test images, so a new
split starts a new comparison. A registered version becomes the `champion`: what `make serve`, the README and the
`score_new_images` DAG load (`models:/<name>@champion`).

Beside the pyfunc, the register run holds what the model is put to work as elsewhere: `saved_model/` (for TF
Serving, `models.export_saved_model`), the export stage's TFLite files (`tflite/`) and their parity figures
(metrics `export_<format>_<split>_<figure>`, from `metrics/export.json`).

CLI: `python -m pipeline.registry register [--if-better]`. Only the export stage, the pipeline's last, imports it:
the other stages' runs (`pipeline.tracking`) do not depend on the served model's code.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from pipeline import io, lineage, params, paths, tracking


CHAMPION = "champion"  # the alias of the version in use


def gate_failures(scores: dict, gate: params.Gate) -> list[str]:
    """Why `scores` fail the gate (empty: it passes). A missing or NaN metric fails."""
    out = []
    for key, minimum in (("adjusted_balanced_accuracy", gate.min_adjusted_balanced_accuracy),
                         ("roc_auc", gate.min_roc_auc)):
        value = scores.get(key)
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            out.append(f"{key} is {'missing' if value is None else value}")
        elif value < minimum:
            out.append(f"{key} {value:.4f} < {minimum}")
    return out


def current_test_split():
    """(images uint8 (N,S,S,3), true class names) of the current cache's test split."""
    import numpy as np

    x, y = io.load_pair(paths.CACHE_DIR / "test")
    classes = io.read_json(paths.CACHE_DIR / "meta.json")["classes"]
    return x, np.array(classes, dtype=object)[y]


def _balanced_accuracy(table, truth) -> float:
    """Mean per-class recall of a prediction table (`label` column) against the true class names."""
    from pipeline import selection

    return selection.balanced_accuracy(truth, table["label"].to_numpy().astype(object))


def champion(client, name: str):
    """The version the alias `champion` points at, or None (no such model, or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def log_exports(mlflow, name: str, seed: int) -> None:
    """Into the active run: model `name` as a SavedModel (`saved_model/`), the training images' feature statistics
    its batches are compared with (`pipeline.drift`) and, when the export stage exported this model, its TFLite
    files (`tflite/`) and parity figures."""
    from pipeline import drift, images, models

    model, _ = models.load(name)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(models.export_saved_model(model, Path(tmp) / "saved_model")), "saved_model")
    train = images.sample(paths.CACHE_DIR, "train", drift.REFERENCE_IMAGES, seed)
    mlflow.log_dict(drift.reference(model, train), drift.ARTIFACT)
    report = paths.METRICS / "export.json"
    if report.exists() and io.read_json(report).get("model") == name:
        for file in sorted(paths.EXPORTS.glob("*.*")):
            mlflow.log_artifact(str(file), "tflite")
        mlflow.log_artifact(str(report), "tflite")
        mlflow.log_metrics({f"export_{fmt}_{split}_{k}": float(v)
                            for fmt, r in io.read_json(report)["formats"].items() for split in ("val", "test")
                            for k, v in r[split].items() if k != "n"})


def register(if_better: bool = False) -> str:
    """Log the model evaluate selected as a pyfunc (`pipeline.serving`); register it if it passes the gate on its
    out-of-fold (CV) figures and, with `if_better`, beats the registered version on the current test split."""
    from pipeline import models, serving

    prm = params.load()
    report = io.read_json(paths.METRICS / "evaluate.json")
    name = report.get("selected")
    if not name or name not in report.get("models", {}):
        return f"not registered: {paths.METRICS / 'evaluate.json'} names no selected model (rerun `dvc repro evaluate`)"
    scores = report["models"][name]
    if not scores.get("cv"):
        return f"not registered: {name} was not cross-validated; evaluate.gate reads CV figures"
    failures = gate_failures(scores["cv"], prm.evaluate.gate)
    if failures:
        return (f"not registered: {name} fails evaluate.gate on its out-of-fold (CV) figures: {'; '.join(failures)} "
                f"(the gate asks adjusted balanced accuracy >= {prm.evaluate.gate.min_adjusted_balanced_accuracy}, "
                f"ROC AUC >= {prm.evaluate.gate.min_roc_auc})")
    mlflow, client, exp_id = tracking.setup(prm.tracking)
    registered_as = prm.tracking.register_as
    comparison = {}
    # the data and code the model came from (by content, from its JSON), and the commit that registers it
    info = {**lineage.git_commit(), **(models.read_meta(name).get("lineage") or {})}
    current = champion(client, registered_as) if if_better else None
    if current is not None and current.tags.get("lineage.split_sha256") != str(info.get("split_sha256")):
        print(f"register: the champion, version {current.version}, was trained on another split "
              f"({current.tags.get('lineage.split_sha256', 'unknown')[:12]}, this model's {str(info.get('split_sha256'))[:12]}): "
              "it may have seen today's test images, so a new split starts a new comparison")
        current = None
    if current is not None:
        images, truth = current_test_split()
        new = _balanced_accuracy(serving.local(models.path(name)).classify(images), truth)
        try:
            old = _balanced_accuracy(mlflow.pyfunc.load_model(f"models:/{registered_as}/{current.version}")
                                     .predict(images), truth)
        except Exception as e:  # noqa: BLE001 - e.g. a version logged before models took images
            print(f"register: version {current.version} cannot score images ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); it counts as no comparison")
            old = float("nan")
        comparison = {"compared_with_version": current.version, "current_test_balanced_accuracy_new": new,
                      "current_test_balanced_accuracy_champion": old, "current_test_n": len(truth)}
        if not math.isnan(old) and new <= old:
            return (f"not registered: the champion, version {current.version}, scores a balanced accuracy of {old:.4f} "
                    f"on the current test split ({len(truth)} images), {name} {new:.4f}")
    rid = tracking.pipeline_run_id()
    parent = tracking.parent_run(client, exp_id, rid)
    tags = {"stage": "register", "role": "register", "pipeline_run_id": rid, "model": name,
            "selected_by": report.get("selected_by", ""), "mlflow.parentRunId": parent, **tracking.lineage_tags(info)}
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register {name}", tags=tags):
            mlflow.log_metrics({f"{split}_{k}": float(v) for split in ("cv", "test")
                                for k, v in scores[split].items() if isinstance(v, (int, float))})
            if comparison:
                mlflow.log_metrics({k: float(v) for k, v in comparison.items()
                                    if k != "compared_with_version" and not math.isnan(v)})
            logged = serving.log_model(mlflow, models.path(name), registered_model_name=registered_as)
            log_exports(mlflow, name, prm.seed)
    finally:
        tracking.settle_parent(client, exp_id, rid, parent)
    version = str(logged.registered_model_version)
    for k, v in {**tracking.lineage_tags(info), "model": name, "selected_by": report.get("selected_by", ""),
                 "cv_accuracy": f"{scores['cv']['accuracy']:.4f}", "test_accuracy": f"{scores['test']['accuracy']:.4f}",
                 "cv_balanced_accuracy": f"{scores['cv']['balanced_accuracy']:.4f}",
                 "test_balanced_accuracy": f"{scores['test']['balanced_accuracy']:.4f}"}.items():
        client.set_model_version_tag(registered_as, version, k, v)
    client.set_registered_model_alias(registered_as, CHAMPION, version)
    return (f"registered {name} as '{registered_as}' version {version}, now @{CHAMPION} (CV balanced accuracy "
            f"{scores['cv']['balanced_accuracy']:.4f}, test {scores['test']['balanced_accuracy']:.4f}): {logged.model_uri}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="register the selected model if it passes evaluate.gate")
    reg.add_argument("--if-better", action="store_true",
                     help=f"only if it beats the @{CHAMPION} version (same split) on the current test split")
    args = ap.parse_args(argv)
    print(register(if_better=args.if_better))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
