"""Evaluate stage: the delivered model and its peers scored once on the test split, for the report, beside the
figures cross-validation measured.

For each model in `evaluate.models` it reads the probabilities its stage wrote (`data/predictions/<name>.npz`: the
recipe's out-of-fold predictions over train+val and the refit model's test predictions) and the threshold chosen by
cross-validation (the JSON beside the model), and scores both at it. The delivered model was chosen before this
stage by cross-validation (`SELECTED_BY`: the head, or the bagging ensemble when the ensemble stage kept members);
test figures are reported for every model and used for no choice (the registry's `--if-better` comparison scores
the candidate and the registered version on the current test split, as a hold-out neither was chosen on).
`metrics/evaluate.json`:

    {"selected": name, "selected_by": "...",
     "models": {name: {"threshold": t, "cv": {...}, "test": {...}, "slices": {column: {value: {"cv", "test"}}}}}}

with accuracy (and, for CV, its mean ± SD over folds), balanced accuracy, precision, recall, F1, ROC AUC, log loss,
confusion matrix and n, for all rows and per slice: each value of the split-table columns `evaluate.slice_by`
(ELPV's cell type, mono or poly). The pipeline run's parent in MLflow gets the headline figures. Then ROC /
confusion / calibration plots (PNG for every model, CSV of the delivered one for `dvc plots`), the report page (`pipeline.report`: diagnosis of every training history, error gallery,
Grad-CAM overlays) and the delivered model offered to the gated MLflow registry.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline import figures, io, models, params, paths, predictions, report, selection, tracking

PLOTS = paths.PLOTS / "evaluate"
SELECTED_BY = "cross-validation over train+val, the one-standard-error rule (pipeline.selection)"


def load_predictions(name: str) -> dict:
    """{cv_prob, cv_y, cv_fold, test_prob, test_y, classes} that model `name`'s stage wrote."""
    return predictions.load(name, f"model '{name}' (evaluate.models in params.yaml) has not been trained; "
                                        f"run `dvc repro`")


def score(y: np.ndarray, prob: np.ndarray, threshold: float, classes=None) -> dict:
    """Every figure of one split at `threshold`: accuracy, balanced accuracy, macro-F1 (the figures that mean something
    with a rare class), precision/recall/F1 (of class 1 for two classes, macro-averaged for more), ROC AUC
    (one-vs-rest for more), log loss, the confusion matrix, and precision, recall and F1 per class."""
    pred = models.labels(prob, threshold)
    binary = prob.ndim == 1
    labels = np.arange(2 if binary else prob.shape[1])
    avg = "binary" if binary else "macro"
    both = len(np.unique(y)) > 1
    per = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    names = [str(c) for c in classes] if classes is not None else [str(k) for k in labels]
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)) if len(y) else float("nan"),
        # rescaled so that chance (1/K, K the classes present) is 0 and perfect 1: what evaluate.gate reads
        "adjusted_balanced_accuracy": float(skm.balanced_accuracy_score(y, pred, adjusted=True)) if both else float("nan"),
        "macro_f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "precision": float(skm.precision_score(y, pred, average=avg, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, average=avg, zero_division=0)),
        "f1": float(skm.f1_score(y, pred, average=avg, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, prob, multi_class="ovr", labels=None if binary else labels))
        if both and (binary or len(np.unique(y)) == len(labels)) else float("nan"),
        "log_loss": float(skm.log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), labels=labels)),
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "per_class": {names[k]: {"precision": float(per[0][k]), "recall": float(per[1][k]), "f1": float(per[2][k]),
                                 "n": int(per[3][k])} for k in labels},
        "n": int(len(y)),
    }


def evaluate(scored: dict[str, dict], thresholds: dict[str, float]) -> dict:
    """{name: {"threshold", "cv", "test"}}: each model at its recorded threshold, on its recipe's out-of-fold
    predictions over train+val (pooled, plus the mean and SD over folds; None for a model not cross-validated)
    and on the test split."""
    results = {}
    for name, pr in scored.items():
        t = thresholds[name]
        cv = None
        if "cv_prob" in pr:
            folds = selection.fold_scores(pr["cv_y"], pr["cv_prob"], pr["cv_fold"], t)
            cv = {**score(pr["cv_y"], pr["cv_prob"], t, pr.get("classes")),
                  **{k: folds[k] for k in ("accuracy_mean", "accuracy_sd", "accuracy_se", "balanced_accuracy_mean",
                                           "balanced_accuracy_sd", "balanced_accuracy_se", "folds")}}
        results[name] = {"threshold": t, "cv": cv, "test": score(pr["test_y"], pr["test_prob"], t, pr.get("classes"))}
    return results


def slice_values(columns: list[str], cv_folds: list[int]) -> dict[str, dict[str, np.ndarray]]:
    """{column: {"cv": value per out-of-fold row (the train+val rows of `cv_folds`, in `features.train_val` order),
    "test": value per test row}} for each of `columns` (`evaluate.slice_by`) that the split table has."""
    table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False)
    present = [c for c in columns if c in table]
    index = pd.read_csv(paths.CACHE_DIR / "index.csv").merge(table[["path", *present]], on="path", how="left")
    cv = pd.concat([index[index["split"] == s] for s in ("train", "val")])
    rows = {"cv": cv[cv["fold"].isin(cv_folds)], "test": index[index["split"] == "test"]}
    return {c: {part: r[c].astype(str).to_numpy() for part, r in rows.items()} for c in present}


def slices(scored: dict[str, dict], results: dict, values: dict[str, dict[str, np.ndarray]]) -> None:
    """Every figure of every model per slice (TFMA's sliced metrics): `results[name]["slices"][column][value]` =
    {"cv": out-of-fold figures or None, "test": test figures}, at the model's threshold."""
    for name, pr in scored.items():
        t, out = results[name]["threshold"], {}
        for column, parts in values.items():
            out[column] = {}
            for value in sorted(set(parts["test"]) | set(parts["cv"])):
                here = {}
                for part in ("cv", "test"):
                    if f"{part}_prob" not in pr:  # a model that was not cross-validated
                        here[part] = None
                        continue
                    if len(parts[part]) != len(pr[f"{part}_y"]):
                        raise ValueError(f"data/predictions/{name}.npz holds other {part} rows than {paths.CACHE_DIR}"
                                         "/index.csv: rerun `dvc repro`")
                    rows = parts[part] == value
                    here[part] = score(pr[f"{part}_y"][rows], pr[f"{part}_prob"][rows], t, pr.get("classes")) \
                        if rows.any() else None
                out[column][value] = here
        results[name]["slices"] = out


def headline(results: dict, selected: str) -> dict[str, float]:
    """What a parent run shows in MLflow's compare view: the delivered model's CV and test figures, and what the data
    checks found (when they ran)."""
    r = results[selected]
    out = {f"test_{k}": r["test"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")}
    if r["cv"]:
        out.update({"cv_accuracy": r["cv"]["accuracy_mean"], "cv_accuracy_sd": r["cv"]["accuracy_sd"],
                    "cv_balanced_accuracy": r["cv"]["balanced_accuracy_mean"],
                    "cv_macro_f1": r["cv"]["macro_f1"], "cv_roc_auc": r["cv"]["roc_auc"]})
    checks = {"label_issues": ("label_issues", "issues"), "near_copies": ("near_copies", "hash", "images"),
              "leaks": ("near_copies", "leaks"), "gain_2x_points": ("learning_curve", "power_law", "gain_2x_points")}
    for key, (file, *path) in checks.items():
        if (paths.METRICS / f"{file}.json").exists():
            value = io.read_json(paths.METRICS / f"{file}.json")
            for k in path:
                value = value[k]
            out[key] = float(value)
    return out


def _metric_key(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(text))


def select(results: dict, bagged: int | None) -> str:
    """The model handed over: the bagging ensemble when cross-validation kept members beside the head (`bagged`,
    from the ensemble stage), else the head. Test figures play no part."""
    return "bagging" if bagged and "bagging" in results else "head"


def curves_of(y: np.ndarray, prob: np.ndarray, classes) -> dict[str, tuple]:
    """{curve name: (fpr, tpr, mean predicted, fraction positive)} on one split: for two classes the curve of class 1;
    for more, one-vs-rest per class (classes absent from the split have none)."""
    from sklearn.calibration import calibration_curve

    columns = {str(classes[1]): (y == 1, prob)} if prob.ndim == 1 else \
        {str(c): (y == k, prob[:, k]) for k, c in enumerate(classes)}
    out = {}
    for name, (hit, p) in columns.items():
        if not 0 < hit.sum() < len(hit):
            continue
        fpr, tpr, _ = skm.roc_curve(hit, p)
        frac, mean = calibration_curve(hit, p, n_bins=min(10, max(2, int(hit.sum()))), strategy="quantile")
        out[name] = (fpr, tpr, mean, frac)
    return out


def plot(scored: dict, results: dict, best: str) -> list:
    """PNG figures (test split, for the report) and CSV data of the selected model for `dvc plots`, for any number
    of classes: ROC and calibration of every model (two classes) or of the selected model per class, one-vs-rest
    (more); a confusion matrix per model."""
    classes = [str(c) for c in next(iter(scored.values()))["classes"]]
    plt = figures.pyplot()
    fig, (roc_ax, cal_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    binary = len(classes) == 2
    curves = {n: curves_of(scored[n]["test_y"], scored[n]["test_prob"], classes) for n in (scored if binary else [best])}
    for n, found in curves.items():
        label = f"{n}{' (selected)' if n == best else ''}"
        for curve, (fpr, tpr, mean, frac) in found.items():
            name = label if binary else f"{curve} vs rest"
            auc = skm.auc(fpr, tpr)
            roc_ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
            cal_ax.plot(mean, frac, marker="o", label=name)
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    cal_ax.plot([0, 1], [0, 1], ":", color="grey")
    title = "(test)" if binary else f"(test, {best}, one-vs-rest)"
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}")
    cal_ax.set(xlabel="mean predicted probability", ylabel="fraction positive", title=f"calibration {title}")
    roc_ax.legend(fontsize="small"), cal_ax.legend(fontsize="small")
    fig.tight_layout()
    files = [figures.save(fig, PLOTS / "roc_calibration.png")]
    side = max(3.8, 0.6 * len(classes) + 2)
    fig, axes = plt.subplots(1, len(results), figsize=(side * len(results), side), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        skm.ConfusionMatrixDisplay(np.array(res["test"]["confusion_matrix"]), display_labels=classes).plot(
            ax=ax, colorbar=False, xticks_rotation=45 if len(classes) > 2 else "horizontal")
        ax.set_title(f"{name}{' (selected)' if name == best else ''}: test accuracy {res['test']['accuracy']:.3f}",
                     fontsize="medium")
    fig.tight_layout()
    files.append(figures.save(fig, PLOTS / "confusion.png"))
    pr = scored[best]
    pred = models.labels(pr["test_prob"], results[best]["threshold"])
    io.write_csv(PLOTS / "confusion.csv", pd.DataFrame({"actual": [classes[i] for i in pr["test_y"]],
                                                        "predicted": [classes[i] for i in pred]}))
    found = curves[best]
    io.write_csv(PLOTS / "roc.csv", pd.concat([pd.DataFrame({"class": c, "fpr": f, "tpr": t})
                                                for c, (f, t, _, _) in found.items()], ignore_index=True))
    io.write_csv(PLOTS / "calibration.csv", pd.concat([pd.DataFrame({"class": c, "mean_predicted": m,
                                                                     "fraction_positive": fr})
                                                        for c, (_, _, m, fr) in found.items()], ignore_index=True))
    return files


def main(argv=None) -> int:
    prm = params.load()
    p = prm.evaluate
    with tracking.stage_run("evaluate", p.model_dump()) as run:
        scored = {m: load_predictions(m) for m in p.models}
        predictions.same_rows(scored)
        results = evaluate(scored, {m: models.threshold_of(models.read_meta(m)) for m in p.models})
        slices(scored, results, slice_values(p.slice_by, prm.cv.folds))
        bagged = io.read_json(paths.METRICS / "cv_bagging.json")["members"] if "bagging" in p.models else None
        selected = select(results, bagged)
        summary = {"selected": selected, "selected_by": SELECTED_BY, "models": results}
        io.write_json(paths.METRICS / "evaluate.json", summary)
        drawn = plot(scored, results, selected)
        design = io.read_json(paths.RECIPE)["design"]
        trained = [m for m in ("head", "finetune") if m in p.models] + [f"cv/{design}/fold_{k}" for k in prm.cv.folds]
        trained += [f"ensemble/member_{m}" for m in prm.bagging.members[:bagged or 0]]
        page = report.build(results, selected, SELECTED_BY, trained, scored[selected], PLOTS)
        if run:
            run.set_tag("selected", selected)
            tracking.log_files(run, page, artifact_path="report")
            scored_splits = [(m, s, r[s]) for m, r in results.items() for s in ("cv", "test") if r[s]]
            run.log_metrics({f"{m}_{s}_{k}": v for m, s, r in scored_splits for k, v in r.items() if isinstance(v, float)})
            run.log_metrics({f"{m}_{s}_recall_{c}": v["recall"] for m, s, r in scored_splits
                             for c, v in r["per_class"].items()})
            run.log_metrics({_metric_key(f"{m}_{s}_{col}.{val}_{k}"): r[s][k]
                             for m, res in results.items() for col, by in res["slices"].items()
                             for val, r in by.items() for s in ("cv", "test") if r[s]
                             for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc") if r[s][k] == r[s][k]})
            tracking.log_files(run, paths.METRICS / "evaluate.json", *drawn)
        tracking.log_headline(headline(results, selected), {"selected_model": selected})
    for name, r in results.items():
        cv = (f"CV balanced accuracy {r['cv']['balanced_accuracy_mean']:.4f} ± {r['cv']['balanced_accuracy_sd']:.4f}, "
              f"accuracy {r['cv']['accuracy_mean']:.4f}") if r["cv"] else "no CV"
        print(f"evaluate {name:9s}{' *' if name == selected else '  '} {cv}  "
              f"test accuracy {r['test']['accuracy']:.4f}  balanced {r['test']['balanced_accuracy']:.4f}  ROC AUC {r['test']['roc_auc']:.4f}  "
              f"log loss {r['test']['log_loss']:.4f}  threshold {r['threshold']:.3f}  (n={r['test']['n']})")
    print(f"evaluate: delivers {selected} ({SELECTED_BY})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
