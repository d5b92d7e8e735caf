"""The benchmark report: a `bench/results.json` written by `bench.run` as a printed table, the goals (met or
MISSED) and a chart of the ratios, `results.png` next to the JSON.

`bench.run` calls `show` when it has measured; to render a results file again without measuring anything:

    python -m bench.report [bench/results.json]

Only the standard library, `pipeline.io` and `pipeline.figures` (matplotlib, for the chart) are needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline import figures, io

DEFAULT = Path(__file__).resolve().parent / "results.json"
# The input pipeline with augmentation, where the finetune stage augments by default, against
# ImageDataGenerator with the seeds' augmentation: at least this many times faster.
INPUT_SPEEDUP = 20.0
# A fine-tune step with `augment.Augment` in the model: at most this many times the step without augmentation.
FINETUNE_COST = 2.0


def fmt(x, unit: str = "", digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}{unit}"


# ------------------------------------------------------------------------------------------------- goals

def goals(results: dict) -> list[dict]:
    """[{name, goal, value, target, met}] for the groups in `results`; met is None when a value is missing."""
    out = []
    inp = results.get("input_pipeline")
    if inp:
        v = inp["ratios"]["speedup_augmented"]
        out.append({"name": "input_speedup_augmented", "value": v, "target": INPUT_SPEEDUP,
                    "goal": f"input pipeline, augmented in the {inp['augment_in']} >= {INPUT_SPEEDUP:g}x "
                            "ImageDataGenerator + augmentation",
                    "met": None if v is None else v >= INPUT_SPEEDUP})
    for f in results.get("finetune") or []:
        v = f["augment_cost_x"]
        out.append({"name": "finetune_augment_cost", "value": v, "target": FINETUNE_COST,
                    "goal": f"fine-tune step with Augment <= {FINETUNE_COST:g}x plain "
                            f"({f['backbone']} {f['image_size']}px {f['precision']})",
                    "met": None if v is None else v <= FINETUNE_COST})
    return out


# ------------------------------------------------------------------------------------------------- table

def header(results: dict) -> list[str]:
    m, d = results["machine"], results["data"]
    return [f"bench {results['date']}  |  {m['platform']}  |  {m['cpus_usable']} CPUs  |  keras {m['keras']} on "
            f"{m['backend']} {m.get('backend_version', '')} ({m['kind']}: {', '.join(m['devices']) or '-'})",
            f"data: {d['source']} ({d['n_images']} train images, mean {d['mean_jpeg_kib']} KiB JPEG)  |  "
            f"load average at start/end: {results['loadavg_start']} / {results.get('loadavg_end')}"]


def input_lines(inp: dict) -> list[str]:
    cb, r = inp["cache_build"], inp["ratios"]
    lines = [f"1. input pipeline, {inp['image_size']} px, batch {inp['batch_size']} (images/s)",
             f"   one-off cache build: {cb['images']} images in {cb['decode_resize_s'] + cb['save_s']:.1f} s "
             f"({fmt(cb['images_per_s'])} images/s, {cb['how']})"]
    for k, v in inp["rows"].items():
        lines.append(f"   {k:45s} {fmt(v['images_per_s']):>10}" + (f"  failed: {v['error']}" if "error" in v else ""))
    lines += [f"   speedup over ImageDataGenerator: plain {fmt(r['speedup_no_augmentation'], 'x')}, augmented in the "
              f"loader {fmt(r['speedup_augmented_in_loader'], 'x')}, in the model "
              f"{fmt(r['speedup_augmented_in_model'], 'x')}",
              f"   the goal reads the {inp['augment_in']} (the finetune stage's `augment_in: auto` here): "
              f"{fmt(r['speedup_augmented'], 'x')} (goal >= {INPUT_SPEEDUP:g}x)",
              f"   loader: {inp['loader']}; baseline: {inp['baseline']}"]
    return lines


def extraction_lines(ex: list[dict]) -> list[str]:
    lines = ["2. extraction (images/s): extract = the extract stage's `extract.extract` over the mmap cache, "
             "features stored as float16 (the stage's default) or float32; ceiling = predict_on_batch on the same "
             "batches in memory",
             f"   {'backbone':20s} {'size':>4} {'precision':16s} {'extract':>9} {'overhead':>9} "
             f"{'f32':>9} {'overhead':>9} {'ceiling':>9}"]
    for e in ex:
        lines.append(f"   {e['backbone']:20s} {e['image_size']:>4} {e['precision']:16s} "
                     f"{fmt(e['extract_images_per_s']):>9} {fmt(e['overhead_pct'], ' %'):>9} "
                     f"{fmt(e['extract_float32_images_per_s']):>9} {fmt(e['overhead_float32_pct'], ' %'):>9} "
                     f"{fmt(e['in_memory_images_per_s']):>9}")
    for e in ex:
        if e["features_below_float16_normal"] > 0.01:
            lines.append(f"   note: {e['features_below_float16_normal']:.0%} of {e['backbone']}'s random-weight "
                         "features are below float16's smallest normal number; numpy converts those ~40x slower, "
                         "which inflates the float16 overhead (not so with real weights)")
    return lines


def finetune_lines(ft: list[dict]) -> list[str]:
    lines = ["3. fine-tune train_on_batch (images/s); cost = step time / step time without augmentation",
             f"   {'backbone':20s} {'size':>4} {'precision':16s} {'none':>8} {'Augment':>8} {'cost':>6} "
             f"{'Keras':>8} {'cost':>6}"]
    for f in ft:
        lines.append(f"   {f['backbone']:20s} {f['image_size']:>4} {f['precision']:16s} "
                     f"{fmt(f['no_augmentation_images_per_s']):>8} {fmt(f['augment_images_per_s']):>8} "
                     f"{fmt(f['augment_cost_x'], 'x', 2):>6} {fmt(f['keras_layers_images_per_s']):>8} "
                     f"{fmt(f['keras_layers_cost_x'], 'x', 2):>6}")
    lines.append(f"   goal: Augment cost <= {FINETUNE_COST:g}x; Keras = RandomRotation+RandomZoom+RandomTranslation+"
                 "RandomFlip")
    return lines


def dvc_lines(d: dict, rss: dict | None) -> list[str]:
    lines = []
    if d:
        lines.append("4. dvc: " + (f"skipped: {d['skipped']}" if "skipped" in d else
                                   f"`dvc status` {d['status_s']} s, no-op `dvc repro` {d['repro_s']} s"))
        if "skipped" in d and "status_s" in d:
            lines.append(f"   (`dvc status` itself took {d['status_s']} s)")
    if rss and "skipped" in rss:
        lines.append(f"5. peak RSS per stage: {rss['skipped']}")
    elif rss:
        lines.append("5. peak RSS per stage (dvc repro -f -s):")
        for k, v in rss.items():
            if not k.startswith("_"):
                lines.append(f"   {k:20s} " + (f"{v['peak_rss_mib']:>8.0f} MiB  {v['seconds']:>6.0f} s  rc {v['rc']}"
                                                 if "peak_rss_mib" in v else f"error: {v['error']}"))
    return lines


def export_lines(e: dict | None) -> list[str]:
    """Latency per image of the delivered model in each format (group 6)."""
    if not e:
        return []
    if e.get("skipped"):
        return [f"exports: skipped ({e['skipped']})"]
    lines = [f"exports of {e['model']} ({e['image_size']} px), one image per call:"]
    for k, ms in e["ms_per_image"].items():
        size = e["bytes"].get(k.rsplit("_", 1)[0] if k.startswith("tflite") else k)
        speed = e["speedup_vs_keras"].get(k)
        lines.append(f"   {k:22s} {fmt(ms, ' ms', 1):>10}  {fmt(size and size / 2**20, ' MiB', 2):>10}"
                     + (f"  {fmt(speed, 'x', 2):>7} vs keras" if speed else ""))
    return lines


def table(results: dict) -> str:
    """The whole report as text: header, one block per group measured, then the goals."""
    blocks = [header(results)]
    if results.get("input_pipeline"):
        blocks.append(input_lines(results["input_pipeline"]))
    if results.get("extraction"):
        blocks.append(extraction_lines(results["extraction"]))
    if results.get("finetune"):
        blocks.append(finetune_lines(results["finetune"]))
    blocks.append(dvc_lines(results.get("dvc"), results.get("stage_rss")))
    blocks.append(export_lines(results.get("exports")))
    marks, listed = {True: "met", False: "MISSED", None: "not measured"}, goals(results)
    width = max((len(g["goal"]) for g in listed), default=0)
    if listed:
        blocks.append(["goals:"] + [f"   {g['goal']:{width}s} {fmt(g['value'], 'x', 2):>8}  {marks[g['met']]}"
                                    for g in listed])
    return "\n\n".join("\n".join(b) for b in blocks if b)


# ------------------------------------------------------------------------------------------------- chart

def bars(results: dict) -> list[tuple[str, float, bool]]:
    """(label, ratio, is a speedup) for every ratio in `results`."""
    out = []
    r = (results.get("input_pipeline") or {}).get("ratios", {})
    for key, label in (("speedup_no_augmentation", "plain"), ("speedup_augmented_in_loader", "augmented in loader"),
                       ("speedup_augmented_in_model", "augmented in model")):
        if r.get(key):
            out.append((f"input: ours / IDG, {label}", r[key], True))
    for e in results.get("extraction") or []:
        if e["extract_images_per_s"] and e["in_memory_images_per_s"]:
            out.append((f"extract {e['backbone']} {e['image_size']} {e['precision']}: ceiling / extract",
                        e["in_memory_images_per_s"] / e["extract_images_per_s"], False))
    for f in results.get("finetune") or []:
        for key, label in (("augment_cost_x", "Augment"), ("keras_layers_cost_x", "Keras layers")):
            if f[key]:
                out.append((f"fine-tune {f['backbone']} {f['image_size']} {f['precision']}: {label} cost", f[key], False))
    return out


def chart(results: dict, path: Path) -> bool:
    """A log-scale bar chart of the ratios, with the goals marked; False when there is nothing (or no matplotlib)."""
    found = bars(results)
    if not found:
        return False
    try:
        plt = figures.pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(found) + 1.5))
    ys = list(range(len(found)))[::-1]
    ax.barh(ys, [b[1] for b in found], color=["tab:green" if b[2] else "tab:orange" for b in found])
    for y, (_, value, _) in zip(ys, found):
        ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
    ax.set_yticks(ys, [b[0] for b in found], fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1, color="k", lw=0.8)
    ax.set_ylim(ys[-1] - 0.6, ys[0] + 1.3)  # room for the goal labels
    for x, text, colour in ((INPUT_SPEEDUP, "input goal", "tab:green"), (FINETUNE_COST, "fine-tune goal", "tab:orange")):
        ax.axvline(x, color=colour, lw=1, ls="--")
        ax.text(x, ys[0] + 0.6, f" {text} {x:g}x", color=colour, fontsize=7, va="bottom")
    ax.set_xlabel("ratio (log scale); green: speedup over ImageDataGenerator, orange: slowdown (lower is better)")
    m = results["machine"]
    where = "accelerator" if m["accelerator"] else f"{m['cpus_usable']} CPU cores"
    data = "synthetic" if results["data"]["synthetic"] else "cats vs dogs photos"
    ax.set_title(f"bench {results['date'][:16]}: keras on {m['backend']}, {where}, data: {data}", fontsize=9)
    fig.tight_layout()
    figures.save(fig, path)
    return True


# -------------------------------------------------------------------------------------------------- main

def show(results: dict, json_path: Path) -> Path | None:
    """Print the table and draw the chart next to `json_path`; the chart's path, or None without one."""
    png = Path(json_path).with_suffix(".png")
    drew = chart(results, png)
    print(table(results), flush=True)
    wall = f" in {results['wall_s']:.0f} s" if "wall_s" in results else ""
    print(f"\n{json_path}" + (f" and {png}" if drew else "") + wall, flush=True)
    return png if drew else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    path = Path(argv[0]) if argv else DEFAULT
    show(io.read_json(path), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
