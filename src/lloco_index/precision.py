"""One precision policy for every computation: compression, training, finetuning and generation.

Weights stay float32 on the CPU and are bf16 (fp16 before Ampere) on GPUs
(:func:`lloco_index.models.select_dtype`). What this module decides is the
*compute* precision: whether matmuls run under bf16 autocast.

On a CPU, bf16 autocast is only a win where the hardware multiplies bf16
natively (AMX or AVX512-BF16): measured with one thread, a 256x576 @ 576x1536
matmul ran 2.1x faster under bf16 autocast on an AVX512-BF16 EPYC, and 35-50x
*slower* on an AVX2-only CPU, where every bf16 product is emulated. So:

1. an explicit request wins: a ``dtype=`` keyword, else :func:`set_precision`
   (what the CLI's ``--dtype`` calls), else ``$LLOCO_DTYPE``;
2. ``"auto"`` (the default) reads the CPU's flags: AMX/AVX512-BF16 -> bf16,
   an x86 CPU without them -> float32;
3. where the flags do not say (another OS or architecture), a one-off
   micro-benchmark decides, cached per machine under the cache directory.

Token-by-token generation on the CPU stays float32 under ``"auto"``: each
decode step is a tiny matmul that pays the casts without the gain (measured
3-5x slower decode steps under autocast on a bf16 CPU); an explicit
``bfloat16`` request still turns it on.

Check what a machine runs with ``lloco-index precision`` or
``python -c "import lloco_index; print(lloco_index.describe_precision())"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from . import defaults

logger = logging.getLogger(__name__)

CHOICES = ("auto", "float32", "bfloat16")
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}
# Flags that mean the CPU has native bf16 dot products (x86: AMX tiles or AVX512-BF16; Arm: the BF16 extension).
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})

_process_choice: Optional[str] = None
_decision_cache: dict[str, bool] = {}
_announced = False


def normalise(value: Union[str, torch.dtype, None]) -> Optional[str]:
    """``"bf16"``/``torch.bfloat16``/``"float32"``/... -> one of :data:`CHOICES` (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(value, str(value))
    text = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if text not in CHOICES:
        raise ValueError(
            f"Unknown precision {value!r}: use one of {', '.join(CHOICES)} (--dtype / ${defaults.DTYPE_ENV} / "
            f"set_precision())."
        )
    return text


def set_precision(value: Union[str, torch.dtype, None]) -> None:
    """Set this process's precision (``"auto"``, ``"float32"``, ``"bfloat16"``; ``None`` clears it).

    >>> import lloco_index
    >>> lloco_index.set_precision("float32")    # e.g. for bit-for-bit comparisons
    """
    global _process_choice
    _process_choice = normalise(value)


def requested(value: Union[str, torch.dtype, None] = None) -> str:
    """The precision asked for: the keyword, else :func:`set_precision`, else ``$LLOCO_DTYPE``, else auto."""
    return normalise(value) or _process_choice or normalise(os.environ.get(defaults.DTYPE_ENV) or None) or "auto"


# ------------------------------------------------------------------ the CPU decision
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def decide_cpu_bf16(capability: str, flags: Iterable[str]) -> Optional[bool]:
    """Whether bf16 autocast is faster than float32 on a CPU with these features; ``None``: cannot tell.

    ``capability`` is :func:`torch.backends.cpu.get_cpu_capability` (``"AVX2"``, ``"AVX512"``, ...).
    """
    flags = frozenset(flags)
    if flags & BF16_FLAGS:
        return True
    if capability.upper().startswith(("AVX", "DEFAULT", "NO AVX")) and ("avx2" in flags or "sse2" in flags):
        return False  # x86 without AMX/AVX512-BF16: bf16 products are emulated
    return None


def _machine_key() -> str:
    return "|".join([platform.machine(), platform.processor() or "", torch.backends.cpu.get_cpu_capability(),
                     torch.__version__, _cpu_model()])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def measure_cpu_bf16(repeats: int = 20) -> dict:
    """Time a decoder-sized matmul in float32 and under bf16 autocast (one thread; ~0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 576), torch.randn(576, 1536)
        timings = {}
        for mode in ("float32", "bfloat16", "float32", "bfloat16"):  # interleaved, best of two
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bfloat16" else contextlib.nullcontext()
            start = time.perf_counter()
            with ctx:
                for _ in range(repeats):
                    a @ b
            timings[mode] = min(timings.get(mode, float("inf")), time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"float32_s": timings["float32"], "bfloat16_s": timings["bfloat16"],
            "bf16_faster": timings["bfloat16"] < 0.9 * timings["float32"]}


def _measured_cpu_bf16() -> bool:
    path = defaults.cache_dir() / "precision.json"
    key = _machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return bool(cached[key]["bf16_faster"])
    result = measure_cpu_bf16()
    logger.info("Measured bf16 autocast vs float32 on this CPU: %.3f s vs %.3f s", result["bfloat16_s"],
                result["float32_s"])
    cached[key] = result
    try:
        from .fileio import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(cached, indent=2).encode())
    except OSError:  # a read-only cache only costs the measurement again
        pass
    return bool(result["bf16_faster"])


def cpu_bf16_is_faster() -> bool:
    """The auto decision for this CPU (flags first, a cached micro-benchmark where they do not say)."""
    key = "cpu"
    if key not in _decision_cache:
        decided = decide_cpu_bf16(torch.backends.cpu.get_cpu_capability(), cpu_flags())
        _decision_cache[key] = _measured_cpu_bf16() if decided is None else decided
    return _decision_cache[key]


# ------------------------------------------------------------------ the policy
def compute_dtype(device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = None, *,
                  decode: bool = False) -> torch.dtype:
    """The dtype matmuls run in on ``device``: ``torch.bfloat16`` (autocast) or ``torch.float32``.

    ``decode=True`` is token-by-token generation, which stays float32 on the CPU unless bf16 is asked for.
    """
    choice = requested(dtype)
    device_type = torch.device(device).type
    if choice == "float32":
        return torch.float32
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device_type != "cpu":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if decode:
        return torch.float32
    return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32


def autocast(device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = None, *,
             decode: bool = False):
    """Autocast context for batched work (compression, training): bf16 where the policy says it is faster."""
    device_type = torch.device(device).type
    enabled = compute_dtype(device, dtype, decode=decode) == torch.bfloat16
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def generation_autocast(device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = None):
    """Autocast context for token-by-token generation (float32 on the CPU unless bf16 is asked for)."""
    return autocast(device, dtype, decode=True)


def describe(device: Union[str, torch.device] = "cpu", dtype: Union[str, torch.dtype, None] = None) -> str:
    """One line saying what runs in which precision here and why, e.g. for the demo's header."""
    choice = requested(dtype)
    device = torch.device(device)
    batch = compute_dtype(device, dtype)
    decode = compute_dtype(device, dtype, decode=True)
    name = {torch.bfloat16: "bf16 autocast", torch.float32: "float32"}
    if device.type == "cpu":
        flags = sorted(cpu_flags() & BF16_FLAGS) or ["no AMX/AVX512-BF16"]
        where = f"CPU {torch.backends.cpu.get_cpu_capability()} ({', '.join(flags)})"
    else:
        where = str(device)
    source = "auto" if choice == "auto" else f"{choice} requested"
    return f"precision: {where}, {source}: compression/training {name[batch]}, generation {name[decode]}"


def machine_block(device: Union[str, torch.device] = "cpu") -> dict:
    """The precision facts a benchmark result records beside its numbers."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16_flags": sorted(cpu_flags() & BF16_FLAGS),
            "precision_requested": requested(),
            "compute_dtype": str(compute_dtype(device)).replace("torch.", ""),
            "generation_dtype": str(compute_dtype(device, decode=True)).replace("torch.", "")}


def announce(device: Union[str, torch.device] = "cpu") -> None:
    """Log :func:`describe` once per process (the ``-v`` logs show it)."""
    global _announced
    if not _announced:
        _announced = True
        logger.info(describe(device))
