"""Throughput benchmarks: `make bench` (= `python -m bench.run`) writes bench/results.json, bench/results.png
and prints a table. Benchmarks, not tests: nothing here asserts a timing.

Measured, each group side by side in one process (candidates interleaved in short turns, so a busy machine
slows them alike), on the cats-vs-dogs photos next to the project (`../shared/datasets/cats_vs_dogs_small`,
train split) or, with --synthetic or when they are absent, on a generated set of as many JPEGs of similar sizes
(flagged `synthetic` in the output):

1. input pipeline, images/s at 150 px, batch 32: the cache stage's uint8 `.npy` (memory-mapped) + the training
   loader (`pipeline.train.Batches`, shuffled) with and without `pipeline.augment`, against Keras 2's
   `ImageDataGenerator.flow_from_directory` with and without the seeds' augmentation; the one-off cache build
   (decode + resize, the cache stage's own code) is timed on its own;
2. extraction, images/s: the extract stage's loop (batches read from the memory-mapped cache, cast,
   `predict_on_batch`, stored as float16) against `predict_on_batch` on one in-memory float32 batch (the
   ceiling); the difference is the loader's overhead;
3. fine-tune step, images/s of `train_on_batch` (top of the base unfrozen + dense head, as the finetune stage):
   no augmentation, `pipeline.augment.Augment`, and Keras' RandomRotation+RandomZoom+RandomTranslation+RandomFlip;
4. `dvc status` and a no-op `dvc repro`, only when the project's pipeline is already up to date (otherwise the
   reason it is skipped);
5. with --stage-rss (off by default: it RERUNS every stage with `dvc repro -f -s`), each stage's peak RSS.

Runs without TensorFlow too (e.g. KERAS_BACKEND=jax on a GPU machine): the ImageDataGenerator baseline is then
skipped if neither tf_keras nor keras' legacy copy imports. On an accelerator the defaults are sizes 150,224 and
float32 + mixed_bfloat16; on CPU one small size and float32.

    python -m bench.run                      # everything, ~5-10 min on 2 CPU cores
    python -m bench.run --quick              # a smoke run: a few batches of everything
    KERAS_BACKEND=jax python -m bench.run --synthetic --backbones vgg16,efficientnet_lite0 --sizes 150,224
"""
from __future__ import annotations

import argparse
import contextlib
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

from pipeline import augment, backbones, io, params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "cats_vs_dogs_small"
CLASSES = ("cats", "dogs")
BATCH = 32
INPUT_SIZE = 150
# The seeds' ImageDataGenerator recipe. Keras 2 reads shear_range in degrees (np.deg2rad inside), so the seeds'
# shear_range=0.2 is 0.2 degrees; params.Augment.shear is in radians. (The cost of a warp does not depend on it.)
SEEDS_RECIPE = dict(rotation=40, width_shift=0.2, height_shift=0.2, shear=round(math.radians(0.2), 6), zoom=0.2,
                    horizontal_flip=True, vertical_flip=False)
EXTRACT_BATCHES = 16  # batches the extraction candidates cycle over
GOALS = {"input_speedup_augmented": 10.0, "finetune_augment_cost": 2.0}

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - progress bars are a nicety
    tqdm = None


# ------------------------------------------------------------------------------------------------- helpers

def log(msg: str = "") -> None:
    print(msg, flush=True)


def backend_info() -> dict:
    """Keras backend, its version, the devices it sees and whether one of them is an accelerator."""
    name = keras.backend.backend()
    info = {"keras": keras.__version__, "backend": name, "devices": [], "accelerator": False}
    with contextlib.suppress(Exception):
        if name == "jax":
            import jax

            info["backend_version"] = jax.__version__
            devs = jax.devices()
            info["devices"] = [f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in devs]
            info["accelerator"] = any(d.platform != "cpu" for d in devs)
        elif name == "tensorflow":
            import tensorflow as tf

            info["backend_version"] = tf.__version__
            devs = tf.config.list_physical_devices()
            info["devices"] = [f"{d.device_type}:{d.name}" for d in devs]
            info["accelerator"] = any(d.device_type != "CPU" for d in devs)
        elif name == "torch":
            import torch

            info["backend_version"] = torch.__version__
            info["accelerator"] = torch.cuda.is_available()
            info["devices"] = ([f"cuda:{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
                               or ["cpu"])
    return info


def machine_info() -> dict:
    mem = None
    with contextlib.suppress(Exception):
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpus_usable": cpus,
            "memory_gib": mem, "numpy": np.__version__, **backend_info()}


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


class Progress:
    """A tqdm bar over seconds spent (or nothing, when tqdm is missing)."""

    def __init__(self, total: float, desc: str):
        self.bar = tqdm(total=round(total, 1), desc=desc, unit="s", leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s") if tqdm else None

    def add(self, seconds: float) -> None:
        if self.bar:
            self.bar.update(min(seconds, self.bar.total - self.bar.n))

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def compare(candidates: dict, seconds: float, desc: str, warmup: int = 1, min_calls: int = 2,
            turn: float | None = None) -> dict:
    """Images/s of each candidate (a callable returning how many images it just processed), measured side by
    side: after `warmup` untimed calls each (compilation), the candidates take turns of ~`turn` seconds until
    each has spent `seconds` and made `min_calls` calls. The rate is images over time, whole calls only."""
    failed = {}
    for k, fn in list(candidates.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
            failed[k] = {"images_per_s": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"{desc}: '{k}' failed and is left out: {failed[k]['error']}")
            candidates = {c: f for c, f in candidates.items() if c != k}
    turn = turn or max(seconds / 5, 0.25)
    spent = {k: 0.0 for k in candidates}
    images = {k: 0 for k in candidates}
    calls = {k: 0 for k in candidates}
    bar = Progress(seconds * len(candidates), desc)
    try:
        while any(spent[k] < seconds or calls[k] < min_calls for k in candidates):
            for k, fn in candidates.items():
                if spent[k] >= seconds and calls[k] >= min_calls:
                    continue
                t_turn = time.perf_counter()
                while True:
                    t = time.perf_counter()
                    n = fn()
                    dt_ = time.perf_counter() - t
                    spent[k] += dt_
                    images[k] += n
                    calls[k] += 1
                    bar.add(dt_)
                    if time.perf_counter() - t_turn >= turn or (spent[k] >= seconds and calls[k] >= min_calls):
                        break
    finally:
        bar.close()
    return {**{k: {"images_per_s": images[k] / spent[k] if spent[k] else None, "images": images[k],
                   "seconds": round(spent[k], 3), "calls": calls[k]} for k in candidates}, **failed}


def ratio(a, b):
    return None if not a or not b else a / b


def fmt(x, unit: str = "", digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}{unit}"


# ---------------------------------------------------------------------------------------------------- data

def list_photos(root: Path, split: str = "train", limit: int | None = None) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    for label, cls in enumerate(CLASSES):
        found = sorted(str(p) for p in (root / split / cls).glob("*.jpg"))
        if limit:
            found = found[: limit // len(CLASSES)]
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, np.int64)


def make_synthetic(root: Path, per_class: int, seed: int = 0) -> Path:
    """JPEGs like the cats-vs-dogs photos: sizes ~250..500 x 225..500 px, ~40 KB at quality 90 (smooth colour
    fields plus noise), in train/{cats,dogs}/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    todo = [(cls, i) for cls in CLASSES for i in range(per_class)]
    bar = tqdm(todo, desc="synthetic JPEGs", unit="img", leave=False) if tqdm else todo
    for cls, i in bar:
        w, h = int(rng.integers(250, 501)), int(rng.integers(225, 501))
        low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        a = np.asarray(low, np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
        path = root / "train" / cls / f"{cls[:-1]}.{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def decode_all(files: list[str], size: int) -> tuple[np.ndarray, str]:
    """Decode + resize with the cache stage's own code (PIL, one process per core); a local copy without it."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from pipeline import cache

        return cache.cache_split(files, size, workers, f"cache build {size}px"), "pipeline.cache.cache_split"
    except ImportError:
        from PIL import Image

        out = np.empty((len(files), size, size, 3), np.uint8)
        for i, f in enumerate(files):
            with Image.open(f) as im:
                im.draft("RGB", (size, size))
                out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        return out, "local PIL loop (pipeline.cache not importable)"


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """The cache at another size, resized from the 150-px one (the content does not matter for throughput)."""
    if images.shape[1] == size:
        return np.asarray(images)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def loader_class():
    try:
        from pipeline.train import Batches

        return Batches, "pipeline.train.Batches"
    except ImportError:
        return _Batches, "bench copy of pipeline.train.Batches (pipeline.train not importable)"


class _Batches:
    """Same as pipeline.train.Batches (used only where that module cannot be imported)."""

    def __init__(self, images, labels, batch_size, shuffle=False, seed=0, **_):
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.rng, self.order = np.random.default_rng(seed), np.arange(len(labels))
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __getitem__(self, i):
        rows = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        return np.asarray(self.images[rows], np.float32), self.labels[rows]

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)


def image_data_generator():
    """Keras 2's ImageDataGenerator: tf_keras first, then keras' legacy copy; (class, where) or (None, why)."""
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator

        import tf_keras

        return ImageDataGenerator, f"tf_keras {tf_keras.__version__} (tf_keras.preprocessing.image)"
    except Exception as e:  # noqa: BLE001 - any import problem means: try the next one
        first = f"tf_keras: {type(e).__name__}: {e}"
    try:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator, f"keras {keras.__version__} (keras.src.legacy.preprocessing.image; {first})"
    except Exception as e:  # noqa: BLE001
        return None, f"{first}; keras.src.legacy: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------- augmenting

def augment_fn(p: params.Augment, method: str, seed: int = 0):
    """A compiled `augment_batch` for the input-pipeline measurement: tf.function on TensorFlow, jax.jit with an
    explicit seed on JAX, eager elsewhere."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gen = keras.random.SeedGenerator(seed)
        return tf.function(lambda x: augment.augment_batch(x, p, gen, method=method))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda x, s: augment.augment_batch(x, p, s, method=method))
        counter = iter(range(seed, 2**31))
        return lambda x: f(jnp.asarray(x), jnp.asarray([next(counter), 0], dtype="uint32"))
    gen = keras.random.SeedGenerator(seed)
    return lambda x: augment.augment_batch(x, p, gen, method=method)


def keras_layers_augmentation(name: str = "keras_augment") -> keras.Sequential:
    """Keras' own layers for the same recipe (no shear layer in this set; each layer resamples the batch)."""
    r = SEEDS_RECIPE
    return keras.Sequential([
        keras.layers.RandomRotation(r["rotation"] / 360.0, fill_mode="nearest"),
        keras.layers.RandomZoom(r["zoom"], fill_mode="nearest"),
        keras.layers.RandomTranslation(r["height_shift"], r["width_shift"], fill_mode="nearest"),
        keras.layers.RandomFlip("horizontal"),
    ], name=name)


# ------------------------------------------------------------------------------------------------- groups

def bench_input(files, labels, source_dir: Path, tmp: Path, args) -> tuple[dict, np.ndarray]:
    """Group 1: the cache + loader (+ Augment) against ImageDataGenerator.flow_from_directory."""
    out = {"batch_size": BATCH, "image_size": INPUT_SIZE, "n_images": len(files)}
    t = time.perf_counter()
    images, how = decode_all(files, INPUT_SIZE)
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    io.save_npy(tmp / "train_x.npy", images)
    save_s = time.perf_counter() - t
    cache = io.load_npy(tmp / "train_x.npy", mmap=True)
    out["cache_build"] = {"images": len(files), "decode_resize_s": round(decode_s, 2), "save_s": round(save_s, 2),
                          "images_per_s": len(files) / (decode_s + save_s), "how": how,
                          "bytes": (tmp / "train_x.npy").stat().st_size}
    Batches, loader_name = loader_class()
    out["loader"] = loader_name
    p = params.Augment(**SEEDS_RECIPE)

    def ours(fn=None, **loader_args):
        batches = Batches(cache, labels, BATCH, shuffle=True, seed=0, **loader_args)
        state = {"i": 0}

        def step():
            if state["i"] >= len(batches):
                batches.on_epoch_end()
                state["i"] = 0
            x = batches[state["i"]][0]
            state["i"] += 1
            if fn is not None:
                sync(fn(x))
            return len(x)

        return step

    # Where the finetune stage augments by default (`augment_in: auto`); in the model, with the `auto` warp method.
    auto = augment.placement("auto", backend_info()["accelerator"])
    auto = auto if auto == "loader" else augment.resolve_method("auto")
    candidates = {"cache + loader": ours()}
    if loader_name == "pipeline.train.Batches":
        candidates["cache + loader + augment (loader)"] = ours(augment=p)
    for method in ("gather", "affine_transform"):
        candidates[f"cache + loader + Augment ({method})"] = ours(augment_fn(p, method))
    IDG, where = image_data_generator()
    out["baseline"] = where
    if IDG is not None:
        def idg(**aug):
            gen = IDG(rescale=1 / 255, **aug).flow_from_directory(
                str(source_dir), target_size=(INPUT_SIZE, INPUT_SIZE), batch_size=BATCH, class_mode="binary",
                shuffle=True, seed=0)
            return lambda: len(next(gen)[0])

        candidates["ImageDataGenerator"] = idg()
        candidates["ImageDataGenerator + augmentation"] = idg(
            rotation_range=40, width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2, zoom_range=0.2,
            horizontal_flip=True)
    else:
        log(f"input pipeline: ImageDataGenerator baseline skipped ({where})")
    rows = compare(candidates, args.seconds, "input pipeline", warmup=2, min_calls=3, turn=min(2.0, args.seconds / 3))
    out["rows"] = rows
    out["augment_method_auto"] = auto
    ours_plain = rows["cache + loader"]["images_per_s"]
    ours_aug = rows.get("cache + loader + augment (loader)" if auto == "loader" else
                        f"cache + loader + Augment ({auto})", {}).get("images_per_s")
    out["ratios"] = {
        "speedup_no_augmentation": ratio(ours_plain, rows.get("ImageDataGenerator", {}).get("images_per_s")),
        "speedup_augmented": ratio(ours_aug, rows.get("ImageDataGenerator + augmentation", {}).get("images_per_s")),
        "gather_vs_affine_transform": ratio(rows["cache + loader + Augment (gather)"]["images_per_s"],
                                            rows["cache + loader + Augment (affine_transform)"]["images_per_s"]),
    }
    return out, np.asarray(cache)


@contextlib.contextmanager
def policy(name: str):
    old = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)
        keras.backend.clear_session()


def bench_extract(name: str, size: int, prec: str, cache150: np.ndarray, tmp: Path, args) -> dict:
    """Group 2: the extract stage's loop over the memory-mapped cache vs predict_on_batch on an in-memory batch."""
    path = tmp / f"cache_{size}.npy"
    if not path.exists():
        io.save_npy(path, resized(cache150, size))
    images = io.load_npy(path, mmap=True)
    with policy(prec):
        base = backbones.build_base(name, "none", size)
        # All candidates cycle over the same batches, the ceiling over float32 copies of them held in memory.
        starts = list(range(0, len(images) - BATCH + 1, BATCH))[:EXTRACT_BATCHES]
        in_memory = [np.asarray(images[s:s + BATCH], dtype=np.float32) for s in starts]

        def loader(dtype):  # = pipeline.extract.extract's loop body, features stored as `dtype`
            out = np.empty((len(images), *base.output_shape[1:]), dtype)
            calls = iter(range(2**62))

            def step():
                start = starts[next(calls) % len(starts)]
                batch = np.asarray(images[start:start + BATCH], dtype=np.float32)
                out[start:start + len(batch)] = np.asarray(base.predict_on_batch(batch))
                return len(batch)

            return step

        def ceiling(calls=iter(range(2**62))):
            np.asarray(base.predict_on_batch(in_memory[next(calls) % len(in_memory)]))
            return BATCH

        features = np.asarray(base.predict_on_batch(in_memory[0]), np.float32)
        rows = compare({"loader": loader("float16"), "loader, float32 features": loader("float32"),
                        "in-memory": ceiling}, args.model_seconds, f"extract {name} {size}px {prec}",
                       warmup=1, min_calls=args.min_calls)
    lo, lo32, hi = (rows[k]["images_per_s"] for k in ("loader", "loader, float32 features", "in-memory"))
    # float16 keeps values down to 6.1e-5 as normal numbers; numpy converts anything smaller ~40x slower. Random
    # weights can shrink the features that far (EfficientNet-Lite0: ~1e-11), real ones do not.
    tiny = float(np.mean((features != 0) & (np.abs(features) < np.finfo(np.float16).tiny)))
    return {"backbone": name, "image_size": size, "precision": prec, "batch_size": BATCH,
            "feature_shape": list(features.shape[1:]), "loader_images_per_s": lo,
            "loader_float32_images_per_s": lo32, "in_memory_images_per_s": hi,
            "loader_overhead_pct": None if not lo or not hi else (hi / lo - 1) * 100,
            "loader_overhead_float32_pct": None if not lo32 or not hi else (hi / lo32 - 1) * 100,
            "features_below_float16_normal": round(tiny, 4), "rows": rows}


def bench_finetune(name: str, size: int, prec: str, cache150: np.ndarray, labels: np.ndarray, args) -> dict:
    """Group 3: train_on_batch images/s without augmentation, with Augment, with Keras' random layers."""
    x = resized(cache150[:BATCH], size).astype(np.float32)
    y = labels[:BATCH].astype(np.float32)
    if len(np.unique(y)) < 2:
        y = (np.arange(BATCH) % 2).astype(np.float32)
    with policy(prec):
        base = backbones.build_base(name, "none", size)
        unfrozen = backbones.unfreeze_from(base, None, name)
        try:
            from pipeline import train

            head = train.build_head(base.output_shape[1:], 2, params.Head())
            compile_for = train.compile_for
        except ImportError:
            head, compile_for = _head(base.output_shape[1:]), _compile_for
        variants = {"no augmentation": None, "Augment": "ours", "Keras layers": "keras"}
        steps = {}
        for label, kind in variants.items():
            inputs = keras.Input((size, size, 3), name="image")
            h = inputs
            if kind == "ours":
                h = augment.Augment(params.Augment(**SEEDS_RECIPE), seed=0, name="augment")(h)
            elif kind == "keras":
                h = keras_layers_augmentation()(h)
            h = base(h, training=False)  # BatchNorm in inference mode, as the finetune stage
            model = compile_for(keras.Model(inputs, head(h), name=f"finetune_{kind or 'plain'}"), 2, 5e-5)

            def step(model=model):
                sync(model.train_on_batch(x, y))
                return BATCH

            steps[label] = step
        rows = compare(steps, args.model_seconds, f"fine-tune {name} {size}px {prec}", warmup=2,
                       min_calls=args.min_calls)
    plain = rows["no augmentation"]["images_per_s"]
    return {"backbone": name, "image_size": size, "precision": prec, "batch_size": BATCH,
            "unfrozen_from": unfrozen[0] if unfrozen else None, "rows": rows,
            "no_augmentation_images_per_s": plain,
            "augment_images_per_s": rows["Augment"]["images_per_s"],
            "keras_layers_images_per_s": rows["Keras layers"]["images_per_s"],
            "augment_cost_x": ratio(plain, rows["Augment"]["images_per_s"]),
            "keras_layers_cost_x": ratio(plain, rows["Keras layers"]["images_per_s"])}


def _head(shape):
    inputs = keras.Input(shape)
    h = keras.layers.GlobalAveragePooling2D()(inputs)
    h = keras.layers.Dense(256, activation="relu")(keras.layers.Dropout(0.5)(h))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", dtype="float32")(keras.layers.Dropout(0.5)(h)))


def _compile_for(model, n_classes, lr):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy", metrics=["accuracy"])
    return model


# ------------------------------------------------------------------------------------------------- DVC

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
    for attempt in range(6):  # another dvc command may hold the repo's lock for a moment
        try:
            status_s, st = timed([dvc, "status"])
        except subprocess.TimeoutExpired:
            return {"skipped": "`dvc status` took over 10 minutes"}
        text = (st.stdout + st.stderr).strip()
        if st.returncode == 0 or "lock" not in text.lower():
            break
        time.sleep(5)
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
        return {**out, "skipped": "the pipeline is not up to date, so `dvc repro` would run stages "
                                  f"(changed: {', '.join(changed[:12])}); not timed",
                "changed": changed}
    try:
        repro_s, rp = timed([dvc, "repro"])
    except subprocess.TimeoutExpired:
        return {**out, "skipped": "`dvc repro` took over 10 minutes"}
    ran = [line for line in rp.stdout.splitlines() if line.startswith("Running stage")]
    out.update({"repro_s": round(repro_s, 2), "repro_rc": rp.returncode, "stages_run": ran})
    return out


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
    stages = [s.strip() for s in r.stdout.splitlines() if s.strip()]
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out, logfile = {}, tmp / "stage_rss.log"
    for stage in (tqdm(stages, desc="stage RSS", unit="stage", leave=False) if tqdm else stages):
        res = subprocess.run([sys.executable, "-c", RSS_CHILD, str(logfile), dvc, "repro", "-f", "-s", stage],
                             cwd=ROOT, capture_output=True, text=True)
        try:
            info = json.loads(res.stdout.strip().splitlines()[-1])
            out[stage] = {"peak_rss_mib": round(info["maxrss"] * unit / 2**20, 1), "seconds": round(info["seconds"], 1),
                          "rc": info["rc"]}
        except (IndexError, ValueError):
            out[stage] = {"error": res.stderr.strip()[-300:]}
    params_file = ROOT / "params.yaml"
    with contextlib.suppress(Exception):
        out["_data_source"] = params.load(params_file).data.source
    return out


# ---------------------------------------------------------------------------------------------- reporting

def table(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"bench {results['date']}  |  {m['platform']}  |  {m['cpus_usable']} CPUs  |  keras {m['keras']} "
                 f"on {m['backend']} {m.get('backend_version', '')}  |  devices: {', '.join(m['devices']) or '-'}")
    lines.append(f"data: {results['data']['source']} ({results['data']['n_images']} train images, mean "
                 f"{results['data']['mean_jpeg_kib']} KiB JPEG)  |  load average at start/end: "
                 f"{results['loadavg_start']} / {results['loadavg_end']}")
    inp = results.get("input_pipeline")
    if inp:
        cb = inp["cache_build"]
        lines += ["", f"1. input pipeline, {inp['image_size']} px, batch {inp['batch_size']} (images/s)",
                  f"   one-off cache build: {cb['images']} images in {cb['decode_resize_s'] + cb['save_s']:.1f} s "
                  f"({fmt(cb['images_per_s'])} images/s, {cb['how']})"]
        for k, v in inp["rows"].items():
            lines.append(f"   {k:45s} {fmt(v['images_per_s']):>10}" + (f"  failed: {v['error']}" if "error" in v else ""))
        r = inp["ratios"]
        lines.append(f"   speedup without augmentation: {fmt(r['speedup_no_augmentation'], 'x')}   "
                     f"with augmentation ({inp['augment_method_auto']}): {fmt(r['speedup_augmented'], 'x')}"
                     f"  (goal >= {GOALS['input_speedup_augmented']:.0f}x)")
        lines.append(f"   loader: {inp['loader']}; baseline: {inp['baseline']}")
    ex = results.get("extraction") or []
    if ex:
        lines += ["", "2. extraction (images/s): loader = extract stage's loop over the mmap cache (features stored "
                      "as float16, as the stage's default, or float32); ceiling = predict_on_batch on in-memory batches",
                  f"   {'backbone':20s} {'size':>4} {'precision':16s} {'loader':>9} {'overhead':>9} "
                  f"{'loader f32':>10} {'overhead':>9} {'ceiling':>9}"]
        for e in ex:
            lines.append(f"   {e['backbone']:20s} {e['image_size']:>4} {e['precision']:16s} "
                         f"{fmt(e['loader_images_per_s']):>9} {fmt(e['loader_overhead_pct'], ' %'):>9} "
                         f"{fmt(e['loader_float32_images_per_s']):>10} {fmt(e['loader_overhead_float32_pct'], ' %'):>9} "
                         f"{fmt(e['in_memory_images_per_s']):>9}")
        for e in ex:
            if e["features_below_float16_normal"] > 0.01:
                lines.append(f"   note: {e['features_below_float16_normal']:.0%} of {e['backbone']}'s random-weight "
                             "features are below float16's smallest normal number; numpy's conversion of those is "
                             "~40x slower, which inflates the float16 overhead (not so with real weights)")
    ft = results.get("finetune") or []
    if ft:
        lines += ["", "3. fine-tune train_on_batch (images/s); cost = step time / step time without augmentation",
                  f"   {'backbone':20s} {'size':>4} {'precision':16s} {'none':>8} {'Augment':>8} {'cost':>6} "
                  f"{'Keras':>8} {'cost':>6}"]
        for f in ft:
            lines.append(f"   {f['backbone']:20s} {f['image_size']:>4} {f['precision']:16s} "
                         f"{fmt(f['no_augmentation_images_per_s']):>8} {fmt(f['augment_images_per_s']):>8} "
                         f"{fmt(f['augment_cost_x'], 'x', 2):>6} {fmt(f['keras_layers_images_per_s']):>8} "
                         f"{fmt(f['keras_layers_cost_x'], 'x', 2):>6}")
        lines.append(f"   goal: Augment cost <= {GOALS['finetune_augment_cost']:.0f}x; Keras = RandomRotation+RandomZoom+"
                     "RandomTranslation+RandomFlip")
    d = results.get("dvc")
    if d:
        lines += ["", "4. dvc: " + (f"skipped: {d['skipped']}" if "skipped" in d else
                                    f"`dvc status` {d['status_s']} s, no-op `dvc repro` {d['repro_s']} s")]
        if "skipped" in d and "status_s" in d:
            lines.append(f"   (`dvc status` itself took {d['status_s']} s)")
    rss = results.get("stage_rss")
    if rss:
        if "skipped" in rss:
            lines += ["", f"5. peak RSS per stage: {rss['skipped']}"]
        else:
            lines += ["", "5. peak RSS per stage (dvc repro -f -s):"]
            for k, v in rss.items():
                if not k.startswith("_"):
                    lines.append(f"   {k:20s} " + (f"{v['peak_rss_mib']:>8.0f} MiB  {v['seconds']:>6.0f} s  rc {v['rc']}"
                                                     if "peak_rss_mib" in v else f"error: {v['error']}"))
    goals = results.get("goals") or []
    if goals:
        lines += ["", "goals:"]
        for g in goals:
            met = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
            lines.append(f"   {g['goal']:60s} {fmt(g['value'], 'x', 2):>8}  {met}")
    return "\n".join(lines)


def goals(results: dict) -> list[dict]:
    out = []
    inp = results.get("input_pipeline")
    if inp:
        v = inp["ratios"]["speedup_augmented"]
        out.append({"goal": f"input pipeline with augmentation >= {GOALS['input_speedup_augmented']:.0f}x "
                            "ImageDataGenerator", "value": v,
                    "met": None if v is None else v >= GOALS["input_speedup_augmented"]})
    for f in results.get("finetune") or []:
        v = f["augment_cost_x"]
        out.append({"goal": f"fine-tune step, Augment <= {GOALS['finetune_augment_cost']:.0f}x "
                            f"({f['backbone']} {f['image_size']}px {f['precision']})", "value": v,
                    "met": None if v is None else v <= GOALS["finetune_augment_cost"]})
    return out


def chart(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars = []
    inp = results.get("input_pipeline")
    if inp:
        for key, label in (("speedup_no_augmentation", "input: ours / IDG, no aug"),
                           ("speedup_augmented", "input: ours / IDG, augmented")):
            if inp["ratios"][key]:
                bars.append((label, inp["ratios"][key], "speedup (higher is better)"))
    for e in results.get("extraction") or []:
        if e["loader_images_per_s"] and e["in_memory_images_per_s"]:
            bars.append((f"extract {e['backbone']} {e['image_size']} {e['precision']}: ceiling / loader",
                         e["in_memory_images_per_s"] / e["loader_images_per_s"], "slowdown (lower is better)"))
    for f in results.get("finetune") or []:
        for key, label in (("augment_cost_x", "Augment"), ("keras_layers_cost_x", "Keras layers")):
            if f[key]:
                bars.append((f"fine-tune {f['backbone']} {f['image_size']} {f['precision']}: {label} cost",
                             f[key], "slowdown (lower is better)"))
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.5))
    colours = {"speedup (higher is better)": "tab:green", "slowdown (lower is better)": "tab:orange"}
    ys = np.arange(len(bars))[::-1]
    ax.barh(ys, [b[1] for b in bars], color=[colours[b[2]] for b in bars])
    for y_, b in zip(ys, bars):
        ax.text(b[1], y_, f" {b[1]:.2f}x", va="center", fontsize=8)
    ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1, color="k", lw=0.8)
    ax.set_ylim(ys[-1] - 0.6, ys[0] + 1.3)  # room for the goal labels
    for x, text, colour in ((GOALS["input_speedup_augmented"], "input goal", "tab:green"),
                            (GOALS["finetune_augment_cost"], "fine-tune goal", "tab:orange")):
        ax.axvline(x, color=colour, lw=1, ls="--")
        ax.text(x, ys[0] + 0.6, f" {text} {x:g}x", color=colour, fontsize=7, va="bottom")
    ax.set_xlabel("ratio (log scale); green: speedup over ImageDataGenerator, orange: slowdown vs. the plain step")
    m = results["machine"]
    where = "accelerator" if m["accelerator"] else f"{m['cpus_usable']} CPU cores"
    ax.set_title(f"bench {results['date'][:16]}: keras on {m['backend']}, {where}, "
                 f"data: {'synthetic' if results['data']['synthetic'] else 'cats vs dogs photos'}", fontsize=9)
    fig.tight_layout()
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- main

def csv_list(kind=str):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="generated JPEGs instead of the cats-vs-dogs photos")
    ap.add_argument("--quick", action="store_true", help="a smoke run: short measurements, small sizes")
    ap.add_argument("--backbones", type=csv_list(), default=["vgg16", "efficientnet_lite0"])
    ap.add_argument("--sizes", type=csv_list(int), default=None,
                    help="image sizes for extraction and fine-tune (default: 150,224 on an accelerator, 96 on CPU)")
    ap.add_argument("--precisions", type=csv_list(), default=None,
                    help="float32 and/or mixed_bfloat16 (default: both on an accelerator, float32 on CPU)")
    ap.add_argument("--seconds", type=float, default=None, help="per input-pipeline candidate (default 12, quick 1.5)")
    ap.add_argument("--model-seconds", type=float, default=None,
                    help="per extraction/fine-tune candidate (default 10 on CPU, 8 on an accelerator, quick 1)")
    ap.add_argument("--skip", type=csv_list(), default=[], help="groups to leave out: input,extract,finetune,dvc")
    ap.add_argument("--stage-rss", action="store_true",
                    help="also rerun every pipeline stage (dvc repro -f -s) to record its peak RSS: slow, off by default")
    ap.add_argument("--data", type=Path, default=PHOTOS, help="a folder with train/{cats,dogs}/*.jpg")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    args = ap.parse_args(argv)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    machine = machine_info()
    accel = machine["accelerator"]
    args.sizes = args.sizes or ([64] if args.quick else [150, 224] if accel else [96])
    args.precisions = args.precisions or (["float32", "mixed_bfloat16"] if accel else ["float32"])
    args.seconds = args.seconds or (1.5 if args.quick else 12.0)
    args.model_seconds = args.model_seconds or (1.0 if args.quick else 8.0 if accel else 10.0)
    args.min_calls = 1 if args.quick else 3
    for name in args.backbones:
        backbones.spec(name)
    results = {"command": " ".join(["python -m bench.run", *argv]).strip(),
               "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine, "loadavg_start": loadavg(),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("out", "data")},
               "augment_params": SEEDS_RECIPE}
    log(f"bench: keras {machine['keras']} on {machine['backend']}, devices {machine['devices']}, "
        f"{machine['cpus_usable']} CPUs")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        synthetic = args.synthetic or not (args.data / "train").is_dir()
        limit = 256 if args.quick else None
        if synthetic:
            src = make_synthetic(tmp / "photos", per_class=(limit or 1360) // 2)
        else:
            src = args.data
        files, labels = list_photos(src, "train", limit)
        if limit and not synthetic:  # ImageDataGenerator reads a folder: give it the same subset
            sub = tmp / "subset"
            for f in files:
                target = sub / "train" / Path(f).parent.name / Path(f).name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(f), target)
            src = sub
        results["data"] = {"source": "synthetic" if synthetic else "cats_vs_dogs_small (train split)",
                           "synthetic": synthetic, "n_images": len(files),
                           "mean_jpeg_kib": round(float(np.mean([os.path.getsize(f) for f in files])) / 1024, 1)}
        log(f"data: {results['data']['source']}, {len(files)} images")

        cache150 = None
        if "input" not in args.skip:
            results["input_pipeline"], cache150 = bench_input(files, labels, src / "train", tmp, args)
        if cache150 is None and ({"extract", "finetune"} - set(args.skip)):
            n = max(BATCH * 8, 64) if args.quick else len(files)
            cache150, _ = decode_all(files[:: max(1, len(files) // n)][:n], INPUT_SIZE)
            labels = labels[:: max(1, len(files) // n)][:n]
        if "extract" not in args.skip:
            results["extraction"] = [bench_extract(b, s, pr, cache150, tmp, args)
                                     for pr in args.precisions for b in args.backbones for s in args.sizes]
        if "finetune" not in args.skip:
            order = np.random.default_rng(0).permutation(len(cache150))  # both classes in the batch
            results["finetune"] = [bench_finetune(b, s, pr, cache150[order], labels[order], args)
                                   for pr in args.precisions for b in args.backbones for s in args.sizes]
        if "dvc" not in args.skip:
            results["dvc"] = bench_dvc()
        results["stage_rss"] = (bench_stage_rss(tmp) if args.stage_rss else
                                {"skipped": "off by default (it reruns every stage): pass --stage-rss"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["goals"] = goals(results)
    io.write_json(args.out, results)
    png = args.out.with_suffix(".png")
    drew = chart(results, png)
    log("")
    log(table(results))
    log(f"\nwrote {args.out}" + (f" and {png}" if drew else "") + f" in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
