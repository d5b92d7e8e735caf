"""Throughput benchmarks of the pipeline's own code: `make bench` (= `python -m bench.run`).

This script only measures. It writes the raw numbers, their ratios, the machine and the settings to
`bench/results.json`, then hands that file to `bench.report`, which prints the table and the goals (met or
MISSED) and draws `bench/results.png`. These are benchmarks, not tests: nothing here asserts a timing.

How: each group is measured side by side in one process. A candidate is a function that processes some images
and returns how many; after untimed warm-up calls (compilation) the candidates take turns of a second or two
until each has had its share of time (`--seconds`, `--model-seconds`), so a busy machine slows them alike and
the ratios stay meaningful. Images/s = images / time spent, whole calls only. Every candidate but the baselines
calls the stages' own functions:

1. input pipeline, 150 px, batch 32: the cache build (`cache.cache_split`, decode + resize, timed once), then
   the memory-mapped uint8 cache read by `loader.Batches` (shuffled): plain, augmenting in the loader (OpenCV's
   `warpAffine`, the finetune stage's default on a CPU) and augmenting in the model (`augment.augment_batch`,
   compiled; the default with an accelerator), against Keras 2's `ImageDataGenerator.flow_from_directory` on the
   same photos, plain and with the seeds' augmentation;
2. extraction: `extract.extract` over a slice of the memory-mapped cache (features stored as float16, the
   stage's default, and as float32) against `predict_on_batch` on the same batches held in memory (the ceiling);
3. fine-tune step: `train_on_batch` of `finetune.build` (the top of the base unfrozen, `heads.build`'s head,
   `train.compile_for`) without augmentation, with `augment.Augment` first, and with Keras' own random layers;
4. `dvc status` and a no-op `dvc repro`, only when the pipeline is up to date (otherwise the reason);
6. exports (after `make run`): latency per image, one image per call, of the delivered `.keras` model, its
   SavedModel (`models.export_saved_model`) and the export stage's TFLite float16 and int8 files, on the cache's
   test images, with 1 thread for TFLite as the export stage scores (and all cores), and the ratios to Keras;
5. with --stage-rss (slow: it RERUNS every stage), each stage's peak RSS.

Data: the cats-vs-dogs photos beside the project (`../shared/datasets/cats_vs_dogs_small`, train split, read in
place) or, with --synthetic or when they are absent, as many generated JPEGs of similar sizes. It runs without
TensorFlow (KERAS_BACKEND=jax): the ImageDataGenerator baseline is then skipped, with the reason, unless
tf_keras or keras' legacy copy imports.

    python -m bench.run                  # everything, ~5-10 min on 2 CPU cores
    python -m bench.run --quick          # a smoke run, a minute or two
    python -m bench.report               # the table and the chart again, from bench/results.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bench import report  # noqa: E402
from pipeline import augment, backbones, cache, device, extract, finetune, heads, io, loader, models, params, paths, \
    train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "cats_vs_dogs_small"
CLASSES = ("cats", "dogs")
BATCH = 32
INPUT_SIZE = 150
QUICK_IMAGES = 256
EXTRACT_BATCHES = 8  # one extraction call = this many batches of the cache
# The seeds' augmentation as they gave it to ImageDataGenerator, and the same as params.Augment. Keras 2 read
# shear_range in degrees, so the seeds' 0.2 is a 0.2-degree shear; params.Augment.shear is in radians.
IDG_AUGMENTATION = dict(rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2,
                        zoom_range=0.2, horizontal_flip=True)
SEEDS_RECIPE = dict(rotation=40, width_shift=0.2, height_shift=0.2, shear=round(math.radians(0.2), 6), zoom=0.2,
                    horizontal_flip=True, vertical_flip=False)


# -------------------------------------------------------------------------------------------- measuring

def log(msg: str = "") -> None:
    print(msg, flush=True)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info(dev: device.Device) -> dict:
    """The device the backend computes on (`device.detect()`) plus the host: CPUs, memory, versions."""
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {**dataclasses.asdict(dev), "accelerator": dev.accelerator, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpus_usable": usable_cpus(), "memory_gib": mem}


def loadavg():
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def sync(x) -> None:
    """Wait for a backend result (jax dispatches asynchronously; to-numpy waits for the others)."""
    if hasattr(x, "block_until_ready"):
        x.block_until_ready()
    elif not isinstance(x, np.ndarray):
        keras.ops.convert_to_numpy(x)


@contextlib.contextmanager
def quiet():
    """Hide the progress bar of a stage function that is called over and over (tqdm writes to sys.stderr)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


def compare(candidates: dict, seconds: float, desc: str, warmup: int = 1, min_calls: int = 2,
            turn: float | None = None) -> dict:
    """{name: {images_per_s, images, seconds, calls}} of candidates measured side by side (see the docstring).
    A candidate that fails during its warm-up is reported with its error instead of a rate."""
    rows, ready = {}, {}
    for name, fn in candidates.items():
        try:
            for _ in range(warmup):
                fn()
            ready[name] = fn
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            rows[name] = {"images_per_s": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"{desc}: '{name}' failed and is left out: {rows[name]['error']}")
    turn = turn or max(seconds / 5, 0.25)
    spent, images, calls = ({k: 0 for k in ready} for _ in range(3))

    def done(k):
        return spent[k] >= seconds and calls[k] >= min_calls

    with tqdm(total=round(seconds * len(ready), 1), desc=desc, unit="s", leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s") as bar:
        while not all(done(k) for k in ready):
            for k, fn in ready.items():
                start = time.perf_counter()
                while not done(k):
                    t = time.perf_counter()
                    images[k] += fn()
                    took = time.perf_counter() - t
                    spent[k] += took
                    calls[k] += 1
                    bar.update(min(took, bar.total - bar.n))
                    if time.perf_counter() - start >= turn:
                        break
    for k in ready:
        rows[k] = {"images_per_s": images[k] / spent[k] if spent[k] else None, "images": images[k],
                   "seconds": round(spent[k], 3), "calls": calls[k]}
    return {k: rows[k] for k in candidates}


def ratio(a, b):
    return None if not a or not b else a / b


@contextlib.contextmanager
def policy(name: str):
    """A mixed-precision policy for the models built inside; the Keras session is cleared afterwards."""
    old = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)
        keras.backend.clear_session()


# ------------------------------------------------------------------------------------------------- data

def list_photos(root: Path, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """The JPEGs of root/train/{cats,dogs} (at most limit / 2 of each) and their labels."""
    files, labels = [], []
    for label, cls in enumerate(CLASSES):
        found = sorted(str(p) for p in (root / "train" / cls).glob("*.jpg"))[: limit // len(CLASSES) if limit else None]
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int64)


def make_synthetic(root: Path, per_class: int, seed: int = 0) -> Path:
    """JPEGs like the cats-vs-dogs photos: ~250..500 x 225..500 px, ~40 KB at quality 90 (smooth colour fields
    plus noise), in root/train/{cats,dogs}/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, i in tqdm([(c, i) for c in CLASSES for i in range(per_class)], desc="synthetic JPEGs", leave=False):
        w, h = int(rng.integers(250, 501)), int(rng.integers(225, 501))
        low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        a = np.asarray(low, np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
        path = root / "train" / cls / f"{cls[:-1]}.{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def linked_subset(files: list[str], root: Path) -> Path:
    """root/train/{cats,dogs}/ of symlinks to `files`: ImageDataGenerator reads a folder, give it the same subset."""
    for f in files:
        target = root / "train" / Path(f).parent.name / Path(f).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(f), target)
    return root


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """The cache at another size, resized from the 150-px one (the content does not matter for throughput)."""
    if images.shape[1] == size:
        return np.asarray(images)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def image_data_generator():
    """Keras 2's ImageDataGenerator: tf_keras first, then keras' legacy copy; (class, where) or (None, why)."""
    try:
        import tf_keras
        from tf_keras.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator, f"tf_keras {tf_keras.__version__} (tf_keras.preprocessing.image)"
    except Exception as e:  # noqa: BLE001 - any import problem means: try the next one
        first = f"tf_keras: {type(e).__name__}: {e}"
    try:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator, f"keras {keras.__version__} (keras.src.legacy.preprocessing.image; {first})"
    except Exception as e:  # noqa: BLE001
        return None, f"{first}; keras.src.legacy: {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------- 1. input pipeline

def loader_step(images, labels, augment_params=None, then=None):
    """A candidate: the next batch of `loader.Batches` (reshuffled every epoch), then `then` on it if given."""
    batches = loader.Batches(images, labels, BATCH, shuffle=True, seed=0, augment=augment_params)
    position = iter(())

    def step():
        nonlocal position
        i = next(position, None)
        if i is None:
            batches.on_epoch_end()
            position = iter(range(len(batches)))
            i = next(position)
        x = batches[i][0]
        if then is not None:
            sync(then(x))
        return len(x)

    return step


def compiled_augment(p: params.Augment, seed: int = 0):
    """`augment.augment_batch` compiled as the training step would run it: tf.function on TensorFlow, jax.jit
    with an explicit seed on JAX, eager elsewhere."""
    backend = keras.backend.backend()
    gen = keras.random.SeedGenerator(seed)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: augment.augment_batch(x, p, gen))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda x, s: augment.augment_batch(x, p, s))
        counter = iter(range(seed, 2**31))
        return lambda x: f(jnp.asarray(x), jnp.asarray([next(counter), 0], dtype="uint32"))
    return lambda x: augment.augment_batch(x, p, gen)


def idg_step(IDG, folder: Path, **augmentation):
    """A candidate: the next batch of ImageDataGenerator.flow_from_directory, as the seeds read their photos."""
    batches = IDG(rescale=1 / 255, **augmentation).flow_from_directory(
        str(folder), target_size=(INPUT_SIZE, INPUT_SIZE), batch_size=BATCH, class_mode="binary", shuffle=True,
        seed=0)
    return lambda: len(next(batches)[0])


def bench_input(files, labels, folder: Path, tmp: Path, args, dev: device.Device) -> tuple[dict, np.ndarray]:
    """Group 1: the cache + loader, plain and augmented both ways, against ImageDataGenerator."""
    t = time.perf_counter()
    images = cache.cache_split(files, INPUT_SIZE, usable_cpus(), f"cache build {INPUT_SIZE}px")
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    io.save_npy(tmp / "train_x.npy", images)
    save_s = time.perf_counter() - t
    mmap = io.load_npy(tmp / "train_x.npy", mmap=True)
    p = params.Augment(**SEEDS_RECIPE)
    candidates = {"cache + loader": loader_step(mmap, labels),
                  "cache + loader + augment (in loader)": loader_step(mmap, labels, augment_params=p),
                  "cache + loader + Augment (in model)": loader_step(mmap, labels, then=compiled_augment(p))}
    IDG, baseline = image_data_generator()
    if IDG is None:
        log(f"input pipeline: ImageDataGenerator baseline skipped ({baseline})")
    else:
        candidates["ImageDataGenerator"] = idg_step(IDG, folder)
        candidates["ImageDataGenerator + augmentation"] = idg_step(IDG, folder, **IDG_AUGMENTATION)
    rows = compare(candidates, args.seconds, "input pipeline", warmup=2, min_calls=3, turn=min(2.0, args.seconds / 3))

    def rate(name):
        return rows.get(name, {}).get("images_per_s")

    where = augment.placement("auto", dev.accelerator)  # where the finetune stage augments by default
    in_loader = ratio(rate("cache + loader + augment (in loader)"), rate("ImageDataGenerator + augmentation"))
    in_model = ratio(rate("cache + loader + Augment (in model)"), rate("ImageDataGenerator + augmentation"))
    return {"batch_size": BATCH, "image_size": INPUT_SIZE, "n_images": len(files),
            "cache_build": {"images": len(files), "decode_resize_s": round(decode_s, 2), "save_s": round(save_s, 2),
                            "images_per_s": len(files) / (decode_s + save_s), "how": "pipeline.cache.cache_split",
                            "bytes": (tmp / "train_x.npy").stat().st_size},
            "loader": "pipeline.loader.Batches", "baseline": baseline, "augment_in": where, "rows": rows,
            "ratios": {"speedup_no_augmentation": ratio(rate("cache + loader"), rate("ImageDataGenerator")),
                       "speedup_augmented_in_loader": in_loader, "speedup_augmented_in_model": in_model,
                       "speedup_augmented": in_loader if where == "loader" else in_model}}, images


# ------------------------------------------------------------------------------------------ 2. extraction

def bench_extract(name: str, size: int, prec: str, cache150: np.ndarray, tmp: Path, args) -> dict:
    """Group 2: `extract.extract` over a slice of the memory-mapped cache vs predict_on_batch on the same batches
    held in memory as float32."""
    path = tmp / f"cache_{size}.npy"
    if not path.exists():
        io.save_npy(path, resized(cache150, size))
    images = io.load_npy(path, mmap=True)[:EXTRACT_BATCHES * BATCH]
    n = len(images)
    with policy(prec):
        base = backbones.build_base(name, "none", size)
        in_memory = [np.asarray(images[s:s + BATCH], np.float32) for s in range(0, n, BATCH)]

        def stage(dtype):
            def step():
                with quiet():
                    extract.extract(base, images, BATCH, dtype, desc=f"extract {name}")
                return n
            return step

        def ceiling():
            for batch in in_memory:
                np.asarray(base.predict_on_batch(batch))
            return n

        features = np.asarray(base.predict_on_batch(in_memory[0]), np.float32)
        rows = compare({"extract, float16 features": stage("float16"), "extract, float32 features": stage("float32"),
                        "in-memory": ceiling}, args.model_seconds, f"extract {name} {size}px {prec}",
                       warmup=1, min_calls=args.min_calls)
    f16, f32, hi = (rows[k]["images_per_s"] for k in rows)
    # float16 keeps values down to 6.1e-5 as normal numbers; numpy converts anything smaller ~40x slower. Random
    # weights can shrink the features that far (EfficientNet-Lite0: ~1e-11), real ones do not.
    tiny = float(np.mean((features != 0) & (np.abs(features) < np.finfo(np.float16).tiny)))
    return {"backbone": name, "image_size": size, "precision": prec, "batch_size": BATCH, "images_per_call": n,
            "feature_shape": list(features.shape[1:]), "extract_images_per_s": f16,
            "extract_float32_images_per_s": f32, "in_memory_images_per_s": hi,
            "overhead_pct": None if not f16 or not hi else (hi / f16 - 1) * 100,
            "overhead_float32_pct": None if not f32 or not hi else (hi / f32 - 1) * 100,
            "features_below_float16_normal": round(tiny, 4), "rows": rows}


# ---------------------------------------------------------------------------------------- 3. fine-tuning

def keras_layers_model(base: keras.Model, classifier: keras.Model) -> keras.Model:
    """The comparison candidate: `finetune.build`'s model with Keras' own random layers for the seeds' recipe
    in front (no shear layer in that set; each layer resamples the batch again)."""
    r = SEEDS_RECIPE
    inputs = keras.Input(base.input_shape[1:], name="image")
    x = keras.layers.RandomRotation(r["rotation"] / 360.0, fill_mode="nearest")(inputs)
    x = keras.layers.RandomZoom(r["zoom"], fill_mode="nearest")(x)
    x = keras.layers.RandomTranslation(r["height_shift"], r["width_shift"], fill_mode="nearest")(x)
    x = keras.layers.RandomFlip("horizontal")(x)
    return keras.Model(inputs, classifier(base(x, training=False)), name="finetune_keras_layers")


def bench_finetune(name: str, size: int, prec: str, cache150: np.ndarray, labels: np.ndarray, args) -> dict:
    """Group 3: images/s of `train_on_batch` on the finetune stage's model, with and without augmentation."""
    x = resized(cache150[:BATCH], size).astype(np.float32)
    y = labels[:BATCH].astype(np.float32)
    if len(np.unique(y)) < 2:
        y = (np.arange(len(x)) % 2).astype(np.float32)
    p = params.Finetune(augment=params.Augment(**SEEDS_RECIPE))
    with policy(prec):
        base = backbones.build_base(name, "none", size)
        unfrozen = backbones.unfreeze_from(base, None, name)
        classifier = heads.build(base.output_shape[1:], 2, heads.recipe(params.Head(), "map_h"))
        models = {"no augmentation": finetune.build(base, classifier, p, seed=0, in_model=False),
                  "Augment": finetune.build(base, classifier, p, seed=0, in_model=True),
                  "Keras layers": keras_layers_model(base, classifier)}

        def train_step(model):
            train.compile_for(model, 2, p.learning_rate)

            def step():
                sync(model.train_on_batch(x, y))
                return len(x)
            return step

        rows = compare({k: train_step(m) for k, m in models.items()}, args.model_seconds,
                       f"fine-tune {name} {size}px {prec}", warmup=2, min_calls=args.min_calls)
    plain, ours, theirs = (rows[k]["images_per_s"] for k in models)
    return {"backbone": name, "image_size": size, "precision": prec, "batch_size": len(x),
            "unfrozen_from": unfrozen[0] if unfrozen else None, "rows": rows,
            "no_augmentation_images_per_s": plain, "augment_images_per_s": ours, "keras_layers_images_per_s": theirs,
            "augment_cost_x": ratio(plain, ours), "keras_layers_cost_x": ratio(plain, theirs)}


# ------------------------------------------------------------------------------------------------ 4-5. dvc

def dvc_binary() -> str | None:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else shutil.which("dvc")


def timed(cmd: list[str], timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t, r


def bench_dvc() -> dict:
    """Group 4: `dvc status` and a no-op `dvc repro`, only if everything is already up to date."""
    dvc = dvc_binary()
    if not (ROOT / "dvc.lock").exists():
        return {"skipped": "no dvc.lock: the pipeline has not been run in this project"}
    if dvc is None:
        return {"skipped": "dvc is not installed here"}
    try:
        for _ in range(6):  # another dvc command may hold the repository's lock for a moment
            status_s, st = timed([dvc, "status"])
            text = (st.stdout + st.stderr).strip()
            if st.returncode == 0 or "lock" not in text.lower():
                break
            time.sleep(5)
    except subprocess.TimeoutExpired:
        return {"skipped": "`dvc status` took over 10 minutes"}
    out = {"status_s": round(status_s, 2), "status_rc": st.returncode}
    if st.returncode != 0 and ("lock" in text.lower() or "busy" in text.lower()):
        return {**out, "skipped": "another dvc command holds the repository's lock (a `dvc repro` in progress?); "
                                  "retried for 30 s; not timed", "output": text[-2000:]}
    if st.returncode != 0:
        first = next((line for line in text.splitlines() if "ERROR" in line), text.splitlines()[0] if text else "")
        return {**out, "skipped": f"`dvc status` failed (exit {st.returncode}): {first.strip()[:200]}",
                "output": text[-2000:]}
    if "up to date" not in text.lower():
        changed = sorted({line.strip().rstrip(":") for line in text.splitlines()
                          if line and not line.startswith((" ", "\t"))})
        return {**out, "changed": changed, "skipped": "the pipeline is not up to date, so `dvc repro` would run "
                                                      f"stages (changed: {', '.join(changed[:12])}); not timed"}
    try:
        repro_s, rp = timed([dvc, "repro"])
    except subprocess.TimeoutExpired:
        return {**out, "skipped": "`dvc repro` took over 10 minutes"}
    ran = [line for line in rp.stdout.splitlines() if line.startswith("Running stage")]
    return {**out, "repro_s": round(repro_s, 2), "repro_rc": rp.returncode, "stages_run": ran}


def bench_exports(project: Path, seconds: float) -> dict:
    """Group 6: milliseconds per image (batch of one) of the delivered model in each exported format, in `project`
    (after its pipeline ran)."""
    import tensorflow as tf

    report = project / paths.METRICS / "export.json"
    name = io.read_json(report)["model"] if report.exists() else None
    needed = [report, project / models.path(str(name)), project / paths.CACHE_DIR / "test_x.npy",
              *(project / paths.EXPORTS / f"model_{k}.tflite" for k in ("float16", "int8"))]
    if name is None or not all(p.exists() for p in needed):
        missing = ", ".join(str(p.relative_to(project)) for p in needed if not p.exists())
        return {"skipped": f"{missing} missing: run the pipeline (`make run`, or `dvc pull`) first"}
    with contextlib.chdir(project):
        model, _ = models.load(name)
        x = np.asarray(io.load_npy(paths.CACHE_DIR / "test_x.npy")[:16])
        lite = {f"tflite_{k}_{t}t": models.load(str(paths.EXPORTS / f"model_{k}.tflite"), t)[0]
                for k in ("float16", "int8") for t in sorted({1, usable_cpus()})}
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        saved = tf.saved_model.load(str(models.export_saved_model(model, tmp / "saved_model")))
        state = {"i": 0}

        def one(fn):
            def call():
                state["i"] = (state["i"] + 1) % len(x)
                fn(x[state["i"]:state["i"] + 1])
                return 1
            return call

        candidates = {"keras": one(lambda b: model.predict_on_batch(b)),
                      "saved_model": one(lambda b: saved.serve(tf.constant(b, tf.float32)).numpy()),
                      **{k: one(m.predict) for k, m in lite.items()}}
        rates = compare(candidates, seconds, "exports: latency", warmup=2, min_calls=5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = {k: None if not r.get("images_per_s") else 1000 / r["images_per_s"] for k, r in rates.items()}
    sizes = {k: v["bytes"] for k, v in io.read_json(report)["formats"].items()}
    return {"model": name, "image_size": int(x.shape[1]), "ms_per_image": ms, "bytes": sizes,
            "speedup_vs_keras": {k: ratio(ms["keras"], v) for k, v in ms.items() if k != "keras"}}


RSS_CHILD = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
with open(sys.argv[1], "a") as log:
    rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def bench_stage_rss(tmp: Path) -> dict:
    """Group 5 (--stage-rss): rerun each stage alone, `dvc repro -f -s <stage>`, each under a fresh parent
    process whose getrusage(RUSAGE_CHILDREN) is that stage's peak RSS (dvc and the stage's process)."""
    dvc = dvc_binary()
    if dvc is None or not (ROOT / "dvc.yaml").exists():
        return {"skipped": "dvc or dvc.yaml missing"}
    r = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return {"skipped": f"`dvc stage list` failed: {r.stderr.strip()[-300:]}"}
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {}
    for stage in tqdm([s.strip() for s in r.stdout.splitlines() if s.strip()], desc="stage RSS", leave=False):
        res = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp / "stage_rss.log"), dvc, "repro", "-f", "-s",
                              stage], cwd=ROOT, capture_output=True, text=True)
        try:
            info = json.loads(res.stdout.strip().splitlines()[-1])
            out[stage] = {"peak_rss_mib": round(info["maxrss"] * unit / 2**20, 1),
                          "seconds": round(info["seconds"], 1), "rc": info["rc"]}
        except (IndexError, ValueError):
            out[stage] = {"error": res.stderr.strip()[-300:]}
    with contextlib.suppress(Exception):
        out["_data_source"] = params.load(ROOT / "params.yaml").data.source
    return out


# ------------------------------------------------------------------------------------------------- main

def csv_list(kind=str):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="generated JPEGs instead of the cats-vs-dogs photos")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run: {QUICK_IMAGES} images, short measurements, 64-px models")
    ap.add_argument("--backbones", type=csv_list(), default=["vgg16", "efficientnet_lite0"])
    ap.add_argument("--sizes", type=csv_list(int), default=None,
                    help="image sizes for extraction and fine-tune (default: 150,224 on an accelerator, 96 on CPU)")
    ap.add_argument("--precisions", type=csv_list(), default=None,
                    help="float32 and/or mixed_bfloat16 (default: both on an accelerator, float32 on CPU)")
    ap.add_argument("--seconds", type=float, default=None, help="per input-pipeline candidate (default 12, quick 1.5)")
    ap.add_argument("--model-seconds", type=float, default=None,
                    help="per extraction/fine-tune candidate (default 10 on CPU, 8 on an accelerator, quick 1)")
    ap.add_argument("--skip", type=csv_list(), default=[],
                    help="groups to leave out: input,extract,finetune,dvc,exports")
    ap.add_argument("--stage-rss", action="store_true",
                    help="also rerun every pipeline stage (dvc repro -f -s) to record its peak RSS: slow, off by default")
    ap.add_argument("--data", type=Path, default=PHOTOS, help="a folder with train/{cats,dogs}/*.jpg")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    return ap.parse_args(argv)


def with_defaults(args: argparse.Namespace, dev: device.Device) -> argparse.Namespace:
    accel = dev.accelerator
    args.sizes = args.sizes or ([64] if args.quick else [150, 224] if accel else [96])
    args.precisions = args.precisions or (["float32", "mixed_bfloat16"] if accel else ["float32"])
    args.seconds = args.seconds or (1.5 if args.quick else 12.0)
    args.model_seconds = args.model_seconds or (1.0 if args.quick else 8.0 if accel else 10.0)
    args.min_calls = 1 if args.quick else 3
    for name in args.backbones:
        backbones.spec(name)  # an unknown name fails now, not after the input group
    return args


def photos(args, tmp: Path) -> tuple[list[str], np.ndarray, Path, dict]:
    """(files, labels, the folder ImageDataGenerator reads, a description) of the training photos."""
    synthetic = args.synthetic or not (args.data / "train").is_dir()
    limit = QUICK_IMAGES if args.quick else None
    src = make_synthetic(tmp / "photos", (limit or 1360) // 2) if synthetic else args.data
    files, labels = list_photos(src, limit)
    if limit and not synthetic:
        src = linked_subset(files, tmp / "subset")
    info = {"source": "synthetic" if synthetic else "cats_vs_dogs_small (train split)", "synthetic": synthetic,
            "n_images": len(files), "mean_jpeg_kib": round(float(np.mean([os.path.getsize(f) for f in files])) / 1024, 1)}
    return files, labels, src / "train", info


def measure(args, dev: device.Device, tmp: Path, results: dict) -> None:
    """Run the groups not skipped, adding each one's numbers to `results`."""
    files, labels, folder, results["data"] = photos(args, tmp)
    log(f"data: {results['data']['source']}, {len(files)} images")
    cache150 = None
    if "input" not in args.skip:
        results["input_pipeline"], cache150 = bench_input(files, labels, folder, tmp, args, dev)
    if cache150 is None and {"extract", "finetune"} - set(args.skip):  # the input group was skipped
        cache150 = cache.cache_split(files, INPUT_SIZE, usable_cpus(), f"cache {INPUT_SIZE}px")
    runs = [(b, s, pr) for pr in args.precisions for b in args.backbones for s in args.sizes]
    if "extract" not in args.skip:
        results["extraction"] = [bench_extract(b, s, pr, cache150, tmp, args) for b, s, pr in runs]
    if "finetune" not in args.skip:
        order = np.random.default_rng(0).permutation(len(cache150))  # both classes in the batch
        results["finetune"] = [bench_finetune(b, s, pr, cache150[order], labels[order], args) for b, s, pr in runs]
    if "dvc" not in args.skip:
        results["dvc"] = bench_dvc()
    if "exports" not in args.skip:
        results["exports"] = bench_exports(ROOT, args.model_seconds)
    results["stage_rss"] = (bench_stage_rss(tmp) if args.stage_rss else
                            {"skipped": "off by default (it reruns every stage): pass --stage-rss"})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    dev = device.detect()
    args = with_defaults(parse_args(argv), dev)
    results = {"command": " ".join(["python -m bench.run", *argv]),
               "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine_info(dev), "loadavg_start": loadavg(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
               "augment_params": SEEDS_RECIPE, "idg_augmentation": IDG_AUGMENTATION}
    log(f"bench: keras {keras.__version__} on {dev}, devices {list(dev.devices)}, {usable_cpus()} CPUs")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        measure(args, dev, tmp, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["goals"] = report.goals(results)
    io.write_json(args.out, results)
    log("")
    report.show(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
