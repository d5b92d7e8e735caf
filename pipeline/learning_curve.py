"""Learning-curve stage: would more labels help? The chosen recipe's cross-validated accuracy when it trains on a
fraction of each fold's training rows (`learning_curve.fractions`, e.g. 10, 25 and 50 %; 100 % is the CV itself,
read from the cv stage), each fraction a stratified, seeded subsample, scored on the fold's held-out rows as the cv
stage scores them. No test row is read.

A power law, error = a * n^(-b) (n: rows trained on), fitted to the mean error of each fraction in log-log space,
extrapolates to twice the data: "doubling the labels would gain about N points". Writes
`metrics/learning_curve.json` and `plots/data/learning_curve.png`.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline import features, figures, heads, io, params, paths, predictions, selection, tracking

PICTURE = paths.DATA_PLOTS / "learning_curve.png"


def subsample(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices into `y` of a stratified `fraction` of its rows (at least two of each class)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        keep.append(rng.permutation(rows)[:min(len(rows), max(2, int(round(fraction * len(rows)))))])
    return np.sort(np.concatenate(keep))


def power_law(n, accuracy, floor: float) -> dict:
    """Fit error = a * n^(-b) to (rows, mean accuracy) in log-log space (an error below `floor`, e.g. none wrong,
    counts as `floor`); the fitted accuracy at the largest n and at twice it, and the gain in points."""
    n, err = np.asarray(n, float), np.maximum(1 - np.asarray(accuracy, float), floor)
    slope, intercept = np.polyfit(np.log(n), np.log(err), 1)
    a, b = float(np.exp(intercept)), float(-slope)
    at = lambda rows: float(1 - a * rows ** -b)  # noqa: E731
    top = float(n.max())
    return {"a": a, "b": b, "formula": "error = a * rows^(-b)", "rows": top, "fitted_accuracy": at(top),
            "rows_2x": 2 * top, "accuracy_2x": at(2 * top), "gain_2x_points": 100 * (at(2 * top) - at(top))}


def curve(x, y, folds, which, fractions, p: heads.Recipe, n_classes: int, seed: int, full: dict) -> dict:
    """Per fraction (then 1.0 from `full`: {fold: (probabilities, rows trained on)} of the cv stage), the fold
    accuracies and the rows trained on; with the power law."""
    oof = {f: None for f in (*fractions, 1.0)}  # out-of-fold probabilities per fraction
    rows = {f: [] for f in oof}
    jobs = [(k, f) for k in which for f in fractions]
    for k, f in tqdm(jobs + [(k, 1.0) for k in which], desc="learning curve: fold x fraction", unit="fit"):
        train_rows, held = features.fold_rows(folds, k)
        if f == 1.0:  # the cv stage's own fold
            prob, n_fit = full[k][0], int(full[k][1])
        else:
            sub = train_rows[subsample(y[train_rows], f, seed + k)]
            prob, _, n_fit = heads.cross_fit(x, y, sub, held, n_classes, p, seed + k)
        if oof[f] is None:
            oof[f] = np.zeros((len(y),) + np.shape(prob)[1:])
        oof[f][held] = prob
        rows[f].append(n_fit)
    used = np.isin(folds, which)
    points = []
    for f, prob in oof.items():
        s = selection.fold_scores(y[used], prob[used], folds[used])
        points.append({"fraction": f, "rows": float(np.mean(rows[f])), "accuracy_mean": s["accuracy_mean"],
                       "accuracy_sd": s["accuracy_sd"], "fold_accuracy": s["fold_accuracy"]})
    floor = 0.5 / int(np.isin(folds, which).sum())  # half an image wrong over all held-out rows
    law = power_law([q["rows"] for q in points], [q["accuracy_mean"] for q in points], floor)
    return {"design": p.design, "points": points, "power_law": law}


def plot(result: dict, target):
    plt = figures.pyplot()
    pts, law = result["points"], result["power_law"]
    n = np.array([q["rows"] for q in pts])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(n, [100 * q["accuracy_mean"] for q in pts], yerr=[100 * q["accuracy_sd"] for q in pts], fmt="o",
                capsize=4, label="CV accuracy (mean ± SD over folds)")
    grid = np.geomspace(n.min(), law["rows_2x"], 100)
    fitted = 100 * (1 - law["a"] * grid ** -law["b"])
    inside = grid <= n.max()
    ax.plot(grid[inside], fitted[inside], "-", color="tab:orange", label=f"power law, error = {law['a']:.3g}·n^-{law['b']:.3f}")
    ax.plot(grid[~inside], fitted[~inside], "--", color="tab:orange", label="extrapolated to 2x the rows")
    ax.plot([law["rows_2x"]], [100 * law["accuracy_2x"]], "*", ms=12, color="tab:orange")
    ax.set_xscale("log")
    ticks = [*n, law["rows_2x"]]
    ax.set_xticks(ticks, [f"{r:.0f}" for r in ticks])
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set(xlabel="training rows (log scale)", ylabel="accuracy (%)",
           title=f"{result['design']}: doubling the labels would gain about {law['gain_2x_points']:.1f} points")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return figures.save(fig, target)


def main(argv=None) -> int:
    prm = params.load()
    design = io.read_json(paths.RECIPE)["design"]
    p = heads.recipe(prm.head, design)  # as cross-validated: early stopping, not the refit's fixed epochs
    classes = io.read_json(paths.FEATURES_DIR / "meta.json")["classes"]
    x, y, folds = features.train_val(pooled=p.features == "pooled")
    full = {}
    for k in prm.cv.folds:
        f = predictions.load_fold(f"designs/{design}", k)
        full[k] = (f["prob"], f["n_train"])
    with tracking.stage_run("learning_curve", {**prm.learning_curve.model_dump(), "design": design}) as run:
        result = curve(x, y, folds, prm.cv.folds, prm.learning_curve.fractions, p, len(classes), prm.seed, full)
        io.write_json(paths.METRICS / "learning_curve.json", result)
        pic = plot(result, PICTURE)
        if run:
            for q in result["points"]:
                run.log_metric("cv_accuracy", q["accuracy_mean"], step=int(round(q["rows"])))
            run.log_metrics({"gain_2x_points": result["power_law"]["gain_2x_points"],
                             "power_law_b": result["power_law"]["b"]})
            tracking.log_files(run, pic)
    law = result["power_law"]
    print("learning_curve: " + ", ".join(f"{q['fraction']:.0%} ({q['rows']:.0f} rows) {q['accuracy_mean']:.4f}"
                                         for q in result["points"])
          + f"; power law b = {law['b']:.3f}: doubling the labels would gain about {law['gain_2x_points']:.1f} points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
