"""Evaluate stage: test-split metrics for every model, with the decision threshold chosen on validation.

Reads the probabilities the model stages wrote (the bagging ensemble is the mean of its members), writes
`metrics/evaluate.json` ({model: {accuracy, precision, recall, f1, roc_auc, log_loss, ...}}), the K-fold summary,
ROC / confusion / calibration plots as PNG and as data for `dvc plots`, then offers the best model to the gated
MLflow registry (registered only if it passes `evaluate.gate` and beats the registered version on this test split).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline import io, params, paths, tracking

PLOTS = paths.PLOTS / "evaluate"


def load_predictions(name: str) -> dict:
    """{val_prob, val_y, test_prob, test_y, classes[, members]}; bagging averages its members."""
    if name != "bagging":
        with np.load(paths.PREDICTIONS_DIR / f"{name}.npz") as f:
            return dict(f)
    files = sorted((paths.PREDICTIONS_DIR / "bagging").glob("member_*.npz"))
    if not files:
        raise FileNotFoundError(f"no bagging members in {paths.PREDICTIONS_DIR / 'bagging'}: run `dvc repro bagging`")
    members = [dict(np.load(f)) for f in files]
    out = {k: members[0][k] for k in ("val_y", "test_y", "classes")}
    for split in ("val", "test"):
        out[f"{split}_prob"] = np.mean([m[f"{split}_prob"] for m in members], axis=0)
    out["members"] = members
    return out


def predict_labels(prob: np.ndarray, threshold: float) -> np.ndarray:
    return (prob >= threshold).astype(int) if prob.ndim == 1 else prob.argmax(1)


def choose_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The validation threshold with the best accuracy (ties: the one nearest 0.5); argmax for several classes."""
    if prob.ndim > 1:
        return float("nan")
    candidates = np.unique(np.concatenate([prob, [0.5]]))
    acc = np.array([(predict_labels(prob, t) == y).mean() for t in candidates])
    best = candidates[acc == acc.max()]
    return float(best[np.argmin(np.abs(best - 0.5))])


def score(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    pred = predict_labels(prob, threshold)
    binary = prob.ndim == 1
    avg = "binary" if binary else "macro"
    both = len(np.unique(y)) > 1
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, average=avg, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, average=avg, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, average=avg, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, prob, multi_class="ovr")) if both else float("nan"),
        "log_loss": float(skm.log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), labels=np.arange(2 if binary else prob.shape[1]))),
        "threshold": threshold,
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=np.arange(2 if binary else prob.shape[1])).tolist(),
        "n_test": int(len(y)),
    }


def evaluate(predictions: dict[str, dict]) -> dict:
    results = {}
    for name, pr in predictions.items():
        t = choose_threshold(pr["val_y"], pr["val_prob"])
        results[name] = score(pr["test_y"], pr["test_prob"], t)
        if "members" in pr:
            results[name]["members"] = [
                {k: v for k, v in score(m["test_y"], m["test_prob"], choose_threshold(m["val_y"], m["val_prob"])).items()
                 if k in ("accuracy", "roc_auc", "log_loss")} for m in pr["members"]]
    return results


def kfold_summary(files) -> dict:
    folds = [io.read_json(f) for f in sorted(files)]
    if not folds:
        return {"folds": 0}
    out = {"folds": len(folds)}
    for key in ("accuracy", "roc_auc"):
        values = np.array([f[key] for f in folds], float)
        out[f"{key}_mean"], out[f"{key}_std"] = float(values.mean()), float(values.std(ddof=0))
    return out


def plot(predictions: dict, results: dict, best: str) -> list:
    """PNG figures for every model, and CSV data of the best one for `dvc plots`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    binary = {n: p for n, p in predictions.items() if p["test_prob"].ndim == 1 and len(np.unique(p["test_y"])) > 1}
    fig, (roc_ax, cal_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, pr in binary.items():
        fpr, tpr, _ = skm.roc_curve(pr["test_y"], pr["test_prob"])
        roc_ax.plot(fpr, tpr, label=f"{name} (AUC {results[name]['roc_auc']:.3f})")
        frac, mean = calibration_curve(pr["test_y"], pr["test_prob"], n_bins=10, strategy="quantile")
        cal_ax.plot(mean, frac, marker="o", label=name)
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    cal_ax.plot([0, 1], [0, 1], ":", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    cal_ax.set(xlabel="mean predicted probability", ylabel="fraction positive", title="calibration (test)")
    roc_ax.legend(), cal_ax.legend()
    fig.tight_layout()
    files = [_save(fig, PLOTS / "roc_calibration.png")]
    classes = [str(c) for c in next(iter(predictions.values()))["classes"]]
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        skm.ConfusionMatrixDisplay(np.array(res["confusion_matrix"]), display_labels=classes).plot(ax=ax, colorbar=False)
        ax.set_title(f"{name}: accuracy {res['accuracy']:.3f}")
    fig.tight_layout()
    files.append(_save(fig, PLOTS / "confusion.png"))
    pr = predictions[best]
    pred = predict_labels(pr["test_prob"], results[best]["threshold"])
    io.write_csv(PLOTS / "confusion.csv", pd.DataFrame({"actual": [classes[i] for i in pr["test_y"]],
                                                        "predicted": [classes[i] for i in pred]}))
    if best in binary:
        fpr, tpr, _ = skm.roc_curve(pr["test_y"], pr["test_prob"])
        io.write_csv(PLOTS / "roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
        frac, mean = calibration_curve(pr["test_y"], pr["test_prob"], n_bins=10, strategy="quantile")
        io.write_csv(PLOTS / "calibration.csv", pd.DataFrame({"mean_predicted": mean, "fraction_positive": frac}))
    return files


def _save(fig, path):
    import matplotlib.pyplot as plt

    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = params.load().evaluate
    predictions = {m: load_predictions(m) for m in p.models}
    results = evaluate(predictions)
    best = max(results, key=lambda m: (results[m]["accuracy"], results[m]["roc_auc"]))
    kfold = kfold_summary((paths.METRICS / "kfold").glob("fold_*.json"))
    with tracking.stage_run("evaluate", p.model_dump()) as run:
        io.write_json(paths.METRICS / "evaluate.json", results)
        io.write_json(paths.METRICS / "kfold.json", kfold)
        figures = plot(predictions, results, best)
        if run:
            run.log_metrics({f"{m}_{k}": v for m, r in results.items() for k, v in r.items() if isinstance(v, float)})
            run.log_metrics({f"kfold_{k}": v for k, v in kfold.items()})
            tracking.log_files(run, paths.METRICS / "evaluate.json", *figures)
    for name, r in results.items():
        print(f"evaluate {name:9s} accuracy {r['accuracy']:.4f}  ROC AUC {r['roc_auc']:.4f}  F1 {r['f1']:.4f}  "
              f"log loss {r['log_loss']:.4f}  threshold {r['threshold']:.3f}  (n={r['n_test']})")
    if kfold["folds"]:
        print(f"evaluate kfold: accuracy {kfold['accuracy_mean']:.4f} ± {kfold['accuracy_std']:.4f} over {kfold['folds']} folds")
    if tracking.enabled():
        print(tracking.register(if_better=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
