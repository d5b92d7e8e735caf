"""Backbones: the torch-free checkpoint reader, the EfficientNet-Lite0/1/2 conversions (checked on real cat/dog
photos), the
HED-trained VGG16 trunk, preprocessing inside the models, and the errors a wrong param gets."""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pipeline import backbones
from pipeline.backbones import efficientnet_lite, torch_reader, vgg16

PHOTOS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cats_vs_dogs_small"
CAT_CLASSES = range(281, 286)    # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
DOG_CLASSES = range(151, 269)    # ImageNet: the dog breeds


@pytest.fixture(scope="module", autouse=True)
def weights_dir(tmp_path_factory):
    """Converted weights go to a temporary directory, never the project's `.weights/`."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("weights")
        mp.setenv("PIPELINE_WEIGHTS_DIR", str(path))
        yield path


# ------------------------------------------------------------------------------------ legacy checkpoint files

def _legacy_header() -> bytes:
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(o, protocol=2) for o in (torch_reader.MAGIC_NUMBER, 1001, info))


def _write_legacy(path: Path, tensors: dict, storages: dict) -> None:
    """Write a legacy-format checkpoint as torch.save does, with a stand-in `torch` module (torch is not installed).

    tensors: {name: (storage key, offset, size, stride)}; storages: {key: float32 array}.
    """
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, torch._utils, utils._rebuild_tensor_v2 = FloatStorage, utils, _rebuild_tensor_v2

    class StorageRef:
        def __init__(self, key):
            self.key = key

    class Tensor:
        def __init__(self, key, offset, size, stride):
            self.args = (StorageRef(key), offset, tuple(size), tuple(stride), False, {})

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", FloatStorage, obj.key, "cpu", storages[obj.key].size)
            return None

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        with open(path, "wb") as f:
            f.write(_legacy_header())
            Pickler(f, protocol=2).dump({name: Tensor(*spec) for name, spec in tensors.items()})
            pickle.dump(list(storages), f, protocol=2)
            for key, arr in storages.items():
                f.write(np.int64(arr.size).tobytes() + arr.astype("<f4").tobytes())
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


def test_reader_rebuilds_offset_and_strides(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    path = tmp_path / "small.pth"
    _write_legacy(path, {"whole": ("0", 0, (3, 4), (4, 1)), "view": ("0", 2, (2, 3), (1, 2)),
                         "scalar": ("0", 5, (), ())}, {"0": storage})
    state = torch_reader.load_state_dict(path)
    assert list(state) == ["whole", "view", "scalar"]
    np.testing.assert_array_equal(state["whole"], storage.reshape(3, 4))
    np.testing.assert_array_equal(state["view"], [[2, 4, 6], [3, 5, 7]])
    assert state["scalar"].shape == () and state["scalar"] == 5
    assert all(a.flags.c_contiguous and a.flags.writeable for a in state.values())


def test_reader_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_header() + pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(torch_reader.TorchFileError, match=r"refused to load global '(posix|os|nt)\.system'") as e:
        torch_reader.load_state_dict(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_reader_refuses_globals_inside_a_state_dict(tmp_path):
    path = tmp_path / "evil2.pth"
    payload = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."   # eval("1+1") in a hand-written pickle
    path.write_bytes(_legacy_header() + payload)
    with pytest.raises(torch_reader.TorchFileError, match=r"builtins\.eval"):
        torch_reader.load_state_dict(path)


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.9999], ids=["in-header", "in-storages", "last-byte"])
def test_reader_reports_truncated_file(tmp_path, keep):
    data = Path(efficientnet_lite.LITE0.pth_path()).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(torch_reader.TorchFileError, match="truncated") as e:
        torch_reader.load_state_dict(path)
    assert str(path) in str(e.value)


def test_reader_reads_lite0_checkpoint():
    state = torch_reader.load_state_dict(efficientnet_lite.LITE0.pth_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0

def test_lite0_conversion_maps_every_tensor():
    model = backbones.full_model("efficientnet_lite0")
    state = torch_reader.load_state_dict(efficientnet_lite.LITE0.pth_path())
    n_state = sum(a.size for k, a in state.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == n_state == 4_694_024
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("block6a_dwconv").get_weights()[0],
                                  state["_blocks.11._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    gamma, beta, mean, var = model.get_layer("block7a_project_bn").get_weights()
    np.testing.assert_array_equal(var, state["_blocks.15._bn2.running_var"])
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_array_equal(kernel, state["_fc.weight"].T)


def test_lite0_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    first = backbones.build_base("efficientnet_lite0", image_size=32)
    (cached,) = tmp_path.glob("*.weights.h5")
    stamp = cached.stat().st_mtime_ns

    def no_reading(path):
        raise AssertionError(f"{path} read again although converted weights are cached")

    monkeypatch.setattr(torch_reader, "load_state_dict", no_reading)
    second = backbones.build_base("efficientnet_lite0", image_size=32)
    assert cached.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]     # no temp files left behind
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def _photos(split: str, cls: str, start: int, n: int, size: int = 224) -> np.ndarray:
    from PIL import Image

    folder = PHOTOS / split / cls
    if not folder.is_dir():
        pytest.skip(f"cats-vs-dogs photos not found at {folder}")
    paths = sorted(folder.glob("*.jpg"))[start:start + n]
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
                     for p in paths])


@pytest.fixture(scope="module")
def lite0():
    return backbones.full_model("efficientnet_lite0")


# Lite1 and Lite2 scale Lite0's depth and width; same file layout, same converter. Parameter counts (with the
# 1000-way classifier) are every tensor of the PyTorch files; blocks per stage 1,2,2,3,3,4,1 vs 1,3,3,4,4,5,1.
LITES = {"efficientnet_lite0": (4_694_024, "block5c_add", 112), "efficientnet_lite1": (5_470_344, "block5d_add", 112),
         "efficientnet_lite2": (6_150_168, "block5d_add", 120)}


@pytest.mark.slow
@pytest.mark.parametrize("name", LITES)
def test_lite_imagenet_head_names_cats_and_dogs(name):
    # Lite0: over 200 + 200 photos per split 86-90 % land in range (a few cats go to dog classes, e.g.
    # schipperke); these 80 fixed photos give 71/80 (Lite0), 74/80 (Lite1), 72/80 (Lite2).
    model = backbones.full_model(name)
    params, cut, channels = LITES[name]
    assert model.count_params() == params
    assert model.get_layer(cut).output.shape[-1] == channels
    cats, dogs = _photos("train", "cats", 0, 40), _photos("train", "dogs", 0, 40)
    top_cats = model.predict(cats, batch_size=40, verbose=0).argmax(1)
    top_dogs = model.predict(dogs, batch_size=40, verbose=0).argmax(1)
    right = np.isin(top_cats, CAT_CLASSES).sum() + np.isin(top_dogs, DOG_CLASSES).sum()
    assert right / 80 >= 0.80, f"{name}: only {right}/80 photos in the right ImageNet classes: {top_cats} {top_dogs}"


@pytest.mark.slow
def test_lite0_pooled_features_separate_cats_and_dogs(lite0):
    from sklearn.linear_model import LogisticRegression

    pooled = keras.Model(lite0.inputs, lite0.get_layer("avg_pool").output)

    def features(split):
        x = np.concatenate([_photos(split, "cats", 0, 100), _photos(split, "dogs", 0, 100)])
        return pooled.predict(x, batch_size=50, verbose=0), np.repeat([0, 1], 100)

    (x_train, y_train), (x_test, y_test) = features("train"), features("test")
    assert x_train.shape == (200, 1280)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    accuracy = clf.score(x_test, y_test)
    assert accuracy >= 0.95, f"linear probe on Lite0 features: {accuracy:.3f}"


def test_lite0_preprocessing_inside_model():
    model = backbones.build_base("efficientnet_lite0", weights="none", image_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    pre = keras.Model(model.inputs, model.get_layer("preprocess").output)
    np.testing.assert_allclose(pre.predict(x, verbose=0), (x - 127) / 128, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ VGG16

def test_vgg16_hed_weights_land_on_all_13_convolutions():
    model = backbones.full_model("vgg16")
    assert model.count_params() == 14_714_688
    with h5py.File(vgg16.hed_weights_path(), "r") as f:
        np.testing.assert_array_equal(model.get_layer("block1_conv1").get_weights()[0],
                                      f["block1/layers/conv2d/vars/0"][()])
        np.testing.assert_array_equal(model.get_layer("block5_conv3").get_weights()[1],
                                      f["block5/layers/conv2d_2/vars/1"][()])
    hed = vgg16.read_hed()
    assert sorted(hed) == sorted(vgg16.CONV_LAYERS) and len(hed) == 13
    for name, (kernel, bias) in hed.items():
        got_kernel, got_bias = model.get_layer(name).get_weights()
        np.testing.assert_array_equal(got_kernel, kernel)
        np.testing.assert_array_equal(got_bias, bias)
    assert backbones.label("vgg16") == "VGG16 (HED-trained trunk)"
    assert backbones.label("vgg16", "imagenet") == "VGG16 (ImageNet)"


def test_vgg16_preprocessing_matches_keras(tmp_path):
    model = backbones.build_base("vgg16", weights="none", image_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    pre = keras.Model(model.inputs, model.get_layer("preprocess").output)
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(pre.predict(x, verbose=0), expected, atol=1e-4)
    pre.save(tmp_path / "pre.keras")   # the custom layer survives saving and loading
    reloaded = keras.saving.load_model(tmp_path / "pre.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=1e-4)


# ------------------------------------------------------------------------------------------- shapes and errors

@pytest.mark.parametrize("name, weights, size, shape", [
    ("efficientnet_lite0", "none", 32, (2, 2, 112)),   # block5c_add: 1/16 of the input, 112 channels
    ("efficientnet_lite0", "none", 64, (4, 4, 112)),
    ("efficientnet_lite2", "none", 64, (4, 4, 120)),   # block5d_add: Lite2 is 1.1x wider
    ("vgg16", "default", 32, (2, 2, 512)),
    ("vgg16", "none", 64, (4, 4, 512)),
    ("small_cnn", "default", 64, (2, 2, 128)),
])
def test_build_base_output_shape(name, weights, size, shape):
    model = backbones.build_base(name, weights, image_size=size)
    assert model.output.shape[1:] == shape
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    assert model.predict(x, verbose=0).shape == (2, *shape)
    assert model.layers[1].name == "preprocess"


def test_spec_layers_exist():
    for name in backbones.names():
        s = backbones.spec(name)
        model = backbones.full_model(name, "none", image_size=64)
        names = [l.name for l in model.layers]
        assert names.index(s.default_unfreeze) < names.index(s.default_cut)


def test_custom_cut_and_unfreeze():
    base = backbones.build_base("vgg16", "none", image_size=32, cut_layer="block3_pool")
    assert base.output.shape[1:] == (4, 4, 256)
    with pytest.raises(ValueError, match="finetune.unfreeze_from 'block4_conv1'"):   # above this cut
        backbones.unfreeze_from(base, None, "vgg16")
    trainable = backbones.unfreeze_from(base, "block3_conv1", "vgg16")
    assert trainable == ["block3_conv1", "block3_conv2", "block3_conv3", "block3_pool"]
    assert not base.get_layer("block2_conv2").trainable and base.get_layer("block3_conv1").trainable


def test_unknown_cut_layer_lists_valid_names():
    with pytest.raises(ValueError, match="backbone.cut_layer 'block9_pool'") as e:
        backbones.build_base("vgg16", "none", image_size=32, cut_layer="block9_pool")
    assert "block4_pool" in str(e.value) and "block5_conv3" in str(e.value)
    with pytest.raises(ValueError, match="backbone.cut_layer.*top_activation"):
        backbones.build_base("efficientnet_lite0", "none", image_size=32, cut_layer="predictions")


def test_weights_errors(tmp_path):
    with pytest.raises(ValueError, match="backbone.weights 'imagnet' is unknown"):
        backbones.build_base("vgg16", "imagnet", image_size=32)
    with pytest.raises(ValueError, match="not available for backbone 'small_cnn'"):
        backbones.build_base("small_cnn", "imagenet", image_size=64)
    with pytest.raises(FileNotFoundError, match="backbone.weights"):
        backbones.build_base("vgg16", str(tmp_path / "missing.weights.h5"), image_size=32)
    with pytest.raises(ValueError, match="backbone.name 'resnet'"):
        backbones.spec("resnet")
    with pytest.raises(ValueError, match="cache.image_size 32 is too small"):
        backbones.build_base("small_cnn", image_size=32)


def test_weights_from_file(tmp_path):
    source = backbones.full_model("small_cnn", image_size=64)
    path = tmp_path / "cnn.weights.h5"
    source.save_weights(path)
    loaded = backbones.build_base("small_cnn", str(path), image_size=64)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), source.predict(x, verbose=0), atol=1e-6)
    assert backbones.describe("small_cnn", str(path))["weights_resolved"] == str(path)
    assert backbones.label("small_cnn", str(path)) == "Small CNN (weights from cnn.weights.h5)"
    with pytest.raises(ValueError, match="does not fit backbone 'vgg16'"):
        backbones.build_base("vgg16", str(path), image_size=32)


def test_describe_is_json_able():
    import json

    for name in backbones.names():
        d = backbones.describe(name)
        assert json.loads(json.dumps(d)) == d
        assert {"name", "label", "weights", "preprocessing"} <= set(d)
    assert backbones.describe("efficientnet_lite0", "none")["label"] == "EfficientNet-Lite0 (random init)"


# ------------------------------------------------------------------------------------------------- the registry

def test_registry_is_the_only_list_of_backbones():
    from pipeline import params

    assert backbones.names() == sorted(backbones.MODULES) == [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "small_cnn", "vgg16"]
    for name in backbones.MODULES:
        owner = backbones.get(name)
        assert owner.SPEC.name == name and backbones.spec(name) is owner.SPEC
        assert params.parse({"backbone": {"name": name}}).backbone.name == name
    assert params.Backbone().name in backbones.names()
    with pytest.raises(params.ParamsError, match=r"\n  backbone\.name: 'resnet' is unknown; choose one of "
                                                 r"\['efficientnet_lite0', 'efficientnet_lite1', "
                                                 r"'efficientnet_lite2', 'small_cnn', 'vgg16'\]\n"):
        params.parse({"backbone": {"name": "resnet"}})
    with pytest.raises(ValueError, match=r"backbone.name 'resnet' is unknown; choose one of \['efficientnet_lite0'"):
        backbones.build_base("resnet")


def test_a_new_backbone_is_one_module_and_one_entry(monkeypatch):
    from pipeline import params

    def build(image_size, weights):
        inputs = keras.Input((image_size, image_size, 3), name="image")
        x = keras.layers.Rescaling(1 / 255, name="preprocess")(inputs)
        x = keras.layers.Conv2D(4, 3, name="conv")(x)
        return keras.Model(inputs, keras.layers.MaxPooling2D(2, name="pool")(x), name="tiny")

    tiny = types.SimpleNamespace(build=build, SPEC=backbones.Spec(
        "tiny", "Tiny", "pool", "conv", 8, "x / 255", weights={"default": "none", "none": "none"},
        sources={"none": "random init"}))
    monkeypatch.setitem(sys.modules, "pipeline.backbones.tiny", tiny)  # as if pipeline/backbones/tiny.py existed
    monkeypatch.setitem(backbones.MODULES, "tiny", "tiny")
    assert params.parse({"backbone": {"name": "tiny"}}).backbone.name == "tiny"
    assert backbones.describe("tiny", image_size=16) == {
        "name": "tiny", "label": "Tiny (random init)", "weights": "default", "weights_resolved": "none",
        "preprocessing": "x / 255", "input": "RGB float 0..255, preprocessing inside the model", "cut_layer": "pool",
        "image_size": 16}
    base = backbones.build_base("tiny", image_size=16)
    assert base.name == "tiny_base" and base.output.shape[1:] == (7, 7, 4)
    assert backbones.unfreeze_from(base, None, "tiny") == ["conv", "pool"]
    with pytest.raises(ValueError, match="backbone.weights 'hed' is not available for backbone 'tiny'$"):
        backbones.build_base("tiny", "hed", image_size=16)


def test_unfreeze_from_takes_the_backbone_name_not_the_model_name():
    base = backbones.build_base("vgg16", "none", image_size=32)
    renamed = keras.Model(base.inputs, base.outputs, name="anything")
    assert backbones.unfreeze_from(renamed, None, "vgg16")[:2] == ["block4_conv1", "block4_conv2"]
    with pytest.raises(TypeError):
        backbones.unfreeze_from(base, None)   # the name is required


def test_params_import_stays_free_of_keras():
    """Light stages (sources, split, validate, cache) load params without importing Keras, though `backbone.name`
    is checked against the registry."""
    import subprocess

    code = "import sys, pipeline.params as p; p.parse({'backbone': {'name': 'vgg16'}}); sys.exit('keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_a_saved_vgg16_model_loads_without_importing_its_module_first(tmp_path):
    """`models.custom_objects()` carries the backbones' custom layers (vgg16's CaffePreprocess), so `predict` and
    serving, which import only `pipeline.models`, can load a vgg16 model."""
    import subprocess

    backbones.build_base("vgg16", "none", image_size=32).save(tmp_path / "base.keras")
    code = ("import sys, keras, numpy as np; from pipeline import models; "
            f"m = keras.saving.load_model(r'{tmp_path / 'base.keras'}', custom_objects=models.custom_objects()); "
            "print(m.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 2, 2, 512)")
