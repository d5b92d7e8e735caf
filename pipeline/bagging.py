"""Bagging stage, one DVC stage instance per member and fold (`bagging@<member>-<fold>`): a member of the chosen
recipe trained on a bootstrap resample of the rows of every other fold, scored on fold k's rows.

Member i trains on the features of `bagging.backbones[i % len]` (`backbone.name` when the list is empty): diversity
from seeds, resamples and backbones. It trains for the recipe's epoch count, as its refit will, so these folds
measure what the ensemble stage delivers: the head plus the first n members, n chosen by cross-validation.
Writes `data/cv/bagging/member_<i>/fold_<k>.npz` and the learning curves. No test row is read.
"""
from __future__ import annotations

import argparse

from pipeline import curves, features, heads, io, members, models, params, predictions, tracking


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bagging")
    ap.add_argument("--member", type=int, required=True, help="the member's seed (one of bagging.members)")
    ap.add_argument("--fold", type=int, required=True, help="one of cv.folds")
    args = ap.parse_args(argv)
    prm = params.load()
    root = features.features_dir(members.member_backbone(prm, args.member))
    meta = io.read_json(root / "meta.json")
    p = heads.chosen(prm.head)
    x, y, folds = features.train_val(pooled=p.features == "pooled", root=root)
    train_rows, held = features.fold_rows(folds, args.fold)
    name = members.member_name(args.member)
    section = {"head": p.model_dump(), "sample_fraction": prm.bagging.sample_fraction, "member": args.member,
               "fold": args.fold, "backbone": meta["name"]}
    with tracking.stage_run(f"bagging@{args.member}-{args.fold}", section) as run:
        model, history, rows = members.fit(prm, args.member, p, x[train_rows], y[train_rows], len(meta["classes"]),
                                           fold=args.fold)
        prob = predictions.probabilities(model, x[held], flips=heads.flips_of(p))
        predictions.save_fold(name, args.fold, prob, held)
        accuracy = float((models.labels(prob) == y[held]).mean())
        tracking.log_files(run, *curves.save(history, f"cv/{name}/fold_{args.fold}", run, y[train_rows][rows]))
        if run:
            run.log_metrics({"accuracy": accuracy})
    print(f"bagging member {args.member} fold {args.fold} ({meta['label']}): accuracy {accuracy:.4f} on {len(held)} "
          f"held-out rows, {p.epochs} epochs on a resample of {len(train_rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
