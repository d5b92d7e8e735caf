"""CV stage, one DVC stage instance per head design and fold (`cv@<design>-<fold>`): the design trained on the
train+val rows of every other fold and scored on fold k's rows, which it never saw.

A tenth of the training rows is held back for early stopping (the epoch with the best loss there is recorded: the
refit trains that many epochs); the fold's held-out rows decide nothing inside the stage. It writes the held-out
probabilities (`data/cv/designs/<design>/fold_<k>.npz`) and the learning curves; the choose stage puts the folds together.
No test row is read.
"""
from __future__ import annotations

import argparse

from pipeline import curves, features, heads, io, models, params, paths, predictions, tracking


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.cv")
    ap.add_argument("--design", required=True, help="one of head.designs")
    ap.add_argument("--fold", type=int, required=True, help="one of cv.folds")
    args = ap.parse_args(argv)
    prm = params.load()
    if args.design not in prm.head.designs:
        raise SystemExit(f"design {args.design!r} is not in head.designs {list(prm.head.designs)} of params.yaml")
    p = heads.recipe(prm.head, args.design)
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    x, y, folds = features.train_val(pooled=p.features == "pooled")
    train_rows, held = features.fold_rows(folds, args.fold)
    name = f"{args.design}/fold_{args.fold}"
    with tracking.stage_run(f"cv@{args.design}-{args.fold}", {"head": p.model_dump(), "fold": args.fold}) as run:
        prob, history, n_fit = heads.cross_fit(x, y, train_rows, held, len(meta["classes"]), p, prm.seed + args.fold)
        best = int(history.loc[history["val_loss"].idxmin(), "epoch"])
        predictions.save_fold(f"designs/{args.design}", args.fold, prob, held, best_epoch=best, n_train=n_fit)
        tracking.log_files(run, *curves.save(history, f"cv/{name}", run, y[train_rows]))
        accuracy = float((models.labels(prob) == y[held]).mean())
        if run:
            run.log_metrics({"accuracy": accuracy, "best_epoch": best})
    print(f"cv {args.design} fold {args.fold}: accuracy {accuracy:.4f} on {len(held)} held-out rows "
          f"(trained on {n_fit}, best epoch {best} of {len(history)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
