"""Fundus preprocessing shared by training and the deployed runtime (numpy + Pillow, never torch).

What was validated is what runs on the device: the training data module and ``tlcompile predict`` both call
:func:`prepare_image` and :func:`to_input`:

    decode -> RGB (grayscale, palette, 16-bit and RGBA converted) -> find the circular field of view
    -> crop a square around it (black where the field is clipped by the frame) -> resize
    -> optional Ben Graham local-average subtraction -> optional circular mask        (prepare_image)
    uint8 HWC -> normalised float32 NCHW                                                (to_input)

The field of view is found by fitting a circle to its edge, not by a bounding box, so a field clipped by the
frame (top and bottom cut off, as many cameras do), the small notch many cameras leave on the rim, and text burnt
into a corner do not move the crop; the threshold follows the image's own black and field levels, so dark
(under-exposed) photographs are found too.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlcompile.errors import DataError
from tlcompile.runtime import dicom, fast_preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *dicom.DICOM_EXTENSIONS)
#: Bumped whenever prepare_image's arithmetic changes, so cached preprocessed images of the old code are not reused.
#: A spec carries the version it was made with (bundle.json, report.json; none recorded: 2), and the field of view is
#: fitted as that version did: 3 solves the circle exactly in whole numbers (the same on every CPU), 2 by
#: ``np.linalg.lstsq``, whose last bits follow the CPU's BLAS kernels (see :func:`_fit_circle`).
PREPROCESS_VERSION = 3
PREPROCESS_VERSIONS = (2, 3)
# Ben Graham (Kaggle DR 2015) blurred with sigma = radius / 30 at a field radius of 300 px; we keep the ratio.
BEN_GRAHAM_SIGMA_PER_RADIUS = 1 / 30
# Grey that Ben Graham's local-average subtraction maps a flat region to (and the surround after it).
BEN_GRAHAM_GREY = 128
# The largest network input a spec may ask for: a bundle.json asking for 100000 px would otherwise allocate
# hundreds of GiB per image. Recipes allow up to 1024.
MAX_INPUT_SIZE = 4096
# Decoding is bounded from the header, before a pixel is decompressed: a 630 KB PNG can claim 81 Mpx of 16-bit RGBA
# (2 GB and 14 s to decode) while staying under Pillow's own pixel limit. Fundus cameras write up to ~24 Mpx.
MAX_DECODE_PIXELS = 50_000_000
MAX_DECODE_BYTES = 768 << 20
# Peak bytes per pixel while decoding and converting to uint8 RGB, by Pillow mode (the decoded image, the conversions
# read_image makes and the result); modes not listed count as the worst.
_DECODE_BYTES_PER_PIXEL = {
    "1": 7,
    "L": 7,
    "P": 7,
    "RGB": 6,
    "YCbCr": 9,
    "CMYK": 10,
    "LAB": 9,
    "HSV": 9,
    "I;16": 23,
    "I;16B": 23,
    "I;16L": 23,
    "I": 25,
    "F": 25,
}
_WORST_BYTES_PER_PIXEL = 24  # RGBA/LA/PA: the image, a uint16 RGBA copy, the product and the result


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a camera image into a network input; saved in reports and bundles."""

    size: int
    crop_fov: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # A pixel belongs to the field of view when max(R,G,B) rises this fraction of the way from the black level
    # to the field's median brightness.
    fov_threshold: float = 0.12
    # Ben Graham's local-average colour subtraction: 4 x (image - Gaussian blur) + 128 inside the field.
    ben_graham: bool = False
    # Radius (fraction of the field radius) outside which the image is blanked; None: no mask.
    circular_mask: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The preprocessing arithmetic this spec was made with (PREPROCESS_VERSION; a spec saved without one: 2).
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        # A spec arrives from bundle.json on the clinic's box: bound what it can make this box allocate or compute.
        def finite(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        whole = isinstance(self.size, int) and not isinstance(self.size, bool)
        if not (whole and 1 <= self.size <= MAX_INPUT_SIZE):
            what = "is out of range" if whole else "is not valid"
            raise DataError(
                f"preprocessing size {self.size!r} {what}; valid: a whole number of pixels from 1 to {MAX_INPUT_SIZE}"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(finite(v) for v in values) or (name == "std" and min(values) <= 0):
                raise DataError(
                    f"preprocessing {name} {list(values)!r} is not valid; valid: three finite numbers"
                    + (" > 0" if name == "std" else "")
                )
        if not (finite(self.fov_threshold) and 0 <= self.fov_threshold < 1):
            raise DataError(f"preprocessing fov_threshold {self.fov_threshold!r} is out of range; valid: 0 to 1")
        if self.circular_mask is not None and not (finite(self.circular_mask) and 0 < self.circular_mask <= 4):
            raise DataError(
                f"preprocessing circular_mask {self.circular_mask!r} is out of range; valid: null or a number in (0, 4]"
            )
        if not (
            isinstance(self.version, int) and not isinstance(self.version, bool) and self.version in PREPROCESS_VERSIONS
        ):
            raise DataError(
                f"preprocessing version {self.version!r} is not one this tlcompile runs; valid: "
                f"{', '.join(map(str, PREPROCESS_VERSIONS))} (a newer tlcompile made it: upgrade tlcompile on this box)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        d.setdefault("version", 2)  # saved before specs recorded their version: version 2's arithmetic
        return cls(**d)

    @property
    def draft_size(self) -> int:
        """Side the JPEG decoder may scale down to while decoding: twice the input, so the crop keeps detail."""
        return self.size * 2


# ------------------------------------------------------------------------------------------ field of view
@dataclass(frozen=True)
class FieldOfView:
    """The circular field of view in the image's pixel coordinates (x to the right, y down; pixel centres at
    integers). ``fitted``: the circle was fitted to the visible edge; False: too little edge was visible (the field
    fills the frame) and the circle is the bounding box's."""

    cx: float
    cy: float
    radius: float
    fitted: bool

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the field inside the frame; exclusive ends."""
        top = max(0, math.floor(self.cy - self.radius + 0.5))
        bottom = min(height, math.ceil(self.cy + self.radius + 0.5))
        left = max(0, math.floor(self.cx - self.radius + 0.5))
        right = min(width, math.ceil(self.cx + self.radius + 0.5))
        return top, bottom, left, right


def luminance(rgb: np.ndarray) -> np.ndarray:
    """max(R, G, B) per pixel. Equal to ``rgb.max(axis=2)``, which reduces over a 3-long inner axis one pixel at a
    time (4 ms on a 500x375 image). A C-contiguous uint8 RGB image is taken as one run of bytes: the maximum of it
    and its copies shifted by one and two bytes (contiguous, so vectorised) holds every pixel's max at the pixel's
    first byte, taken out with one strided copy (0.06 ms); other layouts take the element-wise maximum of the strided
    channel planes (0.1 ms)."""
    if rgb.ndim != 3:
        return rgb
    h, w, channels = rgb.shape
    if channels == 3 and rgb.dtype == np.uint8 and rgb.flags.c_contiguous and rgb.size:
        flat = rgb.reshape(-1)
        peak = np.maximum(flat[:-2], flat[1:-1])
        np.maximum(peak, flat[2:], out=peak)
        return np.ascontiguousarray(peak[::3]).reshape(h, w)
    lum = rgb[:, :, 0]
    for c in range(1, channels):
        lum = np.maximum(lum, rgb[:, :, c])
    return lum if channels > 1 else lum.copy()


Circle = tuple[float, float, float, np.ndarray]  # (cx, cy, r, each point's distance from the circle)


def _refit_without_outliers(
    size: int, tolerance: float, fit: Callable[[np.ndarray | None], Circle | None]
) -> tuple[float, float, float, np.ndarray] | None:
    """The circle ``fit`` gives for the points kept (None: all ``size`` of them), refitted without the points far from
    it (a notch, text, a lash or a reflex that reaches the rim) until the kept points stop changing, at most six
    fits. Returns (cx, cy, r, inliers) or None when the points do not fit one."""
    keep: np.ndarray | None = None  # None: every point
    for _ in range(6):
        if (size if keep is None else np.count_nonzero(keep)) < 12:
            return None
        circle = fit(keep)
        if circle is None:
            return None
        cx, cy, r, residual = circle
        # Robust spread of the inliers (MAD); the floor keeps a perfect circle from rejecting pixel jitter.
        spread = 1.4826 * median(residual if keep is None else residual[keep])
        new_keep = residual <= max(tolerance, 3.0 * spread)
        if new_keep.all() if keep is None else np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return cx, cy, r, np.ones(size, dtype=bool) if keep is None else keep


def _fit_circle(x: np.ndarray, y: np.ndarray, tolerance: float) -> tuple[float, float, float, np.ndarray] | None:
    """Version 2: the algebraic (Kasa) least-squares circle through the edge points by ``np.linalg.lstsq``, refitted
    without outliers (:func:`_refit_without_outliers`). lstsq's last bits follow the CPU's BLAS kernels, which decide
    how a symmetric field's crop rounds: kept as it was for specs of version 2 (see :func:`_fit_circle_exact`)."""

    def fit(keep: np.ndarray | None) -> Circle | None:
        xs, ys = (x, y) if keep is None else (x[keep], y[keep])
        a = np.stack([xs, ys, np.ones_like(xs)], axis=1)
        sol, *_ = np.linalg.lstsq(a, -(xs * xs + ys * ys), rcond=None)
        cx, cy = -sol[0] / 2, -sol[1] / 2
        r2 = cx * cx + cy * cy - sol[2]
        if not r2 > 0:
            return None
        r = math.sqrt(r2)
        return cx, cy, r, np.abs(np.hypot(x - cx, y - cy) - r)

    return _refit_without_outliers(x.size, tolerance, fit)


def _fit_circle_exact(x: np.ndarray, y: np.ndarray, tolerance: float) -> tuple[float, float, float, np.ndarray] | None:
    """Version 3 of :func:`_fit_circle`: the same circle and outlier refits, solved exactly.

    The edge points lie on half pixels (half a pixel outside a field pixel, times the grid step), so doubled they are
    whole numbers, and so is every sum of the normal equations (counted in int64, where no order of adding can change
    them). Cramer's rule in Python's whole numbers then gives the least-squares circle as exact fractions, each rounded
    once to a float (``int / int`` rounds correctly). The circle is the same on every CPU and BLAS, and a symmetric
    field's centre on a half pixel is exactly there. The distances that pick the inliers are single IEEE operations
    per point (differences, squares, a square root), the same everywhere too."""
    if x.size < 12:
        return None
    # find_field's edge points are whole or half pixels times the whole grid step: doubled, whole numbers that float64
    # holds exactly, so the cast is exact.
    xx, yy = (2 * x).astype(np.int64), (2 * y).astype(np.int64)
    # Any origin gives the same circle; a whole point near the middle keeps the sums small.
    ox, oy = int(xx.sum()) // xx.size, int(yy.sum()) // yy.size
    u, v = xx - ox, yy - oy
    points = np.stack([u, v, np.ones_like(u), u * u + v * v], axis=1)
    if xx.size * int(np.abs(points[:, :2]).max()) * int(points[:, 3].max()) >= 1 << 62:
        points = points.astype(object)  # sums that could pass int64 (frames tens of thousands of pixels wide): exact

    def fit(keep: np.ndarray | None) -> Circle | None:
        part = points if keep is None else points[keep]
        (suu, suv, su, suw), (_, svv, sv, svw), (_, _, n, sw) = (part[:, :3].T @ part).tolist()
        # The circle u^2 + v^2 + Du + Ev + F = 0: [[suu, suv, su], [suv, svv, sv], [su, sv, n]] @ (D, E, F) = -(suw,
        # svw, sw).
        r1, r2, r3 = -suw, -svw, -sw
        c_uu, c_uv, c_un = svv * n - sv * sv, suv * n - sv * su, suv * sv - svv * su
        det = suu * c_uu - suv * c_uv + su * c_un
        if det <= 0:
            return None  # the points lie on a line: no circle through them
        num_d = r1 * c_uu - suv * (r2 * n - sv * r3) + su * (r2 * sv - svv * r3)
        num_e = suu * (r2 * n - sv * r3) - r1 * c_uv + su * (suv * r3 - r2 * su)
        num_f = suu * (svv * r3 - r2 * sv) - suv * (suv * r3 - r2 * su) + r1 * c_un
        # Centre (-D/2, -E/2) and radius^2 (D^2 + E^2)/4 - F in doubled units, halved back to pixels, each one exact
        # fraction rounded once.
        r2_num = num_d * num_d + num_e * num_e - 4 * det * num_f
        if r2_num <= 0:
            return None
        cx, cy = (2 * ox * det - num_d) / (4 * det), (2 * oy * det - num_e) / (4 * det)
        r = math.sqrt(r2_num / (16 * det * det))
        dx, dy = x - cx, y - cy
        return cx, cy, r, np.abs(np.sqrt(dx * dx + dy * dy) - r)

    return _refit_without_outliers(x.size, tolerance, fit)


def median(values: np.ndarray) -> float:
    """``float(np.median(values))`` of a non-empty 1-d array, the same float (the mean of the two middle values in
    float64), without np.median's checks and copies: one partition (20 us less per call on a thousand points)."""
    n = values.size
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(values, (lo, hi) if hi != lo else lo)
    return float((part[lo] + part[hi]) / 2) if hi != lo else float(part[lo])


def histogram(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray | None:
    """256-bin histogram per channel (uint8 (H, W) or (H, W, 3); 256 or 768 counts) of the pixels where ``mask``
    (bool (H, W)) is set, or None for other dtypes/shapes. Pillow's C loop: no copy of the selected pixels, half the
    time of ``np.bincount`` (which widens every pixel to int64 first)."""
    if values.dtype != np.uint8 or not (values.ndim == 2 or (values.ndim == 3 and values.shape[2] == 3)):
        return None
    if mask is None and values.ndim == 2 and values.size >= 4:
        # A single plane's bytes read as RGBA pixels: Pillow counts the four bands into four tables, so consecutive
        # equal values (the black surround) do not wait on one counter; the tables are summed (0.08 ms instead of
        # 0.13 on a 500x375 image).
        flat = np.ascontiguousarray(values).reshape(-1)
        whole = flat.size // 4 * 4
        quads = Image.frombuffer("RGBA", (whole // 4, 1), flat[:whole], "raw", "RGBA", 0, 1)
        counts = np.asarray(quads.histogram(), dtype=np.int64).reshape(4, 256).sum(axis=0)
        if whole < flat.size:
            counts += np.bincount(flat[whole:], minlength=256)
        return counts
    image = Image.fromarray(np.ascontiguousarray(values))
    pil_mask = None if mask is None else Image.fromarray(np.ascontiguousarray(mask, dtype=bool).view(np.uint8))
    return np.asarray(image.histogram(pil_mask), dtype=np.int64)


def _levels(lum: np.ndarray, counts: np.ndarray | None) -> tuple[float, float]:
    """(1st, 99th) percentile of the luminance, exactly as ``np.percentile`` gives them (method 'linear'), read from
    the histogram when there is one instead of partitioning the image twice."""
    if counts is None:
        return float(np.percentile(lum, 1)), float(np.percentile(lum, 99))
    cumulative = np.cumsum(counts).tolist()
    return _percentile_of_cumulative(cumulative, 1), _percentile_of_cumulative(cumulative, 99)


def _percentile_of_cumulative(cumulative: list[int], q: float) -> float:
    """:func:`percentile_of_histogram` from the cumulative counts (a list: its order statistics are bisections in
    Python, not numpy calls)."""
    n = cumulative[-1]
    virtual = (n - 1) * (q / 100)  # float64 arithmetic, as numpy's
    below = math.floor(virtual)
    a = float(bisect.bisect_right(cumulative, below))
    b = float(bisect.bisect_right(cumulative, min(below + 1, n - 1)))
    t = virtual - below
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def _median_of_cumulative(cumulative: list[int], first: int) -> float | None:
    """The median of the values >= ``first`` of the sample whose cumulative counts (from value 0) these are."""
    base = cumulative[min(first, len(cumulative)) - 1] if first > 0 else 0
    n = cumulative[-1] - base
    if n <= 0:
        return None
    # np.median: the mean of the two middle values (the middle one twice when n is odd), in float64.
    lo = bisect.bisect_right(cumulative, base + (n - 1) // 2)
    hi = bisect.bisect_right(cumulative, base + n // 2)
    return (float(lo) + float(hi)) / 2


def percentile_of_histogram(counts: np.ndarray, q: float) -> float:
    """``np.percentile(sample, q)`` (method 'linear') of a non-empty sample of whole numbers given by its histogram,
    with numpy's own arithmetic: the virtual index (n-1) * q/100 in float64 and its lerp
    (``numpy.lib._function_base_impl._lerp``), so the float is the same to the last bit."""
    return _percentile_of_cumulative(np.cumsum(counts).tolist(), q)


def median_of_histogram(counts: np.ndarray, first: int = 0) -> float | None:
    """``np.median`` of the sample given by its histogram (bin i holds value first + i); None when it is empty."""
    median = _median_of_cumulative(np.cumsum(counts).tolist(), 0) if len(counts) else None
    return None if median is None else median + first  # whole and half numbers: exact


def _median_above(lum: np.ndarray, counts: np.ndarray | None, level: float) -> float | None:
    """``np.median(lum[lum > level])``, None when no pixel is above; from the histogram when there is one (no
    copy, no partition)."""
    if counts is None:
        above = lum[lum > level]
        return float(np.median(above)) if above.size else None
    first = max(0, math.floor(level) + 1)  # the smallest whole value > level
    return _median_of_cumulative(np.cumsum(counts).tolist(), first)


def find_field(rgb: np.ndarray, threshold: float = 0.12, version: int = PREPROCESS_VERSION) -> FieldOfView | None:
    """The circular field of view, or None (a black or blank frame).

    The field is the set of pixels brighter than a threshold set between the image's black level (1st percentile)
    and the field's median brightness, so under-exposed photos are found as well as bright ones. Its edge points
    (the first and last field pixel of every row and column, except where the field runs into the frame) are fitted
    with a circle, robust to outliers; with too little edge visible the bounding box gives the circle.
    """
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    # Camera-size images are fitted on a strided grid: sub-pixel accuracy is not needed for a crop.
    step = max(1, min(h, w) // 512)
    # The luminance and its histogram in one compiled pass where it runs (tlcompile.runtime.fast_preprocess).
    compiled = fast_preprocess.luminance_histogram(rgb, step)
    if compiled is not None:
        small, counts = compiled
    else:
        small = luminance(rgb[::step, ::step])  # the same pixels as striding the full luminance, at 1/step^2 the work
        counts = histogram(small)
    hs, ws = small.shape
    black, bright = _levels(small, counts)
    if bright < 8:  # an all-black (or nearly) frame
        return None
    field_level = _median_above(small, counts, black + 8)
    if field_level is None:
        field_level = bright
    cut = max(6.0, black + 4.0, black + threshold * (field_level - black))
    # Rows/columns where a meaningful run of the field is present (ignores isolated hot pixels and thin text).
    min_run = max(2, int(0.02 * min(hs, ws)))
    # Each row's and column's count of field pixels (and first and last one) in one compiled pass where it runs, else
    # numpy's. A whole number exceeds cut exactly when it exceeds floor(cut): compared as uint8 (no float64 per pixel).
    lines = fast_preprocess.field_lines(small, min(255, math.floor(cut))) if small.dtype == np.uint8 else None
    if lines is None:
        mask = small > np.uint8(min(255, math.floor(cut))) if small.dtype == np.uint8 else small > cut
        # Counted (and indexed, below) in uint16 when no count or index can overflow it: 4x less memory traffic than
        # summing bools into int64.
        counter = np.uint16 if max(hs, ws) < 1 << 16 else np.int64
        row_count, col_count = (mask.view(np.uint8).sum(axis=axis, dtype=counter) for axis in (1, 0))
    else:
        row_count, row_first, row_last, col_count, col_first, col_last = lines
    rows = np.flatnonzero(row_count >= min_run)
    cols = np.flatnonzero(col_count >= min_run)
    if rows.size == 0 or cols.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (bottom - top) * (right - left) < 0.03 * small.size:
        return None
    if lines is None:
        first_x, last_x, first_y, last_y = _edges(mask, rows, cols, counter)
    else:
        first_x, last_x, first_y, last_y = row_first[rows], row_last[rows], col_first[cols], col_last[cols]
    # The points of each kind whose edge is inside the frame, in one selection: first and last of the rows, then of
    # the columns.
    inside = np.concatenate([first_x > 0, last_x < ws - 1, first_y > 0, last_y < hs - 1])
    x = np.concatenate([first_x - 0.5, last_x + 0.5, cols, cols], dtype=np.float64)[inside] * step
    y = np.concatenate([rows, rows, first_y - 0.5, last_y + 0.5], dtype=np.float64)[inside] * step
    fit = (_fit_circle if version == 2 else _fit_circle_exact)(x, y, tolerance=1.5 * step + 1.0)
    if fit is not None:
        cx, cy, r, inliers = fit
        angles = np.arctan2(y[inliers] - cy, x[inliers] - cx)
        # Which eighths of the circle hold an inlier (the float division as before; truncation is floor here).
        octants = np.count_nonzero(np.bincount(((angles + np.pi) / (np.pi / 4)).astype(np.intp) % 8, minlength=8))
        plausible = (
            octants >= 3  # an arc of at least ~90 degrees: enough to pin the centre
            and 0.15 * min(h, w) <= r <= 0.75 * max(h, w)
            and -0.1 * w <= cx <= 1.1 * w
            and -0.1 * h <= cy <= 1.1 * h
        )
        if plausible:
            return FieldOfView(cx=float(cx), cy=float(cy), radius=float(r), fitted=True)
    # The bounding box: its longer side is the diameter (a field clipped top and bottom keeps its full width).
    t, b, lft, rgt = top * step, min(h, bottom * step), left * step, min(w, right * step)
    return FieldOfView(cx=(lft + rgt - 1) / 2, cy=(t + b - 1) / 2, radius=max(b - t, rgt - lft) / 2, fitted=False)


def _edges(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray, counter: type) -> tuple[np.ndarray, ...]:
    """The first and last field pixel of each of these rows, then of each of these columns, in numpy (find_field's
    path where the compiled pass does not run). Every selected row/column holds a field pixel, so the first is argmax
    of the mask and the last the largest index the mask keeps: the max of mask * index. (argmax over a reversed view
    walks memory backwards: 0.7 ms a side on a 500x375 draft; the product and max 0.1 ms.) Down the columns, argmax
    strides across rows (0.05 ms); the first is the largest mask * (hs - index) taken from hs, whose maximum runs
    along rows (0.025 ms)."""
    hs, ws = mask.shape
    row_mask = _take_lines(mask, rows, axis=0)
    col_mask = _take_lines(mask, cols, axis=1).view(np.uint8)
    first_x = row_mask.argmax(axis=1)
    first_y = hs - (col_mask * np.arange(hs, 0, -1, dtype=counter)[:, None]).max(axis=0).astype(np.intp)
    last_x = (row_mask.view(np.uint8) * np.arange(ws, dtype=counter)).max(axis=1)
    last_y = (col_mask * np.arange(hs, dtype=counter)[:, None]).max(axis=0)
    return first_x, last_x, first_y, last_y


def _take_lines(mask: np.ndarray, lines: np.ndarray, axis: int) -> np.ndarray:
    """``mask[lines]`` (axis 0) or ``mask[:, lines]`` (axis 1): a view when the lines are consecutive, as they are for
    a whole field, instead of a copy."""
    if lines.size and int(lines[-1]) - int(lines[0]) + 1 == lines.size:
        part = slice(int(lines[0]), int(lines[-1]) + 1)
        return mask[part] if axis == 0 else mask[:, part]
    return mask[lines] if axis == 0 else mask[:, lines]


def find_fov(rgb: np.ndarray, threshold: float = 0.12) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right; exclusive ends) of the field of view inside the frame, or None."""
    found = find_field(rgb, threshold)
    if found is None:
        return None
    h, w = np.asarray(rgb).shape[:2]
    return found.box(h, w)


def _square_window(height: int, width: int, found: FieldOfView | None, crop_fov: bool) -> tuple[int, int, int]:
    """(top, left, side) of the square taken from the image: around the field when cropping, else the padded frame."""
    if crop_fov and found is not None:
        side = max(1, round(2 * found.radius))
        return round(found.cy - (side - 1) / 2), round(found.cx - (side - 1) / 2), side
    side = max(height, width)
    return -((side - height) // 2), -((side - width) // 2), side


def crop_square(rgb: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` square at (top, left); parts outside the frame are black."""
    h, w = rgb.shape[:2]
    if top == 0 and left == 0 and side == h == w:
        return rgb
    out = np.zeros((side, side, 3), dtype=rgb.dtype)
    y0, y1, x0, x1 = max(0, top), min(h, top + side), max(0, left), min(w, left + side)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    return out


def targets_for(grades: np.ndarray, task: str) -> np.ndarray:
    """DR grades -> training targets for the task (referable DR is grade >= 2: moderate NPDR or worse).

    Here, not in the data module, because ``tlcompile bench --data`` scores a model against grades on the box."""
    grades = np.asarray(grades, dtype=np.int64)
    return (grades >= 2).astype(np.int64) if task == "referable" else grades


# ----------------------------------------------------------------------------------------------- decoding
def read_image(
    path: str | Path, *, draft_size: int | None = None, data: bytes | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file to uint8 RGB; returns (rgb, (height, width) as stored in the file).

    Grayscale, palette, 16-bit and CMYK images are converted; transparency is composited on black (outside the field
    of view); the EXIF orientation is applied. ``draft_size`` lets the JPEG decoder scale down while decoding (much
    faster for camera-size images). ``data``: the file's bytes already read (``path`` then only names it in errors).
    Pillow's decompression-bomb limit stays in force. Raises :class:`DataError` naming the file for missing, empty,
    truncated, oversized or non-image files.
    """
    path = Path(path)
    if dicom.is_dicom(path, data):  # DICOM (.dcm, or DICM inside): pydicom and its decoders, see runtime/dicom.py
        rgb = dicom.read_dicom(path, data=data, max_pixels=MAX_DECODE_PIXELS).rgb
        return rgb, rgb.shape[:2]
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            stored = (img.height, img.width)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            check_decode_budget(img, path)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # phone-based fundus cameras write the orientation in EXIF
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grayscale: scale to 8 bits instead of letting convert() clip everything above 255 to white.
                wide = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
                gray = np.clip(wide * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2), stored
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
                rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255  # composite on black
                return rgb.astype(np.uint8), stored
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8), stored
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: not an image Pillow can read (empty, wrong format or corrupt)") from err
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image is too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def decode_cost(img: Image.Image) -> tuple[int, int]:
    """(pixels, peak bytes) decoding this image and converting it to RGB would take, from its header alone (after
    a JPEG draft, which shrinks what is decoded)."""
    pixels = (
        int(img.width) * int(img.height) * max(1, int(getattr(img, "n_frames", 1) or 1) if img.format == "TIFF" else 1)
    )
    return pixels, pixels * _DECODE_BYTES_PER_PIXEL.get(img.mode, _WORST_BYTES_PER_PIXEL)


def check_decode_budget(img: Image.Image, path: str | Path) -> None:
    """Refuse, before decoding, an image whose header asks for more pixels or memory than any fundus photograph
    needs (see MAX_DECODE_PIXELS, MAX_DECODE_BYTES)."""
    pixels, cost = decode_cost(img)
    if int(img.width) * int(img.height) > MAX_DECODE_PIXELS or cost > MAX_DECODE_BYTES:
        raise DataError(
            f"{path}: image is too large to decode safely ({img.width}x{img.height} {img.mode}, about "
            f"{cost / (1 << 20):,.0f} MiB to decode; limits {MAX_DECODE_PIXELS / 1e6:.0f} Mpx and "
            f"{MAX_DECODE_BYTES >> 20} MiB); not a fundus photograph"
        )


def read_input(
    path: str | Path, *, draft_size: int | None = None, data: bytes | None = None
) -> tuple[np.ndarray, dict | None]:
    """An input file -> (uint8 RGB, its DICOM header fields or None): what predict and serve read. A DICOM file's
    fields (patient ID, laterality, acquisition time) are for the clinic record only, never for logs."""
    if dicom.is_dicom(path, data):
        found = dicom.read_dicom(path, data=data, max_pixels=MAX_DECODE_PIXELS)
        return found.rgb, found.meta
    return read_image(path, draft_size=draft_size, data=data)[0], None


def load_rgb(path: str | Path, *, draft_size: int | None = None, data: bytes | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB (see :func:`read_image`)."""
    return read_image(path, draft_size=draft_size, data=data)[0]


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    img = Image.fromarray(rgb)
    return np.asarray(img.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


# --------------------------------------------------------------------------------- contrast and masking
def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float32 (H, W, C) array with zeros outside (the caller normalises)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad)
        out = np.zeros_like(x)
        n = x.shape[axis]
        for i, weight in enumerate(taps):
            out += weight * (padded[i : i + n] if axis == 0 else padded[:, i : i + n])
        x = out
    return x


def ben_graham(rgb: np.ndarray, field_mask: np.ndarray, field_radius: float) -> np.ndarray:
    """Ben Graham's local-average colour subtraction, 4 x (image - local average) + 128, inside the field.

    The local average is a Gaussian (sigma = field radius / 30) taken over field pixels only (normalised
    convolution), so the black surround does not leak in and leave the bright ring the plain blur gives at the rim.
    Outside the field the result is the neutral grey 128.
    """
    sigma = max(0.5, field_radius * BEN_GRAHAM_SIGMA_PER_RADIUS)
    m = field_mask.astype(np.float32)[:, :, None]
    stacked = np.concatenate([rgb.astype(np.float32) * m, m], axis=2)
    blurred = _gaussian_blur(stacked, sigma)
    local = blurred[:, :, :3] / np.maximum(blurred[:, :, 3:], 1e-6)
    out = 4.0 * (rgb.astype(np.float32) - local) + BEN_GRAHAM_GREY
    out = np.where(m > 0, out, BEN_GRAHAM_GREY)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _disc(size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius


def prepare_image(image: np.ndarray | str | Path, spec: PreprocessSpec) -> tuple[np.ndarray, bool]:
    """Camera image (array or file) -> (uint8 (size, size, 3), fov_found).

    The field of view is always looked for (``fov_found`` is meaningful even without cropping); with
    ``spec.crop_fov`` the square around it is what gets resized, otherwise the whole frame padded square.
    """
    out, found = prepare_with_field(image, spec)
    return out, found is not None


def prepare_with_field(image: np.ndarray | str | Path, spec: PreprocessSpec) -> tuple[np.ndarray, FieldOfView | None]:
    """:func:`prepare_image`, returning the field of view it found (None: none) instead of only whether it found
    one, so a caller that needs the field (``predict``'s fundus check) does not search for it a second time."""
    rgb = load_rgb(image, draft_size=spec.draft_size) if isinstance(image, (str, Path)) else np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or min(rgb.shape[:2]) < 1:
        raise DataError(f"image array has shape {rgb.shape}; expected (H, W, 3) RGB")
    rgb = rgb[:, :, :3].astype(np.uint8, copy=False)
    h, w = rgb.shape[:2]
    found = find_field(rgb, spec.fov_threshold, spec.version)
    top, left, side = _square_window(h, w, found, spec.crop_fov)
    # One compiled pass with Pillow's arithmetic where it is built (tlcompile.runtime.fast_preprocess), else Pillow.
    out = fast_preprocess.crop_resize(rgb, top, left, side, spec.size)
    if out is None:
        out = resize(crop_square(rgb, top, left, side), spec.size)
    if spec.ben_graham or spec.circular_mask is not None:
        # The field in output pixels: the fitted circle (or the inscribed one when none was found), cut to the part of
        # the square that came from the frame (the black fill beyond a clipped edge is not fundus).
        scale = spec.size / side
        if found is not None:
            cx, cy, radius = (
                (found.cx - left + 0.5) * scale - 0.5,
                (found.cy - top + 0.5) * scale - 0.5,
                found.radius * scale,
            )
        else:
            cx = cy = (spec.size - 1) / 2
            radius = spec.size / 2
        # One pixel in from the edge: resizing blends the black surround into the rim pixels, which the 4x contrast
        # of Ben Graham's subtraction would turn into a dark outline.
        field_mask = _disc(spec.size, cx, cy, radius - 1.0)
        frame = np.zeros((spec.size, spec.size), dtype=bool)
        y0, y1 = max(0, round(-top * scale) + 1), min(spec.size, round((h - top) * scale) - 1)
        x0, x1 = max(0, round(-left * scale) + 1), min(spec.size, round((w - left) * scale) - 1)
        frame[y0:y1, x0:x1] = True
        field_mask &= frame
        if spec.ben_graham:
            out = ben_graham(out, field_mask, radius)
        if spec.circular_mask is not None:
            background = BEN_GRAHAM_GREY if spec.ben_graham else 0
            out = np.where(_disc(spec.size, cx, cy, spec.circular_mask * radius)[:, :, None], out, np.uint8(background))
    return np.ascontiguousarray(out, dtype=np.uint8), found


def to_input(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] and normalised."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    # The same float32 operations as (x / 255 - mean) / std, in place in one contiguous buffer (no temporaries).
    out = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
    if out is x or np.shares_memory(out, x):
        out = out.copy()  # a float32 NCHW input: never modify the caller's array
    np.divide(out, np.float32(255.0), out=out)
    np.subtract(out, mean, out=out)
    np.divide(out, std, out=out)
    return out


class LazyInputs:
    """The network inputs of a stack of uint8 images, made a slice at a time: ``inputs[i:j]`` is
    ``to_input(images[i:j], spec)`` (the same floats: to_input works image by image). A whole split, a memory map
    of the disk store included, is never held as float32 (4x its uint8 size); :func:`predict_logits
    <tlcompile.runtime.inference.predict_logits>` reads it in batches."""

    def __init__(self, images: np.ndarray, spec: PreprocessSpec) -> None:
        self.images, self.spec = images, spec

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, h, w = self.images.shape[:3]
        return (n, 3, h, w)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: slice) -> np.ndarray:
        return to_input(self.images[key], self.spec)
