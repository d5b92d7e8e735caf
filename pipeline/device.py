"""The device the Keras backend computes on, detected once per process and passed on as a value.

Stages print it (`device: CPU (tensorflow backend)`), the fine-tune stage reads `accelerator` to decide where it
augments and which mixed-precision policy it takes, and the benchmarks record it beside their numbers.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    backend: str                  # the Keras backend: tensorflow, jax, torch
    backend_version: str
    kind: str                     # "GPU" when the backend sees an accelerator, else "CPU"
    devices: tuple[str, ...]      # what the backend lists, e.g. ("gpu:NVIDIA H100",)

    @property
    def accelerator(self) -> bool:
        return self.kind != "CPU"

    @property
    def mixed_policy(self) -> str:
        """The mixed-precision policy for this device: float16 on a GPU, bfloat16 on a CPU."""
        return "mixed_float16" if self.accelerator else "mixed_bfloat16"

    def __str__(self) -> str:
        return f"{self.kind} ({self.backend} backend)"


@functools.lru_cache(maxsize=None)
def detect() -> Device:
    """What the current Keras backend computes on (cached: the answer does not change within a process)."""
    import keras

    backend, version, devices, accelerator = keras.backend.backend(), "", (), False
    with contextlib.suppress(Exception):
        if backend == "tensorflow":
            import tensorflow as tf

            version = tf.__version__
            found = tf.config.list_physical_devices()
            devices = tuple(f"{d.device_type}:{d.name}" for d in found)
            accelerator = any(d.device_type == "GPU" for d in found)
        elif backend == "jax":
            import jax

            version = jax.__version__
            found = jax.devices()
            devices = tuple(f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in found)
            accelerator = any(d.platform == "gpu" for d in found)
        elif backend == "torch":
            import torch

            version = torch.__version__
            accelerator = torch.cuda.is_available()
            devices = tuple(f"cuda:{torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())) or ("cpu",)
    return Device(backend, version, "GPU" if accelerator else "CPU", devices)
