"""Ensemble stage: how many bagging members join the refit head, chosen by cross-validation, and the ensemble refit.

For n = 0, 1, ... len(bagging.members), the out-of-fold probabilities of "the head plus the first n members" are the
mean of the head recipe's and those members' (the bagging stage's folds), scored fold by fold; the
one-standard-error rule (`pipeline.selection`) takes the fewest members within one standard error of the best, and
picks the threshold the same way. The chosen members are then refit on bootstrap resamples of all of train+val
and put, with the head, behind their frozen backbones as the image-in model `models/bagging.keras` (mean of the
parts' probabilities, each averaged over its flips; `pipeline.models`). With n = 0 it is the head alone, and
evaluate delivers the head. Writes `metrics/cv_bagging.json` (every count's CV figures and the choice).
"""
from __future__ import annotations

import numpy as np

from pipeline import curves, features, heads, io, lineage, members, models, params, paths, predictions, selection, \
    tracking

NAME = "bagging"


def choose_count(y: np.ndarray, folds: np.ndarray, head: np.ndarray, member_probs: list[np.ndarray]) -> dict:
    """{"counts": {n: scores}, "members": n chosen, ...} from the head's and the members' out-of-fold probabilities."""
    scores = {str(n): selection.fold_scores(y, members.combine([head, *member_probs[:n]]), folds)
              for n in range(len(member_probs) + 1)}
    n = int(selection.one_standard_error(scores, list(scores)))
    rule, threshold, rules = selection.threshold_rule(y, members.combine([head, *member_probs[:n]]), folds)
    return {"chosen_by": selection.RULE, "members": n, "counts": scores, "threshold_rule": rule,
            "threshold": threshold, "threshold_rules": rules}


def deliver(prm: params.Params, chosen: list[int], head_pred: dict, member_oof: list[np.ndarray], result: dict,
            run=None) -> None:
    """Refit the `chosen` members on bootstrap resamples of all of train+val and save the head and them, behind their
    backbones, as `models/bagging.keras`, with their predictions (`head_pred`: the head's prediction file;
    `member_oof`: the chosen members' out-of-fold probabilities, in order; `result`: what `choose_count` found)."""
    p = heads.chosen(prm.head)
    pooled = p.features == "pooled"
    meta = io.read_json(paths.FEATURES_DIR / "meta.json")
    y, folds = head_pred["cv_y"], head_pred["cv_fold"]
    head_model, _ = models.load("head")
    groups = {None: [head_model.get_layer("classifier").get_layer("head")]}  # backbone -> heads, head first
    test, trained = [head_pred["test_prob"]], []
    (paths.PLOTS / "ensemble").mkdir(parents=True, exist_ok=True)  # the members' curves (none when n = 0)
    for m in chosen:
        backbone = members.member_backbone(prm, m)
        root = features.features_dir(backbone)
        x, ty, _ = features.train_val(pooled, root)
        model, history, rows = members.fit(prm, m, p, x, ty, len(meta["classes"]))
        groups.setdefault(backbone, []).append(model)
        test.append(predictions.probabilities(model, features.load_features("test", pooled, root)[0],
                                              flips=heads.flips_of(p)))
        trained.append({"member": m, "backbone": backbone or prm.backbone.name, "unique_rows": int(len(np.unique(rows)))})
        tracking.log_files(run, *curves.save(history, f"ensemble/member_{m}", run, ty[rows]))
    metas = [meta if b is None else io.read_json(features.features_dir(b) / "meta.json") for b in groups]
    parts = [(features.features_model(m, pooled), hs) for m, hs in zip(metas, groups.values())]
    flips = heads.flips_of(p)
    model = models.compose(*parts[0], more=parts[1:], map_flips=flips, name=NAME)
    backbones = [heads.backbone_of(m) for m in metas]
    models.save(model, NAME, models.meta_for(
        NAME, classes=meta["classes"], threshold=result["threshold"], image_size=meta["image_size"],
        backbone=backbones[0], image_flips=[()], map_flips=flips, lineage=lineage.describe("ensemble"),
        parts=["head"] + [members.member_name(m) for m in chosen], members=trained, backbones=backbones,
        design=models.read_meta("head")["design"], trained_on={"splits": ["train", "val"], "rows": int(len(y))}))
    predictions.save(NAME, meta["classes"], (members.combine([head_pred["cv_prob"], *member_oof]), y, folds),
                     (members.combine(test), head_pred["test_y"]))


def main(argv=None) -> int:
    prm = params.load()
    head_pred = predictions.load("head")
    _, _, all_folds = features.train_val(pooled=True)
    used = np.isin(all_folds, prm.cv.folds)
    oof = [predictions.out_of_fold(members.member_name(m), all_folds, prm.cv.folds)[used] for m in prm.bagging.members]
    with tracking.stage_run("ensemble", {"members": list(prm.bagging.members)}) as run:
        result = choose_count(head_pred["cv_y"], head_pred["cv_fold"], head_pred["cv_prob"], oof)
        chosen = list(prm.bagging.members)[:result["members"]]
        deliver(prm, chosen, head_pred, oof[:len(chosen)], result, run)
        io.write_json(paths.METRICS / "cv_bagging.json", result)
        if run:
            run.log_params({"members_chosen": len(chosen)})
            run.log_metrics({f"cv_members_{n}_{k}": s[k] for n, s in result["counts"].items()
                             for k in ("balanced_accuracy_mean", "accuracy_mean")})
            tracking.log_files(run, models.meta_path(NAME), paths.METRICS / "cv_bagging.json")
    for n, s in result["counts"].items():
        print(f"ensemble head + {n} members{' *' if int(n) == len(chosen) else '  '} CV balanced accuracy "
              f"{s['balanced_accuracy_mean']:.4f} ± {s['balanced_accuracy_sd']:.4f} (SE {s['balanced_accuracy_se']:.4f}), "
              f"accuracy {s['accuracy_mean']:.4f}")
    print(f"ensemble: the head and {len(chosen)} bagging member(s) by the one-standard-error rule -> {models.path(NAME)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
