"""The preprocessing's crop and resize in one compiled pass (``fast_resize.c``), bit-identical to Pillow's.

:func:`tlcompile.runtime.preprocess.prepare_image` crops a square around the field of view and resizes it with
Pillow's bilinear filter. Pillow's horizontal pass does not vectorize: on a camera JPEG decoded at 1/8 scale (a
371 px square to 112 px) the crop, the copy into a Pillow image and the resize took 0.7 ms of the 2.1 ms of
preprocessing on a 2-core AVX-512 AMD EPYC. ``fast_resize.c`` reads the square straight from the decoded frame and
computes Pillow's own fixed-point sums, vectorized: the same bytes (tests/runtime/test_fast_resize.py holds it to
Pillow on thousands of random frames, windows and sizes), so nothing validated changes and ``PREPROCESS_VERSION``
stays.

Compiled on first use by :mod:`tlcompile.runtime.native` (``make quickstart`` builds it at install). Where it cannot
be built (no C compiler on the box), for sizes it does not take, or with ``TLCOMPILE_FAST_RESIZE=0``, Pillow resizes
as before; :func:`status` says which path runs and why.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.runtime import native

SOURCE = Path(__file__).with_name("fast_resize.c")
# No fused multiply-add: the filter taps' double arithmetic rounds operation by operation, as Pillow's.
_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11", *native.x86_flags()]
_STATE: dict[str, Any] = {"tried": False, "function": None, "error": None}
# Pillow's resize(..., reducing_gap=2.0) shrinks by a whole factor first (Image.reduce) where the square is at least
# this many times the output: another arithmetic, left to Pillow.
REDUCING_GAP = 2.0


def _function() -> Any:
    """The compiled ``tl_resize_bilinear``, or None where it cannot be built or ``TLCOMPILE_FAST_RESIZE=0``."""
    if os.environ.get("TLCOMPILE_FAST_RESIZE", "1") == "0":
        _STATE["error"] = "TLCOMPILE_FAST_RESIZE=0"
        return None
    if not _STATE["tried"]:
        _STATE["tried"] = True
        try:
            function = native.load_library(SOURCE, _FLAGS).tl_resize_bilinear
            function.restype = ctypes.c_int
            function.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 8, ctypes.c_void_p]
            _STATE["function"] = function
        except native.BUILD_ERRORS as err:
            _STATE["error"] = f"{type(err).__name__}: {err}"
    return _STATE["function"]


def status() -> str:
    """Which resize the preprocessing uses here, in words (for benchmarks and ``tlcompile bench``)."""
    return "compiled kernel (fast_resize.c)" if _function() is not None else f"Pillow ({_STATE['error']})"


def takes(side: int, size: int) -> bool:
    """Whether the kernel resizes a ``side`` px square to ``size`` px the way ``Image.resize(..., BILINEAR,
    reducing_gap=2.0)`` does: both ways (a side that does not change is a copy) and with no whole-factor reduction
    first. (A square is resized horizontally first by every Pillow, the order the kernel follows.)"""
    return side != size and int(side / size / REDUCING_GAP) <= 1


def crop_resize(rgb: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray | None:
    """The ``side`` px square of ``rgb`` (uint8 (H, W, 3)) at (top, left), black outside the frame, resized to
    ``size`` px: Pillow's bytes, or None where the kernel does not run (the caller resizes with Pillow)."""
    function = _function()
    if function is None or not takes(side, size) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        return None
    rgb = np.ascontiguousarray(rgb)
    out = np.empty((size, size, 3), dtype=np.uint8)
    h, w = rgb.shape[:2]
    if function(rgb.ctypes.data, h, w, top, left, side, side, size, size, out.ctypes.data) != 0:
        return None  # out of memory in the kernel: Pillow may still manage
    return out
