"""bench.run measures and writes results.json; bench.report renders it. One tiny run of every group but dvc
(synthetic JPEGs, the small CNN at 64 px, fractions of a second per candidate). Benchmarks are not timed tests:
nothing here asserts a speed, only that every number is there and the report reads it back."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is not an installed package

from bench import report, run  # noqa: E402
from pipeline import io  # noqa: E402


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    assert run.main(["--quick", "--synthetic", "--skip", "dvc", "--backbones", "small_cnn", "--sizes", "64",
                     "--seconds", "0.4", "--model-seconds", "0.2", "--out", str(out)]) == 0
    return out


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_input_pipeline_rows_and_ratio(bench_run):
    results = io.read_json(bench_run)
    inp = results["input_pipeline"]
    ours = ["cache + loader", "cache + loader + augment (in loader)", "cache + loader + Augment (in model)"]
    for name in ours:
        assert positive(inp["rows"][name]["images_per_s"]), inp["rows"][name]
    assert inp["loader"] == "pipeline.loader.Batches" and inp["augment_in"] in ("loader", "model")
    assert positive(inp["cache_build"]["images_per_s"]) and inp["cache_build"]["images"] == results["data"]["n_images"]
    goal = next(g for g in results["goals"] if g["name"] == "input_speedup_augmented")
    assert goal["target"] == report.INPUT_SPEEDUP
    if "ImageDataGenerator + augmentation" in inp["rows"]:
        assert positive(inp["rows"]["ImageDataGenerator + augmentation"]["images_per_s"])
        assert positive(inp["ratios"]["speedup_augmented"]) and positive(inp["ratios"]["speedup_no_augmentation"])
        assert goal["value"] == inp["ratios"]["speedup_augmented"] and isinstance(goal["met"], bool)
    else:  # no Keras 2 ImageDataGenerator here: the baseline says why and the goal is not measured
        assert inp["baseline"] and inp["ratios"]["speedup_augmented"] is None and goal["met"] is None


def test_extraction_and_finetune_rows(bench_run):
    results = io.read_json(bench_run)
    [ex] = results["extraction"]
    assert (ex["backbone"], ex["image_size"], ex["precision"]) == ("small_cnn", 64, "float32")
    for key in ("extract_images_per_s", "extract_float32_images_per_s", "in_memory_images_per_s"):
        assert positive(ex[key]), key
    [ft] = results["finetune"]
    for key in ("no_augmentation_images_per_s", "augment_images_per_s", "keras_layers_images_per_s",
                "augment_cost_x", "keras_layers_cost_x"):
        assert positive(ft[key]), key
    assert ft["unfrozen_from"] == "block1_conv"
    assert any(g["name"] == "finetune_augment_cost" and isinstance(g["met"], bool) for g in results["goals"])
    assert "dvc" not in results and "skipped" in results["stage_rss"]
    assert results["machine"]["backend"] and isinstance(results["machine"]["accelerator"], bool)


def test_report_renders_the_json_again(bench_run, capsys):
    png = bench_run.with_suffix(".png")
    assert png.exists()
    png.unlink()
    assert report.main([str(bench_run)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    for part in ("1. input pipeline", "cache + loader + augment (in loader)", "2. extraction", "3. fine-tune",
                 "goals:", f">= {report.INPUT_SPEEDUP:g}x"):
        assert part in text, part
    assert text.count(" met") + text.count("MISSED") + text.count("not measured") >= 2
