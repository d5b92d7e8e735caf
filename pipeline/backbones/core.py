"""The generic backbone machinery: weights, labels, the base model up to a cut, fine-tuning's unfreezing.

Nothing here knows a particular backbone. Each backbone module owns a `Spec` (`SPEC`) and a
`build(image_size, weights)`; the registry (`pipeline.backbones`) finds a module by name, and every function
here takes that name and asks the registry.

Every backbone takes raw RGB pixels in 0..255 (float) and carries its own preprocessing as its first layer
(named `preprocess`), so a saved model never depends on the caller knowing it.

Keras is imported inside the functions that build or inspect models, so that the registry (and `pipeline.params`,
which asks it for the backbones' names) stays light to import.

Weights: "default" (offline, shipped with a package), "imagenet", "none" (random init), a name only one backbone
has (vgg16's "hed"), or the path of a `.weights.h5` file saved from `full_model(name, ...)`. Each spec's
`weights` table says which names it accepts and what they load.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

NAMED_WEIGHTS = ("default", "imagenet", "none")
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Spec:
    name: str
    human_name: str           # e.g. "VGG16"; `label()` adds where the weights come from
    default_cut: str          # layer whose output the extract stage stores
    default_unfreeze: str     # first layer made trainable by fine-tuning (everything from it upward)
    min_size: int             # smallest image_size the architecture accepts
    preprocessing: str        # what the `preprocess` layer does
    weights: dict[str, str]   # accepted `backbone.weights` names -> what `build` loads ('none': random init)
    sources: dict[str, str]   # what `build` loads -> its words in the label, e.g. 'hed' -> 'HED-trained trunk'
    weights_hint: str = ""    # why a weights name is missing from `weights`, added to that error
    top: str = ""             # the last feature map, which the pooled head design averages ("" = default_cut)

    @property
    def top_layer(self) -> str:
        return self.top or self.default_cut


def _registry() -> ModuleType:
    """`pipeline.backbones`, imported on use: it imports this module."""
    from pipeline import backbones

    return backbones


def _backbone(name: str) -> ModuleType:
    return _registry().get(name)


def _resolve(s: Spec, weights: str) -> str:
    weights = str(weights)
    if weights in s.weights:
        return s.weights[weights]
    if weights in NAMED_WEIGHTS or _named_elsewhere(weights):
        raise ValueError(f"backbone.weights '{weights}' is not available for backbone '{s.name}'"
                         + (f": {s.weights_hint}" if s.weights_hint else ""))
    if not weights.endswith(".weights.h5"):
        raise ValueError(f"backbone.weights '{weights}' is unknown: use one of {list(NAMED_WEIGHTS)} "
                         f"or the path of a .weights.h5 file")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"backbone.weights: file '{weights}' not found")
    return weights


def _named_elsewhere(weights: str) -> bool:
    """Whether another backbone accepts `weights` by name (then it is no typo, just not this backbone's)."""
    registry = _registry()
    return any(weights in registry.spec(n).weights for n in registry.names())


def _cut(s: Spec, cut_layer: str | None) -> str:
    return cut_layer or s.default_cut


def _label(s: Spec, resolved: str) -> str:
    return f"{s.human_name} ({s.sources.get(resolved) or f'weights from {Path(resolved).name}'})"


def resolve_weights(name: str, weights: str) -> str:
    """Map `weights` to what is actually loaded: a value of the spec's `weights` table, or a checked file path."""
    return _resolve(_backbone(name).SPEC, weights)


def label(name: str, weights: str = "default") -> str:
    """An honest human label, e.g. 'VGG16 (HED-trained trunk)' or 'VGG16 (ImageNet)'."""
    s = _backbone(name).SPEC
    return _label(s, _resolve(s, weights))


def describe(name: str, weights: str = "default", cut_layer: str | None = None, image_size: int | None = None) -> dict:
    """Small JSON-able description of a backbone, for model metadata (cut layer resolved to the default)."""
    s = _backbone(name).SPEC
    resolved = _resolve(s, weights)
    out = {"name": name, "label": _label(s, resolved), "weights": str(weights), "weights_resolved": resolved,
           "preprocessing": s.preprocessing, "input": "RGB float 0..255, preprocessing inside the model",
           "cut_layer": _cut(s, cut_layer)}
    return out if image_size is None else {**out, "image_size": image_size}


def full_model(name: str, weights: str = "default", image_size: int = 224) -> keras.Model:
    """The whole backbone as its module builds it (Lite0: with its 1000-way ImageNet head), weights loaded."""
    return _full_model(_backbone(name), weights, image_size)


def _full_model(backbone: ModuleType, weights: str, image_size: int) -> keras.Model:
    import keras

    s = backbone.SPEC
    resolved = _resolve(s, weights)
    if image_size < s.min_size:
        raise ValueError(f"cache.image_size {image_size} is too small for backbone '{s.name}' (at least {s.min_size})")
    if resolved == "none":  # a random-init base must come out the same at extract, finetune and predict
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
    from_file = resolved not in s.weights.values()
    model = backbone.build(image_size, "none" if from_file else resolved)
    if from_file:
        _load_weights_file(model, resolved, s.name)
    return model


def _load_weights_file(model: keras.Model, path: str, name: str) -> None:
    """Load a `.weights.h5` strictly: Keras only warns about parts it skips, here that is an error."""
    problem = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except Exception as e:
            problem = str(e)
    problem = problem or next((str(c.message) for c in caught if issubclass(c.category, UserWarning)), None)
    if problem:
        first = problem.strip().split("\n")[0][:300]
        raise ValueError(f"backbone.weights '{path}' does not fit backbone '{name}' (expected weights saved from "
                         f"pipeline.backbones.full_model('{name}')): {first}")


def cut_layers(model: keras.Model) -> list[str]:
    """Names of the layers that can be a cut: those with a 4-D feature-map output (not the input)."""
    import keras

    return [l.name for l in model.layers
            if not isinstance(l, keras.layers.InputLayer) and len(l.output.shape) == 4]


def check_layer(model: keras.Model, layer: str, param: str) -> None:
    valid = cut_layers(model)
    if layer not in valid:
        raise ValueError(f"{param} '{layer}' is not a layer of backbone '{model.name}' with a feature-map output; "
                         f"valid names: {', '.join(valid)}")


def build_base(name: str, weights: str = "default", image_size: int = 224, cut_layer: str | None = None,
               pooled: bool = False) -> keras.Model:
    """The backbone from raw pixels to the 4-D feature map at `cut_layer` (default: the spec's `default_cut`) or,
    with `pooled`, to the vector of its top map (`Spec.top`) averaged over the positions.

    The model is named `{name}_base` (`{name}_pooled_base`): saved model files contain that name.
    """
    import keras

    map_model = build_extractor(name, weights, image_size, cut_layer)
    output = map_model.outputs[1 if pooled else 0]
    return keras.Model(map_model.inputs, output, name=f"{name}_pooled_base" if pooled else f"{name}_base")


def build_extractor(name: str, weights: str = "default", image_size: int = 224,
                    cut_layer: str | None = None) -> keras.Model:
    """One forward pass, two outputs: the feature map at the cut and the pooled top (see `build_base`); what the
    extract stage stores, so that the head stage can choose between its designs without a second pass."""
    import keras

    backbone = _backbone(name)
    cut, top = _cut(backbone.SPEC, cut_layer), backbone.SPEC.top_layer
    model = _full_model(backbone, weights, image_size)
    check_layer(model, cut, "backbone.cut_layer")
    pooled = keras.layers.GlobalAveragePooling2D(name="top_pool")(model.get_layer(top).output)
    return keras.Model(model.inputs, [model.get_layer(cut).output, pooled], name=f"{name}_extractor")


def unfreeze_from(base: keras.Model, layer: str | None, name: str) -> list[str]:
    """Make `base` of backbone `name` trainable from `layer` (default: the spec's `default_unfreeze`) upward;
    return those layers' names.

    BatchNormalization layers stay frozen: fine-tuning should also call the base with training=False.
    """
    import keras

    layer = layer or _backbone(name).SPEC.default_unfreeze
    check_layer(base, layer, "finetune.unfreeze_from")
    names = [l.name for l in base.layers]
    start = names.index(layer)
    base.trainable = True
    for i, l in enumerate(base.layers):
        l.trainable = i >= start and not isinstance(l, keras.layers.BatchNormalization)
    return names[start:]
