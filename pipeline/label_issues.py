"""Label-issues stage: the train+val images whose given label the cross-validated models disagree with.

It reads the chosen design's out-of-fold probabilities (`data/cv/oof.csv`, from the choose stage: every image
scored by a model that never saw it) and lets cleanlab's confident learning find the likely label errors
(`cleanlab.filter.find_label_issues`, `label_issues.method`), ranked by self-confidence, the out-of-fold probability
of the given label (`cleanlab.rank.get_label_quality_scores`). No test row is read.

Writes `data/label_issues.csv` (path, given, suggested, quality, fold; worst first), `metrics/label_issues.json` and
`plots/data/label_issues.png` (the top `label_issues.show`). Review the list, keep the rows you agree with, and name
that file in `data.exclude` to train without them: nothing is left out unless a person says so.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from pipeline import figures, images, io, params, paths, tracking

PICTURE = paths.DATA_PLOTS / "label_issues.png"


def issues(oof: pd.DataFrame, classes: list[str], method: str) -> pd.DataFrame:
    """The rows of `oof` (one design's out-of-fold table: path, label, fold, prob_<class>) that confident learning
    flags, worst first: path, given, suggested, quality (the out-of-fold probability of the given label), fold."""
    prob = oof[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    prob = prob / prob.sum(1, keepdims=True)
    given = oof["label"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    flagged = find_label_issues(given, prob, filter_by=method, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(given, prob, method="self_confidence")
    return pd.DataFrame({"path": oof["path"].to_numpy()[flagged], "given": oof["label"].to_numpy()[flagged],
                         "suggested": [classes[k] for k in prob[flagged].argmax(1)],
                         "quality": np.round(quality[flagged], 6), "fold": oof["fold"].to_numpy()[flagged]})


def summarize(found: pd.DataFrame, n_rows: int, design: str, method: str, classes: list[str]) -> dict:
    pairs = found.groupby(["given", "suggested"]).size()
    return {"design": design, "method": method, "rows": n_rows, "issues": len(found),
            "share": len(found) / n_rows if n_rows else 0.0,
            "by_given": {c: int((found["given"] == c).sum()) for c in classes},
            "given_to_suggested": {f"{g} -> {s}": int(n) for (g, s), n in pairs.items()}}


def picture(found: pd.DataFrame, show: int, target, cols: int = 6):
    top = found.head(show)
    pics = images.cached(top["path"], paths.CACHE_DIR)
    cells = [(pics[r.path], f"{r.path.rsplit('/', 1)[-1][:18]}\ngiven {r.given}\nsuggested {r.suggested} "
                            f"(p={r.quality:.2f})", True) for r in top.itertuples() if r.path in pics]
    rows = [(f"{k + 1}-{k + len(cells[k:k + cols])}", cells[k:k + cols]) for k in range(0, len(cells), cols)]
    fig = figures.image_grid(rows, cols, f"suspected label errors, worst first ({len(found)} in all); "
                                         "p: out-of-fold probability of the given label")
    return figures.save(fig, target)


def main(argv=None) -> int:
    prm = params.load()
    design = io.read_json(paths.RECIPE)["design"]
    classes = io.read_json(paths.FEATURES_DIR / "meta.json")["classes"]
    oof = pd.read_csv(paths.OOF_TABLE, keep_default_na=False)
    oof = oof[oof["design"] == design].reset_index(drop=True)
    with tracking.stage_run("label_issues", prm.label_issues.model_dump()) as run:
        found = issues(oof, classes, prm.label_issues.method)
        summary = summarize(found, len(oof), design, prm.label_issues.method, classes)
        io.write_csv(paths.LABEL_ISSUES, found)
        io.write_json(paths.METRICS / "label_issues.json", summary)
        pic = picture(found, prm.label_issues.show, PICTURE)
        if run:
            run.log_metrics({"label_issues": summary["issues"], "label_issue_share": summary["share"]})
            tracking.log_files(run, paths.LABEL_ISSUES, pic)
    print(f"label_issues: {summary['issues']} of {len(oof)} train+val images ({summary['share']:.1%}) look mislabelled "
          f"to the out-of-fold {design} models: " + ", ".join(f"{k} {v}" for k, v in summary["given_to_suggested"].items())
          + f" (list: {paths.LABEL_ISSUES})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
