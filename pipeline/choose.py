"""Choose stage: the head design and the threshold rule, chosen on cross-validation over train+val.

It puts each design's folds (the cv stage) together into out-of-fold predictions for every train+val row, scores
them fold by fold (mean ± SD of balanced accuracy, accuracy and log loss) and applies the one-standard-error rule
(`pipeline.selection`): the simplest design within one standard error of the best. On the chosen design's
out-of-fold predictions the same rule picks the decision threshold (0.5, or one tuned for balanced accuracy; two classes),
and the refit's epoch count is the median of its folds' best epochs. Writes:

- `data/cv/recipe.json`: what the head and bagging stages train (design, epochs, threshold);
- `data/cv/oof.csv`: every design's out-of-fold probabilities, one row per train+val image and design (path,
  label, fold): what finding suspect labels reads;
- `metrics/cv.json` and `plots/cv/candidates.png`: every candidate's CV figures and the choice.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import features, figures, io, params, paths, predictions, selection, tracking


def choose(y: np.ndarray, folds: np.ndarray, oof: dict[str, np.ndarray], best_epochs: dict[str, list[int]]) -> dict:
    """The choice from each design's out-of-fold probabilities (`oof`, over the same rows `y`, `folds`) and the
    best epochs of its folds: {"designs": {name: scores}, "design", "epochs", "threshold_rule", "threshold", ...}."""
    scores = {d: {**selection.fold_scores(y, prob, folds), "best_epochs": [int(e) for e in best_epochs[d]]}
              for d, prob in oof.items()}
    design = selection.one_standard_error(scores, sorted(scores, key=selection.design_rank))
    rule, threshold, rules = selection.threshold_rule(y, oof[design], folds)
    best = max(scores, key=lambda d: scores[d][f"{selection.FIGURE}_mean"])
    return {"chosen_by": selection.RULE, "design": design, "best_mean": best,
            "epochs": selection.best_epochs(best_epochs[design]), "threshold_rule": rule, "threshold": threshold,
            "threshold_rules": rules, "designs": scores, "rows": int(len(y))}


def oof_table(index: pd.DataFrame, y: np.ndarray, folds: np.ndarray, oof: dict[str, np.ndarray], classes) -> pd.DataFrame:
    """One row per train+val image and design: path (relative to the data root), label, fold, prob_<class>."""
    frames = []
    for design, prob in oof.items():
        p = np.stack([1 - prob, prob], 1) if prob.ndim == 1 else prob
        frame = pd.DataFrame({"path": index["path"].to_numpy(), "label": [classes[k] for k in y], "fold": folds,
                              "design": design})
        for k, c in enumerate(classes):
            frame[f"prob_{c}"] = p[:, k]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def plot(result: dict, target) -> object:
    """Each candidate's fold balanced accuracies, mean ± one standard error, and the bar the rule draws."""
    plt, f = figures.pyplot(), selection.FIGURE
    names = list(result["designs"])
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 3.8))
    for i, d in enumerate(names):
        s = result["designs"][d]
        ax.plot([i] * len(s[f"fold_{f}"]), s[f"fold_{f}"], "o", color="lightgrey")
        ax.errorbar(i, s[f"{f}_mean"], yerr=s[f"{f}_se"], fmt="s", capsize=6,
                    color="tab:green" if d == result["design"] else "tab:blue")
    best = result["designs"][result["best_mean"]]
    ax.axhline(best[f"{f}_mean"] - best[f"{f}_se"], ls=":", color="grey", label="best mean - 1 SE")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="CV balanced accuracy (folds, mean ± SE)", title=f"head designs: chose {result['design']} (green)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return figures.save(fig, target)


def main(argv=None) -> int:
    prm = params.load()
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    index = pd.read_csv(paths.FEATURES_DIR / "index.csv")
    index = pd.concat([index[index["split"] == s] for s in ("train", "val")], ignore_index=True)  # train_val's order
    _, y, folds = features.train_val(pooled=True)  # the labels and folds (the small pooled vectors come along)
    used = np.isin(folds, prm.cv.folds)  # the rows of the folds params name
    oof, epochs = {}, {}
    for d in prm.head.designs:
        oof[d] = predictions.out_of_fold(f"designs/{d}", folds, prm.cv.folds)[used]
        epochs[d] = [int(predictions.load_fold(f"designs/{d}", k)["best_epoch"]) for k in prm.cv.folds]
    with tracking.stage_run("choose", {"designs": list(prm.head.designs), "folds": list(prm.cv.folds)}) as run:
        result = choose(y[used], folds[used], oof, epochs)
        io.write_json(paths.RECIPE, {k: result[k] for k in ("design", "epochs", "threshold_rule", "threshold",
                                                            "chosen_by")})
        io.write_csv(paths.OOF_TABLE, oof_table(index[used], y[used], folds[used], oof, meta["classes"]))
        io.write_json(paths.METRICS / "cv.json", result)
        picture = plot(result, paths.PLOTS / "cv" / "candidates.png")
        if run:
            run.log_params({"chosen_design": result["design"], "threshold_rule": result["threshold_rule"],
                            "refit_epochs": result["epochs"]})
            run.log_metrics({f"cv_{d}_{k}": s[k] for d, s in result["designs"].items()
                             for k in ("balanced_accuracy_mean", "balanced_accuracy_sd", "accuracy_mean", "accuracy_sd",
                                       "log_loss_mean")})
            tracking.log_files(run, paths.METRICS / "cv.json", picture)
    for d, s in result["designs"].items():
        print(f"choose {d:7s}{' *' if d == result['design'] else '  '} CV balanced accuracy "
              f"{s['balanced_accuracy_mean']:.4f} ± {s['balanced_accuracy_sd']:.4f} (SE {s['balanced_accuracy_se']:.4f}), "
              f"accuracy {s['accuracy_mean']:.4f}, log loss {s['log_loss_mean']:.4f}")
    print(f"choose: {result['design']} by the one-standard-error rule; threshold {result['threshold_rule']} "
          f"({result['threshold']:.3f}); refit for {result['epochs']} epochs on {len(y[used])} train+val rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
