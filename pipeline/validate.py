"""Validate stage: check `data/split.csv` with Great Expectations before anything is cached or trained.

Two expectation suites run on the split table. `rows` checks every row: known classes whose label matches,
no nulls, known splits, unique paths, decodable images with both sides >= `validate.min_side`. Files failing the
last two are skipped (listed in the report; the cache stage leaves them out) or fail the stage
(`validate.on_undecodable`). `dataset` checks the kept rows as a whole: an exact duplicate (same sha256) never
straddles two splits or two classes, nor does a near-copy group (`near_copy`, from the split stage) straddle two
splits, every class is in every used split, each class's share of a split stays
within `validate.share_gap` (plus two images' worth) of its share of all splits together, and duplicate images are
reported or fail (`validate.duplicates`). A rare class is data, not an error: the natural shares are reported
(`class_shares`), and class weights and thresholds deal with them; shares that differ between splits beyond what a
stratified split allows mean the split is broken. Tolerated failures
run at GX severity "warning"; a "critical" failure fails the stage, which still writes its report first.
"""
from __future__ import annotations

import logging
import sys

import pandas as pd

from pipeline import inventory, io, params, paths, tracking

SPLIT_VALUES = (*paths.SPLITS, "unused", "excluded")
NOT_NULL = ("path", "class_name", "label", "split", "decodable")
REQUIRED = (*NOT_NULL, "sha256", "width", "height")
INDEX_COLUMNS = ["path", "split", "class_name"]  # GX names each unexpected row by these
SHARE_COLUMNS = ["class_share", "overall_share"]  # ... and a class share row by these too
SHOW, LIST = 5, 50  # files quoted per expectation in its details, files listed on the console


def _suites(p: params.Validate, classes: list[str], used: list[str]):
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    tolerated = "warning" if p.on_undecodable == "skip" else "critical"
    decoded = Column("decodable") == True  # noqa: E712 - builds a GX row condition
    rows = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in NOT_NULL] + [
        gxe.ExpectColumnValuesToBeInSet(column="class_name", value_set=classes),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(len(classes)))),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="label", column_B="class_label",
                                            ignore_row_if="either_value_is_missing"),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLIT_VALUES)),
        gxe.ExpectColumnValuesToBeUnique(column="path"),
        gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], severity=tolerated),
        *(gxe.ExpectColumnValuesToBeBetween(column=side, min_value=p.min_side, row_condition=decoded,
                                            severity=tolerated) for side in ("width", "height"))]
    dataset = [gxe.ExpectColumnValuesToNotBeNull(column="sha256"),
               gxe.ExpectColumnValuesToBeInSet(column="splits_per_sha256", value_set=[1]),
               gxe.ExpectColumnValuesToBeInSet(column="classes_per_sha256", value_set=[1]),
               gxe.ExpectColumnValuesToBeUnique(column="sha256",
                                                severity="critical" if p.duplicates == "fail" else "warning"),
               gxe.ExpectColumnValuesToBeInSet(column="splits_per_near_copy", value_set=[1],
                                               severity="critical" if p.duplicates == "fail" else "warning")]
    for split in used:
        here = Column("split") == split
        dataset += [gxe.ExpectColumnDistinctValuesToContainSet(column="class_name", value_set=classes,
                                                               row_condition=here),
                    gxe.ExpectColumnValuesToBeBetween(column="share_excess", max_value=0.0, row_condition=here)]
    return rows, dataset


def _run(frame: pd.DataFrame, name: str, expectations: list, index: list[str] = INDEX_COLUMNS) -> list[dict]:
    """Validate `frame` against the expectations; one report entry each, in the order given."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (context.data_sources.add_pandas(name).add_dataframe_asset("split_table")
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame}))
    for i, e in enumerate(expectations):
        e.meta = {"order": i, "where": repr(e.row_condition) if e.row_condition else ""}
    result = batch.validate(gx.ExpectationSuite(name=name, expectations=expectations),
                            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index})
    return [_entry(r) for r in sorted(result.results, key=lambda r: r.expectation_config.meta["order"])]


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + "…"


def _entry(r) -> dict:
    config, res = r.expectation_config, r.result or {}
    column = config.kwargs.get("column") or f"{config.kwargs['column_A']} = {config.kwargs['column_B']}"
    bad = res.get("unexpected_index_list") or []
    if r.exception_info.get("raised_exception"):
        details = f"error: {r.exception_info.get('exception_message')}"
    elif column == "share_excess":
        details = ", ".join(sorted({f"{d['class_name']} {d['class_share']:.3f} here, {d['overall_share']:.3f} overall"
                                    for d in bad}))
    elif bad:
        details = f"{len(bad)} of {res['element_count']} rows: " + "; ".join(
            f"{d['path']} ({d['split']}/{d['class_name']}" + "".join(f", {k}={_short(v)}" for k, v in d.items()
                                                                     if k not in INDEX_COLUMNS + SHARE_COLUMNS) + ")"
            for d in bad[:SHOW]) + ("; …" if len(bad) > SHOW else "")
    else:
        details = f"missing {res['partial_missing_list']}" if res.get("partial_missing_list") else ""
    return {"expectation": config.type, "column": column, "where": config.meta["where"], "success": bool(r.success),
            "severity": str(getattr(config.severity, "value", config.severity)),
            "details": details, "files": [] if column == "share_excess" else [d["path"] for d in bad]}


def validate(table: pd.DataFrame, p: params.Validate, classes: list[str]) -> dict:
    """Check the split table; return the report (see docs/CONTRACTS.md). Raises ValueError on missing columns."""
    missing = [c for c in REQUIRED if c not in table]
    if missing:
        raise ValueError(f"missing columns {missing}: rerun the split stage")
    t = table.copy()
    for c in ("path", "class_name", "sha256", "split"):
        t[c] = t[c].where(t[c].notna() & (t[c].astype(str) != ""), None)
    t["class_label"] = t["class_name"].map({c: i for i, c in enumerate(classes)})
    used = ["train", *(s for s in paths.SPLITS[1:] if (t["split"] == s).any())]
    rows, dataset = _suites(p, classes, used)
    entries = _run(t, "rows", rows)

    reasons = {}  # files that fail to decode or are too small: skipped, or failing the stage
    for e in (e for e in entries if e["column"] in ("decodable", "width", "height") and not e["success"]):
        for path in filter(None, e["files"]):
            r = t.loc[t["path"] == path].iloc[0]
            error = r["error"] if isinstance(r.get("error"), str) and r["error"] else "no error recorded"
            if error.startswith(inventory.OUTSIDE_ROOT):  # not read at all: say so, not "undecodable"
                reasons.setdefault(path, error)
            reasons.setdefault(path, f"undecodable: {error}" if e["column"] == "decodable" else
                               f"{r['width']}x{r['height']} px, below validate.min_side {p.min_side}")
    kept = t[~t["path"].isin(list(reasons))].copy()
    by_sha = kept.groupby("sha256")
    kept["splits_per_sha256"] = by_sha["split"].transform("nunique")
    kept["classes_per_sha256"] = by_sha["class_name"].transform("nunique")
    near = kept["near_copy"].where(kept["near_copy"].astype(str) != "") if "near_copy" in kept else \
        pd.Series(None, index=kept.index, dtype=object)
    kept["splits_per_near_copy"] = kept.groupby(near)["split"].transform("nunique").fillna(1).astype(int)
    kept["class_share"] = (kept.groupby(["split", "class_name"])["path"].transform("size")
                           / kept.groupby("split")["path"].transform("size"))
    shares = class_shares(kept, classes)
    split_size = kept.groupby("split")["path"].transform("size")
    kept["overall_share"] = kept["class_name"].map(shares["all"])
    kept["share_excess"] = ((kept["class_share"] - kept["overall_share"]).abs()  # two images' worth is rounding
                            - p.share_gap - 2 / split_size)
    entries += _run(kept, "dataset", dataset, INDEX_COLUMNS + SHARE_COLUMNS)

    dup_files = next(e["files"] for e in entries if e["column"] == "sha256" and e["expectation"].endswith("unique"))
    duplicates = sorted(sorted(g.dropna()) for _, g in kept[kept["path"].isin(dup_files)].groupby("sha256")["path"])
    return {"success": all(e["success"] or e["severity"] != "critical" for e in entries),
            "skipped": sorted(reasons) if p.on_undecodable == "skip" else [], "reasons": reasons,
            "duplicates": duplicates, "near_copies": near_copy_groups(kept, near), "expectations": entries,
            "n_images": len(t), "n_kept": len(kept),
            "counts": {s: {c: int(((kept["split"] == s) & (kept["class_name"] == c)).sum()) for c in classes}
                       for s in SPLIT_VALUES if (kept["split"] == s).any()},
            "class_shares": shares,
            "params": p.model_dump(mode="json")}


def near_copy_groups(kept: pd.DataFrame, near: pd.Series) -> list[dict]:
    """Every near-copy group (`split.near_copy_bits`): its files, the splits and classes they are in."""
    return [{"files": sorted(g["path"]), "splits": sorted(set(g["split"])), "classes": sorted(set(g["class_name"]))}
            for _, g in kept.groupby(near, sort=True)]


def class_shares(kept: pd.DataFrame, classes: list[str]) -> dict:
    """{split or "all": {class: share}} over the kept rows of the used splits (train, val, test)."""
    used = kept[kept["split"].isin(paths.SPLITS)]
    out = {"all": {c: float((used["class_name"] == c).mean()) if len(used) else 0.0 for c in classes}}
    for s in paths.SPLITS:
        here = used[used["split"] == s]
        if len(here):
            out[s] = {c: float((here["class_name"] == c).mean()) for c in classes}
    return out


def _sign(e: dict) -> str:
    return "✓" if e["success"] else "✗" if e["severity"] == "critical" else "⚠"


def summary_md(report: dict) -> str:
    """A short human summary: the expectations met or not, the files left out and the duplicate groups."""
    def cell(v):
        return str(v).replace("|", "\\|")
    left_out = "skipped" if report["params"]["on_undecodable"] == "skip" else "rejected"
    lines = [f"# Validate: {'passed' if report['success'] else 'FAILED'}", "",
             f"{report['n_images']} images, {report['n_kept']} kept, {len(report['reasons'])} {left_out} (undecodable "
             f"or too small), {len(report['duplicates'])} duplicate groups.", "",
             "✓ met, ✗ failed, ⚠ failed but tolerated (GX severity warning).",
             "", "| | expectation | column | where | details |", "|---|---|---|---|---|"]
    lines += [f"| {_sign(e)} | {e['expectation']} | {cell(e['column'])} | {cell(e['where'])} | {cell(e['details'])} |"
              for e in report["expectations"]]
    shares = report.get("class_shares") or {}
    if shares:
        classes = list(shares["all"])
        lines += ["", "## Class shares (a rare class is data: class weights and thresholds handle it)", "",
                  "| split | " + " | ".join(cell(c) for c in classes) + " |", "|---|" + "---|" * len(classes)]
        lines += [f"| {s} | " + " | ".join(f"{v[c]:.3f}" for c in classes) + " |" for s, v in shares.items()]
    if report["reasons"]:
        lines += ["", f"## Files {left_out}", "", "| file | reason |", "|---|---|"]
        lines += [f"| {cell(path)} | {cell(why)} |" for path, why in sorted(report["reasons"].items())]
    if report["duplicates"]:
        lines += ["", "## Duplicate images (same sha256)", ""]
        lines += [f"- {cell(', '.join(g))}" for g in report["duplicates"]]
    near = report.get("near_copies") or []
    if near:
        mixed = sum(len(g["classes"]) > 1 for g in near)
        lines += ["", f"## Near-copies (perceptual hash under flips and 90° turns): {len(near)} groups, "
                  f"{sum(len(g['files']) for g in near)} images, {mixed} with more than one class", "",
                  "| files | splits | classes |", "|---|---|---|"]
        lines += [f"| {cell(', '.join(g['files']))} | {', '.join(g['splits'])} | {cell(', '.join(g['classes']))} |"
                  for g in near]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = params.load().validate_
    for f in (paths.SPLIT_TABLE, paths.SPLIT_SUMMARY):
        if not f.exists():
            print(f"validate: {f} not found: run the split stage first (`dvc repro split`)", file=sys.stderr)
            return 1
    blank_is_null = {c: [""] for c in REQUIRED}  # a blank label or path is a null; a blank `error` stays ""
    table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False, na_values=blank_is_null)
    try:
        report = validate(table, p, io.read_json(paths.SPLIT_SUMMARY)["classes"])
    except ValueError as e:
        print(f"validate: {paths.SPLIT_TABLE}: {e}", file=sys.stderr)
        return 1
    with tracking.stage_run("validate", p.model_dump()) as run:
        io.write_json(paths.VALIDATE_REPORT, report)
        io.write_text(paths.VALIDATE_SUMMARY, summary_md(report))
        if run:
            run.log_metrics({"n_images": report["n_images"], "n_kept": report["n_kept"],
                             "n_skipped": len(report["skipped"]), "n_duplicate_groups": len(report["duplicates"]),
                             "n_near_copy_groups": len(report["near_copies"]),
                             "success": float(report["success"])})
            tracking.log_files(run, paths.VALIDATE_REPORT, paths.VALIDATE_SUMMARY)
            if not report["success"]:
                tracking.fail(run)
    met = sum(e["success"] for e in report["expectations"])
    print(f"validate: {'passed' if report['success'] else 'FAILED'}, {met}/{len(report['expectations'])} expectations "
          f"met; {report['n_kept']}/{report['n_images']} images kept, {len(report['skipped'])} skipped, "
          f"{len(report['duplicates'])} duplicate groups, {len(report['near_copies'])} near-copy groups "
          f"(see {paths.VALIDATE_SUMMARY})")
    for path in report["skipped"][:LIST]:
        print(f"  skipped {path}: {report['reasons'][path]}")
    if len(report["skipped"]) > LIST:
        print(f"  and {len(report['skipped']) - LIST} more skipped files, listed in {paths.VALIDATE_REPORT}")
    if report["success"]:
        return 0
    print(f"validate: {paths.SPLIT_TABLE} cannot be trusted; the full report is in {paths.VALIDATE_REPORT}",
          file=sys.stderr)
    for e in (e for e in report["expectations"] if _sign(e) == "✗"):
        where = f" where {e['where']}" if e["where"] else ""
        print(f"  ✗ {e['expectation']} on {e['column']}{where}: {e['details']}", file=sys.stderr)
        more = e["files"][SHOW:]
        print("".join(f"      also {path}\n" for path in more[:LIST]), end="", file=sys.stderr)
        if len(more) > LIST:
            print(f"      and {len(more) - LIST} more files, listed in {paths.VALIDATE_REPORT}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
