"""The network's precision: what ``precision='auto'`` (the default) resolves to.

'auto' means bf16 autocast where the hardware runs bf16 natively, fp32 elsewhere:

- CUDA devices with bf16 tensor cores (compute capability 8.0 and newer);
- x86 CPUs with AVX512-BF16 (AMD Zen 4 and newer, Intel Cooper Lake / Sapphire Rapids and
  newer) or AMX (Intel Sapphire Rapids and newer), on which oneDNN runs bf16 convolutions
  and GEMMs in hardware.

Everywhere else bf16 would be emulated (plain AVX-512/AVX2 CPUs, other architectures) and is
no faster than fp32, so 'auto' keeps fp32 there. bench/time_to_quality.py measures what
bf16 costs in quality (about nothing: docs/benchmarks.md).

:func:`native_bf16` is the one capability probe; tests fake it.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from gramstyle.errors import FieldError

#: The precisions the network can run in; 'auto' resolves to one of them.
PRECISIONS = ("fp32", "bf16")


def _cpuinfo_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_bf16_features() -> tuple[str, ...]:
    """The native-bf16 features of this x86 CPU: ('AVX512-BF16', 'AMX'), either, or none.

    Asked once (the answer cannot change), from torch's own cpuinfo -- the source oneDNN
    dispatches on -- or, on a torch without that probe, from /proc/cpuinfo's flags.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return ()
    probe = getattr(torch, "cpu", None)
    try:
        found = (probe._is_avx512_bf16_supported(), probe._is_amx_tile_supported())
    except AttributeError:
        flags = _cpuinfo_flags()
        found = ("avx512_bf16" in flags, "amx_bf16" in flags)
    return tuple(name for name, has in zip(("AVX512-BF16", "AMX"), found, strict=True) if has)


def cpu_native_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 or AMX."""
    return bool(cpu_bf16_features())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively (see the module docstring)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'fp32' or 'bf16': ``precision`` itself, or for 'auto' what ``device`` runs natively."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise FieldError("precision", f"must be one of auto, {', '.join(PRECISIONS)}, "
                         f"got {precision!r}", precision)
    return precision


def describe(device: torch.device) -> str:
    """Why 'auto' picks what it picks on ``device``, for ``gramstyle info`` and logs."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        native = native_bf16(device)
        return f"sm_{major}{minor} {'has' if native else 'lacks'} native bf16"
    if device.type == "cpu":
        features = cpu_bf16_features()
        return f"the CPU has {' and '.join(features)}" if features else \
            "the CPU has neither AVX512-BF16 nor AMX"
    return f"{device.type} is not probed"


__all__ = ["PRECISIONS", "cpu_bf16_features", "cpu_native_bf16", "describe", "native_bf16",
           "resolve_precision"]
