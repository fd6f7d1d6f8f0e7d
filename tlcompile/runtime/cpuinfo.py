"""What CPU this is and which instruction sets it offers (torch-free; Linux /proc/cpuinfo, else platform)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# Flags that decide which inference kernels run: int8 dot products (VNNI), bf16 and tile (AMX) units.
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "asimd": "NEON",
}


def _proc_cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, feature flags) from /proc/cpuinfo; (None, no flags) where there is none."""
    model, flags = None, set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return model, flags


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel names them (avx2, sse4_1, asimd, ...); empty where unknown."""
    return _proc_cpuinfo()[1]


def cpu_info() -> dict[str, Any]:
    model, flags = _proc_cpuinfo()
    model = model or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count() or 1
    return {
        "model": model,
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags],
    }
