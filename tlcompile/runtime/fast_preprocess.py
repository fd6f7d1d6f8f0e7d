"""The preprocessing's hot loops compiled (``fast_preprocess.c``), with the arithmetic of the code they replace.

:func:`tlcompile.runtime.preprocess.prepare_image` finds the field of view (luminance, its histogram, each row's and
column's first and last field pixel, then a circle fit) and crops and resizes a square around it with Pillow's
bilinear filter; :mod:`tlcompile.runtime.screen` then checks the photo for damage and for a fundus-like field. On a
camera JPEG decoded at 1/8 scale (500x375, a 371 px square to 112 px) on a 2-core AVX-512 AMD EPYC, the search took
~0.3 ms in numpy calls, the crop and Pillow's resize (whose horizontal pass does not vectorize) ~0.7 ms and the checks
~2 ms, against a 12 ms decode. ``fast_preprocess.c`` does the search's passes in two loops, reads the square straight
from the decoded frame computing Pillow's own fixed-point resize sums, vectorized, and gathers each check's counts in
one pass. Everything is whole-number arithmetic (and the checks' distances numpy's float64 operations) computed as
before: the same field, bytes and verdicts (tests/runtime/test_fast_preprocess.py holds each kernel to the code it
replaces on thousands of random cases), so nothing validated changes and ``PREPROCESS_VERSION`` stays.

Compiled on first use by :mod:`tlcompile.runtime.native` (``make quickstart`` builds it at install). Where it cannot
be built (no C compiler on the box), for inputs it does not take, or with ``TLCOMPILE_FAST_PREPROCESS=0``, numpy and
Pillow run as before; :func:`status` says which path runs and why.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from tlcompile.runtime import native

SOURCE = Path(__file__).with_name("fast_preprocess.c")
# No fused multiply-add: the filter taps' double arithmetic rounds operation by operation, as Pillow's.
_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11", *native.x86_flags()]
# Pillow's resize(..., reducing_gap=2.0) shrinks by a whole factor first (Image.reduce) where the square is at least
# this many times the output: another arithmetic, left to Pillow.
REDUCING_GAP = 2.0
_I64, _P = ctypes.c_int64, ctypes.c_void_p


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The kernels' argument and result types, so that ctypes converts Python ints and floats exactly."""
    for name, restype, argtypes in (
        ("tl_resize_bilinear", ctypes.c_int, [_P, *[_I64] * 8, _P]),
        ("tl_luminance_histogram", None, [_P, _I64, _I64, _I64, _P, _P]),
        ("tl_field_lines", None, [_P, _I64, _I64, _I64, *[_P] * 6]),
        ("tl_repeated", _I64, [_P, *[_I64] * 5]),
        ("tl_field_statistics", None, [_P, _I64, _I64, _I64, *[ctypes.c_double] * 4, *[_P] * 4]),
    ):
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


#: The compiled kernels: None where they cannot be built or ``TLCOMPILE_FAST_PREPROCESS=0`` (``LIBRARY.error``: why).
LIBRARY = native.Compiled(SOURCE, _FLAGS, "TLCOMPILE_FAST_PREPROCESS", _declare)
_library = LIBRARY.get


def status() -> str:
    """Which preprocessing loops run here, in words (for benchmarks)."""
    return "compiled kernels (fast_preprocess.c)" if _library() is not None else f"numpy and Pillow ({LIBRARY.error})"


def _frame(rgb: np.ndarray) -> bool:
    """A uint8 (H, W, 3) C-ordered frame: the only layout the kernels read."""
    return rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous and rgb.size > 0


def luminance_histogram(rgb: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(luminance(rgb[::step, ::step]), histogram of it)`` (:func:`tlcompile.runtime.preprocess.luminance`,
    ``histogram``) in one pass, or None where the kernel does not run."""
    lib = _library()
    if lib is None or not _frame(rgb):
        return None
    h, w = rgb.shape[:2]
    small = np.empty((-(-h // step), -(-w // step)), dtype=np.uint8)
    counts = np.empty(256, dtype=np.int64)
    lib.tl_luminance_histogram(rgb.ctypes.data, h, w, step, small.ctypes.data, counts.ctypes.data)
    return small, counts


def field_lines(lum: np.ndarray, cut: int) -> tuple[np.ndarray, ...] | None:
    """For the field ``lum > cut`` (uint8 (H, W) luminance, ``cut`` a whole number): each row's count of field pixels,
    first and last of them (-1 where none), then the same for each column (int32), or None where the kernel does not
    run."""
    lib = _library()
    if lib is None or lum.dtype != np.uint8 or lum.ndim != 2 or not lum.flags.c_contiguous or lum.size == 0:
        return None
    hs, ws = lum.shape
    out = [np.empty(n, dtype=np.int32) for n in (hs, hs, hs, ws, ws, ws)]
    lib.tl_field_lines(lum.ctypes.data, hs, ws, int(cut), *(a.ctypes.data for a in out))
    return tuple(out)


def repeated_count(rgb: np.ndarray, step: int, period: int, min_bright: int) -> int | None:
    """:func:`tlcompile.runtime.screen.damage_reason`'s count on the grid ``rgb[::step, ::step]``: its pixels equal in
    all channels to the ones ``period`` to the right and ``period`` below, with max(R, G, B) >= ``min_bright``; None
    where the kernel does not run."""
    lib = _library()
    if lib is None or not _frame(rgb):
        return None
    h, w = rgb.shape[:2]
    return int(lib.tl_repeated(rgb.ctypes.data, h, w, step, period, min_bright))


def field_statistics(
    rgb: np.ndarray, step: int, cx: float, cy: float, r_in: float, r_out: float
) -> tuple[int, int, np.ndarray, np.ndarray, list[int]] | None:
    """:func:`tlcompile.runtime.screen.not_fundus_reason`'s statistics on the grid ``rgb[::step, ::step]``: the counts
    of pixels within ``r_in`` of (cx, cy) and at least ``r_out`` from it (decided as ``screen._within`` does), the
    histograms of max(R, G, B) of each, and the sums of R, G and B inside; None where the kernel does not run."""
    lib = _library()
    if lib is None or not _frame(rgb):
        return None
    h, w = rgb.shape[:2]
    counts, sums = np.zeros(2, dtype=np.int64), np.zeros(3, dtype=np.int64)
    inside, outside = np.zeros(256, dtype=np.int64), np.zeros(256, dtype=np.int64)
    lib.tl_field_statistics(
        rgb.ctypes.data, h, w, step, cx, cy, r_in, r_out, counts.ctypes.data, inside.ctypes.data,
        outside.ctypes.data, sums.ctypes.data,
    )  # fmt: skip
    return int(counts[0]), int(counts[1]), inside, outside, sums.tolist()


def takes(side: int, size: int) -> bool:
    """Whether the kernel resizes a ``side`` px square to ``size`` px the way ``Image.resize(..., BILINEAR,
    reducing_gap=2.0)`` does: both ways (a side that does not change is a copy) and with no whole-factor reduction
    first. (A square is resized horizontally first by every Pillow, the order the kernel follows.)"""
    return side != size and int(side / size / REDUCING_GAP) <= 1


def crop_resize(rgb: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray | None:
    """The ``side`` px square of ``rgb`` (uint8 (H, W, 3)) at (top, left), black outside the frame, resized to
    ``size`` px: Pillow's bytes, or None where the kernel does not run (the caller resizes with Pillow)."""
    lib = _library()
    if lib is None or not takes(side, size) or not _frame(rgb):
        return None
    out = np.empty((size, size, 3), dtype=np.uint8)
    h, w = rgb.shape[:2]
    if lib.tl_resize_bilinear(rgb.ctypes.data, h, w, top, left, side, side, size, size, out.ctypes.data) != 0:
        return None  # out of memory in the kernel: Pillow may still manage
    return out
