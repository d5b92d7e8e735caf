"""Fine-tune stage: augmentation -> backbone -> the trained head, with the top of the backbone unfrozen.

The augmentation runs in the training loader on a CPU (Pillow, every core, uint8) and as the first layer of the
model on a GPU (`augment_in`); both draw the same random affine warps (`pipeline.augment`).

Phase order is enforced: the head stage must have trained a head on this backbone's features first (fine-tuning
under a random head wrecks the pretrained weights). BatchNorm layers stay in inference mode, the learning rate is
low, and the training images are reshuffled every epoch.
"""
from __future__ import annotations

import keras

from pipeline import augment, backbones, io, params, paths, tracking, train

MATCHING_KEYS = ("name", "weights", "cut_layer", "image_size")


class PhaseOrderError(RuntimeError):
    """Fine-tuning was asked for before a matching head was trained."""


def load_head(backbone: dict) -> keras.Model:
    """The trained head from the head stage, checked to belong to `backbone` (name, weights, cut layer, size)."""
    model_file, meta_file = paths.MODELS / "head.keras", paths.MODELS / "head.json"
    if not model_file.exists() or not meta_file.exists():
        raise PhaseOrderError(f"{model_file} not found: fine-tuning needs a trained head first (run `dvc repro head`)")
    meta = io.read_json(meta_file)
    wrong = {k: (meta.get(k), backbone[k]) for k in MATCHING_KEYS if meta.get(k) != backbone[k]}
    if wrong:
        raise PhaseOrderError(f"{model_file} was trained for another base ({wrong}, head vs now): "
                              "rerun `dvc repro head` before fine-tuning")
    return keras.saving.load_model(model_file)


def augment_where(p: params.Finetune, device: str) -> str:
    """'model' or 'loader' for `device` ('GPU' or 'CPU', as `train.device` says): see `augment.placement`."""
    return augment.placement(p.augment_in, device == "GPU")


def build(base: keras.Model, head: keras.Model, p: params.Finetune, seed: int, in_model: bool = True) -> keras.Model:
    inputs = keras.Input(base.input_shape[1:], name="image")
    x = augment.Augment(p.augment.model_dump(), seed=seed, name="augment")(inputs) if in_model else inputs
    x = base(x, training=False)  # BatchNorm in inference mode even while its neighbours train
    return keras.Model(inputs, head(x), name="finetune")


def main(argv=None) -> int:
    prm = params.load()
    bb, p = prm.backbone, prm.finetune
    meta = io.read_json(paths.CACHE_DIR / "meta.json")
    size, classes = meta["image_size"], meta["classes"]
    info = backbones.describe(bb.name, bb.weights, bb.cut_layer, size)
    head = load_head(info)
    with tracking.stage_run("finetune", {"backbone": bb.model_dump(), "finetune": p.model_dump(), "seed": prm.seed}) as run:
        device = train.device()
        if p.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16" if device == "GPU" else "mixed_bfloat16")
        keras.utils.set_random_seed(prm.seed)
        base = backbones.build_base(bb.name, bb.weights, size, bb.cut_layer)
        unfrozen = backbones.unfreeze_from(base, p.unfreeze_from, bb.name)
        where = augment_where(p, device)
        model = train.compile_for(build(base, head, p, prm.seed, in_model=where == "model"), len(classes), p.learning_rate)
        data = {s: io.load_pair(paths.CACHE_DIR / s) for s in paths.SPLITS}
        weights = train.class_weights(data["train"][1], len(classes), prm.head.class_weight)
        batches = {s: train.Batches(*data[s], p.batch_size, shuffle=s == "train", seed=prm.seed,
                                    weights=weights if s == "train" else None,
                                    steps=p.steps_per_epoch if s == "train" else None,
                                    augment=p.augment if s == "train" and where == "loader" else None)
                   for s in paths.SPLITS}
        print(f"finetune: {len(unfrozen)} layers unfrozen from '{unfrozen[0]}' (BatchNorm stays frozen); "
              f"augmentation in the {where}")
        history = train.fit(model, batches["train"], batches["val"], epochs=p.epochs, batch_size=p.batch_size,
                            patience=max(2, p.epochs), extra_callbacks=[tracking.keras_callback(run)])
        flips = train.flip_axes(p.augment)
        probs = {s: train.probabilities(model, batches[s], flips=flips) for s in ("val", "test")}
        train.save_model(model, "finetune", {**info, "classes": classes, "input": "images",
                                             "unfreeze_from": unfrozen[0], "augment_in": where}, flips)
        train.save_predictions("finetune", classes, (probs["val"], data["val"][1]), (probs["test"], data["test"][1]))
        tracking.log_files(run, paths.MODELS / "finetune.json", *train.save_history(history, "finetune"))
    print(f"finetune: best val_loss {history['val_loss'].min():.4f}, val_accuracy "
          f"{history.loc[history['val_loss'].idxmin(), 'val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
