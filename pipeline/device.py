"""The device the Keras backend computes on: its numerics, pinned before the backend loads, and what it is, detected
once per process and passed on as a value.

Numerics (`pin_numerics`, run when the `pipeline` package is imported, before any module imports Keras): on a CPU,
TensorFlow's oneDNN picks its kernels by the processor's instruction set, and the head's training splits its sums
over as many threads as the machine has cores. Either changes the last bits of a weight, and after a few epochs a
choice made by cross-validation. So every process of the pipeline computes as an AVX2 machine with `THREADS` intra-op
threads, whatever it runs on: an AVX-512 server, a laptop with two cores and a 16-core worker give the same bytes.
A processor without AVX2 (oneDNN capped lower by ONEDNN_MAX_CPU_ISA) keeps its cap, and gets other numbers.
Setting TF_NUM_INTRAOP_THREADS yourself trades that for speed.

Stages print the device (`device: CPU (tensorflow backend)`), the fine-tune stage reads `accelerator` to decide
where it augments and which mixed-precision policy it takes, and the benchmarks record it beside their numbers.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

ISA = "AVX2"  # oneDNN's instruction-set cap: every x86-64 machine of the last decade has it
BELOW_ISA = ("SSE41", "AVX")  # caps that a machine without AVX2 needs: kept
THREADS = 2  # TensorFlow's intra-op threads: the reference machine's cores


def pin_numerics(env=os.environ) -> None:
    """Make the Keras/TensorFlow numerics of this process independent of the CPU's instruction set and core count
    (must run before TensorFlow loads; environment variables a caller set to a lower cap or a thread count win)."""
    if env.get("ONEDNN_MAX_CPU_ISA", "").upper() not in BELOW_ISA:
        env["ONEDNN_MAX_CPU_ISA"] = ISA
    env.setdefault("TF_NUM_INTRAOP_THREADS", str(THREADS))


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
