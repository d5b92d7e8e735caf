"""Fine-tune stage: augmentation -> backbone -> the trained head, with the top of the backbone unfrozen.

Opt-in: dvc.yaml has a `finetune@head` stage only while `finetune.start_from: [head]` (the GPU recipe; on two CPU
cores its minutes bought less on validation than the head it starts from). It fine-tunes the head refit on
train+val, on train+val, for exactly `finetune.epochs` epochs, at the head's threshold: it is not cross-validated
(K fine-tunes cost K times the GPU time), so it has no CV figure and is never the model delivered by the rule.

The augmentation runs in the training loader on a CPU (OpenCV, every core, uint8) and as the first layer of the
model on a GPU (`augment_in`); both draw the same random affine warps (`pipeline.augment`).

Phase order is enforced: the head stage must have trained a head on this backbone's features first (fine-tuning
under a random head wrecks the pretrained weights); fine-tuning starts from that model's own backbone and head.
BatchNorm layers stay in inference mode, the learning rate is low, and the training images are reshuffled every
epoch. The delivered `models/finetune.keras` is image-in like every model (`pipeline.models`), without the
augmentation, its predictions averaged over the flips it was trained with.
"""
from __future__ import annotations

import argparse

import keras
import numpy as np

from pipeline import augment, backbones, curves, device, io, lineage, loader, models, params, paths, predictions, tracking, train

MATCHING_KEYS = ("name", "weights", "cut_layer")


class PhaseOrderError(RuntimeError):
    """Fine-tuning was asked for before a matching head was trained."""


def load_head(backbone: dict, image_size: int):
    """(features, head) of the head stage's model, checked to belong to `backbone` (name, weights, cut layer, size)."""
    if not models.path("head").exists() or not models.meta_path("head").exists():
        raise PhaseOrderError(f"{models.path('head')} not found: fine-tuning needs a trained head first (run `dvc repro head`)")
    model, meta = models.load("head")
    now = {**{k: backbone[k] for k in MATCHING_KEYS}, "image_size": image_size}
    was = {**{k: meta["backbone"].get(k) for k in MATCHING_KEYS}, "image_size": meta["image_size"]}
    wrong = {k: (was[k], now[k]) for k in now if was[k] != now[k]}
    if wrong:
        raise PhaseOrderError(f"{models.path('head')} was trained for another base ({wrong}, head vs now): "
                              "rerun `dvc repro head` before fine-tuning")
    return model.get_layer("features"), model.get_layer("classifier").get_layer("head")


def augmentation(p: params.Augment, design: dict) -> params.Augment:
    """The fine-tune augmentation with the flips left open (`null`) taken from the head's chosen design: a flip
    that cross-validation found not to help the head is not assumed to keep the label."""
    return p.model_copy(update={k: design[k] for k in ("horizontal_flip", "vertical_flip") if getattr(p, k) is None})


def augment_where(p: params.Finetune, dev: device.Device) -> str:
    """'model' or 'loader' on `dev` (`device.detect()`): see `augment.placement`."""
    return augment.placement(p.augment_in, dev.accelerator)


def build(base: keras.Model, head: keras.Model, p: params.Finetune, seed: int, in_model: bool = True) -> keras.Model:
    inputs = keras.Input(base.input_shape[1:], name="image")
    x = augment.Augment(p.augment.model_dump(), seed=seed, name="augment")(inputs) if in_model else inputs
    x = base(x, training=False)  # BatchNorm in inference mode even while its neighbours train
    return keras.Model(inputs, head(x), name="finetune")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.finetune")
    ap.add_argument("--start-from", choices=["head"], default="head", help="the model to fine-tune (finetune.start_from)")
    ap.parse_args(argv)
    prm = params.load()
    bb, p = prm.backbone, prm.finetune
    meta = io.read_json(paths.CACHE_DIR / "meta.json")
    size, classes = meta["image_size"], meta["classes"]
    info = backbones.describe(bb.name, bb.weights, bb.cut_layer, size)
    with tracking.stage_run("finetune", {"backbone": bb.model_dump(), "finetune": p.model_dump(), "seed": prm.seed}) as run:
        dev = device.detect()
        print(f"device: {dev}")
        if p.mixed_precision:  # before the model is loaded, so that its layers take the policy
            keras.mixed_precision.set_global_policy(dev.mixed_policy)
        train.seed(prm.seed)  # before loading: the loaded layers' random streams (dropout) take their seeds here
        base, head = load_head(info, size)
        p = p.model_copy(update={"augment": augmentation(p.augment, models.read_meta("head")["design"])})
        train.seed(prm.seed)
        unfrozen = backbones.unfreeze_from(base, p.unfreeze_from, bb.name)
        where = augment_where(p, dev)
        model = train.compile_for(build(base, head, p, prm.seed, in_model=where == "model"), len(classes), p.learning_rate)
        parts = [io.load_pair(paths.CACHE_DIR / s) for s in ("train", "val")]  # everything that is not test
        x, y = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
        weights = train.class_weights(y, len(classes), prm.head.class_weight)
        batches = loader.Batches(x, y, p.batch_size, shuffle=True, seed=prm.seed, weights=weights,
                                 steps=p.steps_per_epoch, augment=p.augment if where == "loader" else None)
        print(f"finetune: {len(unfrozen)} layers unfrozen from '{unfrozen[0]}' (BatchNorm stays frozen); "
              f"augmentation in the {where}; {len(y)} train+val images")
        history = train.fit(model, batches, None, epochs=p.epochs, batch_size=p.batch_size, patience=p.epochs,
                            extra_callbacks=[tracking.keras_callback(run)])
        flips = models.flip_axes(p.augment)
        delivered = models.compose(base, [head], image_flips=flips, name="finetune")
        test_x, test_y = io.load_pair(paths.CACHE_DIR / "test")
        test_prob = models.predict(delivered, test_x, p.batch_size)  # for the report; chooses nothing
        models.save(delivered, "finetune", models.meta_for(
            "finetune", classes=classes, threshold=models.read_meta("head")["threshold"],
            image_size=size, backbone={k: info[k] for k in ("name", "label", "weights", "cut_layer")},
            image_flips=flips, map_flips=[()], lineage=lineage.describe("finetune"),
            unfreeze_from=unfrozen[0], augment_in=where))
        predictions.save("finetune", classes, None, (test_prob, test_y))
        tracking.log_files(run, models.meta_path("finetune"), *curves.save(history, "finetune", run, y))
    print(f"finetune: {len(history)} epochs, final training loss {history['loss'].iloc[-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
