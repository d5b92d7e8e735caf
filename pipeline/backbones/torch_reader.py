"""Read a PyTorch checkpoint in the legacy (non-zip) format into numpy arrays, without torch.

The file is a sequence of pickles: a magic number, a protocol version, system info, the state dict (its tensors
refer to storages by persistent id), the list of storage keys; then, for each key in that order, an int64
element count and the raw little-endian bytes. A checkpoint is untrusted input, so the state dict is unpickled
by `SafeUnpickler`, which resolves only the few globals a state dict needs and refuses everything else.
"""
from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The checkpoint is malformed, truncated, or asks for something a state dict never needs."""


@dataclass(frozen=True, slots=True)
class StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name]).newbyteorder("<")


@dataclass(frozen=True, slots=True)
class Storage:
    """A reference to raw data that follows the pickles; filled in after the state dict is read."""
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True, slots=True)
class PendingTensor:
    storage: Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: remember where the tensor lives, build it later."""
    if not isinstance(storage, Storage):
        raise TorchFileError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    return PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class SafeUnpickler(pickle.Unpickler):
    """Unpickle a torch state dict: only the tensor rebuild, storage types and OrderedDict are allowed."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise TorchFileError(f"{self.source}: refused to load global '{module}.{name}': a PyTorch state dict "
                             f"never needs it, so the file is corrupt or malicious")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise TorchFileError(f"{self.source}: unexpected persistent id {pid!r:.200}")
        if len(pid) > 5 and pid[5] is not None:
            raise TorchFileError(f"{self.source}: storage views (pre-0.4 PyTorch files) are not supported")
        _, storage_type, key, _location, numel = pid[:5]
        return Storage(str(key), storage_type.dtype, int(numel))


def _unpickle(f, path: Path, what: str):
    try:
        return SafeUnpickler(f, str(path)).load()
    except TorchFileError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise TorchFileError(f"{path}: cannot read the {what} ({type(e).__name__}: {e}); "
                             f"the file is truncated or not a legacy PyTorch checkpoint") from None


def _tensor(t: PendingTensor, data: dict[str, np.ndarray], path: Path) -> np.ndarray:
    flat = data[t.storage.key]
    if len(t.size) != len(t.stride):
        raise TorchFileError(f"{path}: tensor size {t.size} and stride {t.stride} disagree")
    if any(s == 0 for s in t.size):
        return np.zeros(t.size, flat.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or min(t.stride, default=0) < 0 or last >= len(flat):
        raise TorchFileError(f"{path}: tensor (offset {t.offset}, size {t.size}, stride {t.stride}) reaches past "
                             f"its storage of {len(flat)} elements")
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size,
                                           strides=[s * flat.itemsize for s in t.stride], writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")


def _resolve(obj, data, path):
    if isinstance(obj, PendingTensor):
        return _tensor(obj, data, path)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _resolve(v, data, path)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, data, path) for v in obj)
    return obj


def _storages(obj, found: dict[str, Storage]):
    if isinstance(obj, PendingTensor):
        found[obj.storage.key] = obj.storage
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, found)
    return found


def load_state_dict(path: str | Path) -> collections.OrderedDict:
    """Read a legacy-format `.pth` state dict; return {name: numpy array} in the file's order."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            raise TorchFileError(f"{path}: this is a zip-format PyTorch file; only the legacy format is supported")
        f.seek(0)
        if _unpickle(f, path, "magic number") != MAGIC_NUMBER:
            raise TorchFileError(f"{path}: wrong magic number, not a legacy PyTorch checkpoint")
        if _unpickle(f, path, "protocol version") != PROTOCOL_VERSION:
            raise TorchFileError(f"{path}: unsupported protocol version")
        info = _unpickle(f, path, "system info")
        if not (isinstance(info, dict) and info.get("little_endian", False)):
            raise TorchFileError(f"{path}: only little-endian checkpoints are supported")
        state = _unpickle(f, path, "state dict")
        keys = _unpickle(f, path, "storage keys")
        wanted = _storages(state, {})
        if not isinstance(keys, list) or set(map(str, keys)) != set(wanted):
            raise TorchFileError(f"{path}: storage key list does not match the tensors of the state dict")
        data = {}
        for key in map(str, keys):
            storage = wanted[key]
            header = f.read(8)
            if len(header) < 8:
                raise TorchFileError(f"{path}: truncated: storage {key} is missing")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise TorchFileError(f"{path}: storage {key} holds {numel} elements, the state dict says {storage.numel}")
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) < numel * storage.dtype.itemsize:
                raise TorchFileError(f"{path}: truncated: storage {key} has {len(raw)} of "
                                     f"{numel * storage.dtype.itemsize} bytes")
            data[key] = np.frombuffer(raw, dtype=storage.dtype)
    return _resolve(state, data, path)
