"""The report page: written by evaluate, static and offline, rendered in a real headless Chromium."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import MEMBERS, ROOT, run_stages
from pipeline import models, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = ROOT / "test-output"


def test_gallery_picks_confident_errors_and_unsure_hits():
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.9, 0.6, 0.1, 0.45, 0.2, 0.99])  # P(class 1)
    chosen = report.pick(y, prob, 0.5, 2, per_class=2)
    assert chosen["wrong"][0].tolist() == [0, 1] and chosen["wrong"][1].tolist() == [4, 3]
    assert chosen["unsure"][0].tolist() == [2] and chosen["unsure"][1].tolist() == [5]
    assert report.overlay_rows(y, prob, 0.5, 2, per_class=1).tolist() == [0, 2, 4, 5]


def test_grad_cam_lights_up_the_spot_that_decides():
    """Class 1 holds one bright 2x2 spot at a random place (a crack somewhere in a cell), class 0 none: for the
    class-1 images the head gets right, the Grad-CAM map peaks on the spot."""
    import keras

    from pipeline import heads
    from pipeline.params import Head

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (320, 10, 10, 4)).astype(np.float32)
    y = np.arange(320) % 2
    spots = {}
    for i in np.where(y == 1)[0]:
        spots[i] = r, c = rng.integers(0, 9, 2)
        x[i, r:r + 2, c:c + 2, :] += 2.5
    p = heads.recipe(Head(conv_filters=8, conv_layers=2, epochs=25, batch_size=32, learning_rate=0.01, patience=25),
                     "map_hv")
    classifier, _ = heads.train_head((x[:240], y[:240]), (x[240:], y[240:]), 2, p, seed=0, verbose=0)
    inputs = keras.Input((10, 10, 4))
    features = keras.Model(inputs, keras.layers.Identity()(inputs), name="features")  # the "image" is the map
    model = models.compose(features, [classifier], map_flips=models.flip_axes(p))
    test = np.arange(240, 320)
    hits = test[(y[test] == 1) & (models.predict(model, x[test]) >= 0.5)]
    assert len(hits) >= 30
    cams = report.grad_cam(model, x[hits], np.ones(len(hits), int))  # the class the head predicted
    assert cams.shape == (len(hits), 10, 10) and cams.min() >= 0 and np.allclose(cams.max((1, 2)), 1)
    peaks = [np.unravel_index(np.argmax(c), c.shape) for c in cams]
    near = [abs(pr - (spots[i][0] + 0.5)) <= 1.5 and abs(pc - (spots[i][1] + 0.5)) <= 1.5
            for (pr, pc), i in zip(peaks, hits)]
    assert np.mean(near) >= 0.8, np.mean(near)


def render(page: Path, screenshot: Path) -> dict:
    """Open the page in headless Chromium: every request it makes, whether every image loaded, a screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        requests = []
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto(page.resolve().as_uri(), wait_until="load")
        images = tab.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        title, text = tab.title(), tab.inner_text("body")
        tab.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"requests": requests, "images": images, "title": title, "text": text}


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Chromium is not installed (`apt-get install chromium`; `.ci/run` does it)")
def test_evaluate_writes_a_page_that_renders_offline(trained_copy):
    run_stages("finetune", *MEMBERS, "ensemble", "evaluate")
    page = trained_copy / report.REPORT
    assert page.exists() and "http://" not in page.read_text() and "https://" not in page.read_text()
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "report-tiny.png"
    seen = render(page, shot)
    print(f"report screenshot: {shot}")
    assert seen["title"] == "transfer-pipeline report"
    assert [u for u in seen["requests"] if not u.startswith(("file://", "data:"))] == []  # nothing leaves
    assert len(seen["images"]) == 7 and all(done and width > 0 for done, width in seen["images"]), seen["images"]
    for words in ("Delivered:", "Training curves: diagnosis", "cv/", "/fold_0", "CV balanced accuracy", "error gallery",
                  "Grad-CAM"):
        assert words in seen["text"], words
    assert shot.stat().st_size > 50_000
    assert report.main([]) == 0
