"""Cache stage: every image decoded once to RGB uint8 at image_size, aligned row by row with the split table."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_image, run_stages, set_params
from pipeline import cache, images, io, paths


def test_modes_become_rgb(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (200, 40, 10)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=95)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)]), "RGBA").save(rgba)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    palette = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P").save(palette)
    gray = tmp_path / "l.png"
    Image.fromarray(rgb[..., 0]).save(gray)
    for f in (cmyk, rgba, sixteen, palette, gray):
        a = images.load_rgb(str(f), 16)
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8, f.name
    assert abs(int(images.load_rgb(str(cmyk), 16)[8, 2, 0]) - 200) < 12  # red survives the CMYK round trip
    assert images.load_rgb(str(rgba), 16)[8, 2].tolist() == [200, 40, 10]  # alpha dropped, colour kept
    s = images.load_rgb(str(sixteen), 16)
    assert s.max() > 200 and (s[..., 0] == s[..., 1]).all()  # 16-bit range scaled into 8 bits, gray
    assert images.load_rgb(str(gray), 16)[8, 2].tolist() == [200, 200, 200]


def test_stage_aligns_rows_and_skips_bad_files(project):
    rng = np.random.default_rng(5)
    root = project.parent / "images"
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG not really")
    make_image(root / "dogs" / "tiny.png", 1, rng, size=1)  # 1x1: below validate.min_side
    run_stages("split", "validate", "cache")
    report = io.read_json(paths.VALIDATE_REPORT)
    assert {p.rsplit("/", 1)[-1] for p in report["skipped"]} == {"broken.png", "tiny.png"}
    table = pd.read_csv(paths.SPLIT_TABLE, keep_default_na=False)
    index = pd.read_csv(paths.CACHE_DIR / "index.csv")
    assert not index["path"].str.contains("broken|tiny").any()
    assert io.read_json(paths.CACHE_DIR / "meta.json") == {"image_size": 48, "classes": ["cats", "dogs"]}
    for split in paths.SPLITS:
        x, y = io.load_pair(paths.CACHE_DIR / split)
        rows = table[(table["split"] == split) & ~table["path"].isin(report["skipped"])]
        assert x.shape == (len(rows), 48, 48, 3) and x.dtype == np.uint8
        assert y.tolist() == rows["label"].tolist()
        assert index.loc[index["split"] == split, "path"].tolist() == rows["path"].tolist()
        # row i holds the i-th file of the split: the toy classes are bright on opposite halves
        left, right = x[:, :, :24].mean((1, 2, 3)), x[:, :, 24:].mean((1, 2, 3))
        assert ((left > right) == (y == 0)).all()


def test_undecodable_with_fail_stops_before_cache(project):
    (project.parent / "images" / "cats" / "zero.png").write_bytes(b"")
    set_params({"validate": {"on_undecodable": "fail"}})
    run_stages("split")
    from pipeline import validate

    assert validate.main([]) != 0
    assert "zero.png" in paths.VALIDATE_SUMMARY.read_text()
    assert not (paths.CACHE_DIR / "train_x.npy").exists()


def test_unreadable_file_named_in_the_error(tmp_path):
    bad = tmp_path / "gone.png"
    with pytest.raises(RuntimeError, match="gone.png"):
        cache._load(str(bad), 8)
