"""The gated model registry: the model evaluate selected (by cross-validation), logged as a pyfunc (`pipeline.serving`)
and registered as `tracking.register_as` if it passes `evaluate.gate` and, with --if-better, scores better than the
registered version on the current test split (both loaded as pyfunc models, scored on the same images).

CLI: `python -m pipeline.registry register [--if-better]`. Only the evaluate stage imports it: the other stages'
runs (`pipeline.tracking`) do not depend on the served model's code.
"""
from __future__ import annotations

import argparse
import math

from pipeline import io, lineage, params, paths, tracking


def gate_failures(scores: dict, gate: params.Gate) -> list[str]:
    """Why `scores` fail the gate (empty: it passes). A missing or NaN metric fails."""
    out = []
    for key, minimum in (("accuracy", gate.min_accuracy), ("roc_auc", gate.min_roc_auc)):
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


def _accuracy(table, truth) -> float:
    """Share of rows of a prediction table (`label` column) that match the true class names."""
    import numpy as np

    return float(np.mean(table["label"].to_numpy() == truth))


def latest_version(client, name: str):
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


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
                f"(the gate asks accuracy >= {prm.evaluate.gate.min_accuracy}, ROC AUC >= {prm.evaluate.gate.min_roc_auc})")
    mlflow, client, exp_id = tracking.setup(prm.tracking)
    registered_as = prm.tracking.register_as
    comparison = {}
    if if_better and (current := latest_version(client, registered_as)) is not None:
        images, truth = current_test_split()
        new_acc = _accuracy(serving.local(models.path(name)).classify(images), truth)
        try:
            old_acc = _accuracy(mlflow.pyfunc.load_model(f"models:/{registered_as}/{current.version}").predict(images),
                                truth)
        except Exception as e:  # noqa: BLE001 - e.g. a version logged before models took images
            print(f"register: version {current.version} cannot score images ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); it counts as no comparison")
            old_acc = float("nan")
        comparison = {"compared_with_version": current.version, "current_test_accuracy_new": new_acc,
                      "current_test_accuracy_registered": old_acc, "current_test_n": len(truth)}
        if not math.isnan(old_acc) and new_acc <= old_acc:
            return (f"not registered: version {current.version} scores {old_acc:.4f} on the current test split "
                    f"({len(truth)} images), {name} {new_acc:.4f}")
    rid = tracking.pipeline_run_id()
    # the data and code the model came from (by content, from its JSON), and the commit that registers it
    info = {**lineage.git_commit(), **(models.read_meta(name).get("lineage") or {})}
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
    finally:
        tracking.settle_parent(client, exp_id, rid, parent)
    version = str(logged.registered_model_version)
    for k, v in {**tracking.lineage_tags(info), "model": name, "selected_by": report.get("selected_by", ""),
                 "cv_accuracy": f"{scores['cv']['accuracy']:.4f}", "test_accuracy": f"{scores['test']['accuracy']:.4f}"}.items():
        client.set_model_version_tag(registered_as, version, k, v)
    return (f"registered {name} as '{registered_as}' version {version} (CV accuracy "
            f"{scores['cv']['accuracy']:.4f}, test {scores['test']['accuracy']:.4f}): {logged.model_uri}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="register the selected model if it passes evaluate.gate")
    reg.add_argument("--if-better", action="store_true",
                     help="only if it beats the registered version on the current test split")
    args = ap.parse_args(argv)
    print(register(if_better=args.if_better))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
