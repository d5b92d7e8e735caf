"""Frozen feature extractors ("backbones") shared by the extract, finetune and predict stages: the registry.

`MODULES` is the one list of backbones: the name `backbone.name` takes, and the module of this package that owns
everything about it (or `module:ATTR`, an object of a module that holds a family, such as the EfficientNet-Lite
variants): `SPEC` (a `core.Spec`: default cut and unfreeze layers, preprocessing, the weights it
accepts), `build(image_size, weights)` and, when it has custom Keras layers, `CUSTOM_OBJECTS`. Adding a backbone is
one new module and one line here. The generic machinery lives in `core` and is re-exported, so callers use
`backbones.build_base(...)`, `backbones.describe(...)`, ...

Modules are imported when first asked for, so importing this package (and `pipeline.params`, which checks
`backbone.name` against `names()`) does not import Keras.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pipeline.backbones.core import (NAMED_WEIGHTS, RANDOM_INIT_SEED, Spec, build_base, build_extractor, check_layer,
                                     cut_layers, describe, full_model, label, resolve_weights, unfreeze_from)

MODULES = {
    "efficientnet_lite0": "efficientnet_lite:LITE0",
    "efficientnet_lite1": "efficientnet_lite:LITE1",
    "efficientnet_lite2": "efficientnet_lite:LITE2",
    "vgg16": "vgg16",
    "small_cnn": "small_cnn",
}

__all__ = ["MODULES", "NAMED_WEIGHTS", "RANDOM_INIT_SEED", "Spec", "build_base", "build_extractor", "check_layer",
           "custom_objects", "cut_layers", "describe", "full_model", "get", "label", "names", "resolve_weights", "spec", "unfreeze_from"]


def names() -> list[str]:
    return sorted(MODULES)


def get(name: str) -> ModuleType | Any:
    """The module (or family member, e.g. `efficientnet_lite.LITE1`) of backbone `name`: what has its `SPEC` and
    `build`."""
    if name not in MODULES:
        raise ValueError(f"backbone.name '{name}' is unknown; choose one of {names()}")
    module_name, _, attr = MODULES[name].partition(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    owner = getattr(module, attr) if attr else module
    if owner.SPEC.name != name:
        raise RuntimeError(f"{MODULES[name]} describes backbone '{owner.SPEC.name}', not '{name}': fix MODULES")
    return owner


def spec(name: str) -> Spec:
    return get(name).SPEC


def custom_objects() -> dict:
    """The custom Keras layers of every backbone, by name: what loading a saved model that holds one needs."""
    return {k: v for n in names() for k, v in getattr(get(n), "CUSTOM_OBJECTS", {}).items()}
