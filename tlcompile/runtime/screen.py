"""Cheap checks that a decoded image is an undamaged fundus photograph, before the model is asked (never torch).

The model answers for any input: a cat photo got "refer" with P = 1.0, and a JPEG with 70% of its data zeroed
(which decodes to a flat grey block) got "no referral". These checks catch such inputs in a few milliseconds;
they are not the image-quality gate (:mod:`tlcompile.runtime.quality`), which measures focus, exposure and the rest:

- :func:`damage_reason`: a large region that is not the black surround and repeats exactly every 16 pixels across
  and down: flat grey, or the same 8x8/16x16 block again and again, the way a JPEG decoder fills data it lost (a
  camera or a transfer that zeroed part of the file). Such a file is reported as damaged.
- :func:`too_small_reason`: the field of view is under a quarter of the model's input across (a thumbnail or a
  preview sent instead of the camera's photo): the model would see pixels made up by interpolation, and every quality
  measure would read it as out of focus, so the advice is to send the full-resolution photo, not to retake it.
- :func:`not_fundus_reason`: the field is not fundus-like: its mean colour is not red-dominant with little blue
  (colour photographs; monochrome red-free images are accepted), or, where a circular field was fitted with room
  around it, the surround is not dark.

Thresholds were set on the synthetic generator's styles, scikit-image's retina() and microaneurysms() (which must
pass) and its ordinary photos (chelsea, astronaut, rocket, coffee), with margins; see tests/runtime/test_screen.py.
"""

from __future__ import annotations

import math

import numpy as np

from tlcompile.runtime import fast_preprocess
from tlcompile.runtime.preprocess import (
    FieldOfView,
    histogram,
    luminance,
    median_of_histogram,
    percentile_of_histogram,
)

# A pixel counts as 'repeated' when it equals the pixels REPEAT_PERIOD to its right and below exactly and is not
# near black: true of flat fill and of any pattern of JPEG blocks (8x8, or 16x16 MCUs with chroma subsampling,
# also after a draft scale-down), rarely of a photograph's texture.
REPEAT_PERIOD = 16
FLAT_MIN_BRIGHTNESS = 30
MAX_FLAT_FRACTION = 0.08  # of the frame; photographs and the generator stay under 0.01, zero-filled JPEGs reach 0.1-0.5
MONOCHROME_CHROMA = 12  # spread of the field's mean R, G, B below which the photo is monochrome (red-free)
# A colour fundus photograph's field is red-dominant with little blue. Where a round field with a dark surround was
# found, the limits are lenient (the generator's styles reach B/R 0.53 and G/R 1.08); where the field fills the
# frame (nothing else says 'fundus'), blue must stay under half the red (a cat photo: 0.57).
MAX_BLUE_PER_RED = (0.6, 0.5)  # (round field with a dark surround, field filling the frame)
MIN_RED_PER_GREEN = 0.9
# The field of view must be at least this share of the model's input size across: a smaller one is upsampled more
# than 4x. Thumbnails and previews fall under it; camera photos are draft-decoded to at least twice the input on each
# side, so only a field under an eighth of the frame's shorter side could (none seen), the synthetic generator fills
# its frame, and the golden frames keep a field of 2 x quality.SHRINK_RADIUS = 512 px, a quarter of the largest input
# a recipe allows (1024 px) twice over.
MIN_FIELD_SHARE = 0.25
MIN_SURROUND_FRACTION = 0.02  # of the frame, outside the circle, for the surround rule to apply
SURROUND_DARK = (48, 0.4)  # its 90th percentile brightness must stay under max(48, 0.4 x the field's median)


def _grid(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    step = max(1, min(rgb.shape[:2]) // 512)
    return rgb[::step, ::step], step


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel: all channels of ``a`` equal those of ``b``. The same answer as ``(a == b).all(axis=2)``, which
    reduces over a 3-long axis pixel by pixel (10x slower). uint8 RGB views whose rows are runs of bytes (windows of
    one image) are compared byte for byte along each row, with SIMD, and a pixel is equal where its three bytes are:
    the AND of the comparison and its copies shifted by one and two bytes, at the pixel's first byte (0.07 ms on a
    500x375 draft against 0.29 ms channel plane by channel plane, the other layouts' way)."""
    if a.dtype == b.dtype == np.uint8 and a.ndim == 3 and a.shape == b.shape and a.shape[2] == 3 and a.size:
        if a.strides[1:] == b.strides[1:] == (3, 1):
            h, w = a.shape[:2]
            rows_a = np.lib.stride_tricks.as_strided(a, (h, 3 * w), (a.strides[0], 1), writeable=False)
            rows_b = np.lib.stride_tricks.as_strided(b, (h, 3 * w), (b.strides[0], 1), writeable=False)
            equal = rows_a == rows_b
            all3 = equal[:, :-2] & equal[:, 1:-1]
            all3 &= equal[:, 2:]
            return all3[:, ::3]
    same = a[:, :, 0] == b[:, :, 0]
    for c in range(1, a.shape[2]):
        same &= a[:, :, c] == b[:, :, c]
    return same


def _within(d2: np.ndarray, dx: np.ndarray, dy: np.ndarray, radius: float, *, inner: bool) -> np.ndarray:
    """``np.hypot(dx, dy) <= radius`` (``inner``) or ``>= radius``, from the squared distance ``d2`` where that is
    certain: a pixel further than a relative 1e-9 from the circle is on the same side whichever way it is rounded
    (hypot is within an ulp, d2 within a few); only the pixels in that thin band get the exact hypot."""
    r2 = radius * radius
    low, high = r2 * (1 - 1e-9), r2 * (1 + 1e-9)
    result = d2 <= low if inner else d2 >= high
    band = np.flatnonzero((d2 > low) & (d2 < high))
    if band.size:
        iy, ix = np.unravel_index(band, d2.shape)
        dist = np.hypot(dx[0, ix], dy[iy, 0])
        result[iy, ix] = dist <= radius if inner else dist >= radius
    return result


def damage_reason(rgb: np.ndarray) -> str | None:
    """Why the decoded image looks damaged (a large flat block of one colour), or None."""
    small, step = _grid(np.asarray(rgb))
    p = REPEAT_PERIOD
    if small.ndim != 3 or min(small.shape[:2]) < 4 * p:
        return None
    h, w = small.shape[:2]
    count = fast_preprocess.repeated_count(np.asarray(rgb), step, p, FLAT_MIN_BRIGHTNESS)  # one compiled pass
    if count is None:
        centre = small[: h - p, : w - p]
        # The luminance of the whole draft, then the window: a contiguous image takes luminance's fast path, a window
        # not.
        repeated = (
            _same(centre, small[: h - p, p:])
            & _same(centre, small[p:, : w - p])
            & (luminance(small)[: h - p, : w - p] >= FLAT_MIN_BRIGHTNESS)
        )
        count = int(np.count_nonzero(repeated))
    fraction = float(count) / (h * w)
    if fraction <= MAX_FLAT_FRACTION:
        return None
    return (
        f"the image looks damaged: {fraction:.0%} of it is flat or one block repeated exactly (how a decoder fills "
        "data lost from a file); retake or resend it"
    )


def too_small_reason(found: FieldOfView | None, size: int, shape: tuple[int, ...]) -> str | None:
    """Why the field is too small to grade for a model of ``size`` px input, or None (also None when no field was
    found: that case is already ungradable). ``shape``: the decoded image's; a circle fitted to a field cut by the
    frame may reach past it, so the field is taken as at most the image's longer side across."""
    if found is None:
        return None
    across = min(2.0 * found.radius, float(max(shape[:2])))
    least = math.ceil(MIN_FIELD_SHARE * size)
    if across >= least:
        return None
    h, w = shape[:2]
    return (
        f"resolution too low: the field of view is {math.floor(across)} px across in a {w}x{h} px image, under a "
        f"quarter of the model's {size} px input (at least {least} px); send the camera's full-resolution photo"
    )


def not_fundus_reason(rgb: np.ndarray, found: FieldOfView | None) -> str | None:
    """Why the image is not a fundus photograph's field, or None (also None when no field was found: that case is
    already ungradable)."""
    if found is None:
        return None
    rgb = np.asarray(rgb)
    small, step = _grid(rgb)
    h, w = small.shape[:2]
    r_in, r_out = 0.95 * found.radius, 1.05 * found.radius
    stats = fast_preprocess.field_statistics(rgb, step, found.cx, found.cy, r_in, r_out)  # one compiled pass
    if stats is None:
        return _not_fundus_numpy(small, step, found, r_in, r_out)
    n_inside, n_outside, lum_inside, lum_outside, sums = stats
    if n_inside < 16:
        return None
    surrounded = found.fitted and n_outside / (h * w) >= MIN_SURROUND_FRACTION
    if surrounded:
        surround = percentile_of_histogram(lum_outside, 90)
        limit = max(SURROUND_DARK[0], SURROUND_DARK[1] * (median_of_histogram(lum_inside) or 0.0))
        if surround > limit:
            return _not_dark(surround, limit)
    # Sums of uint8 values are exact in any order: the same mean as numpy's, bit for bit.
    r, g, b = (float(total) / n_inside for total in sums)
    return _colour_reason(r, g, b, surrounded)


def _not_fundus_numpy(small: np.ndarray, step: int, found: FieldOfView, r_in: float, r_out: float) -> str | None:
    """:func:`not_fundus_reason` in numpy, where the compiled pass does not run."""
    h, w = small.shape[:2]
    # The same distances as np.hypot over a full np.mgrid (what decided before), without the h x w hypot: see _within.
    yy, xx = np.ogrid[:h, :w]
    dx, dy = xx * step - found.cx, yy * step - found.cy
    d2 = dy * dy + dx * dx
    inside = _within(d2, dx, dy, r_in, inner=True)
    n_inside = np.count_nonzero(inside)
    if n_inside < 16:
        return None
    outside = _within(d2, dx, dy, r_out, inner=False)
    surrounded = found.fitted and np.count_nonzero(outside) / outside.size >= MIN_SURROUND_FRACTION
    exact = small.dtype == np.uint8 and small.ndim == 3 and small.shape[2] == 3  # else numpy's own statistics
    if surrounded:
        lum = luminance(small)
        if exact:  # the same floats as np.percentile / np.median, from histograms of the selected pixels
            surround = percentile_of_histogram(histogram(lum, outside), 90)
            limit = max(SURROUND_DARK[0], SURROUND_DARK[1] * (median_of_histogram(histogram(lum, inside)) or 0.0))
        else:
            surround = float(np.percentile(lum[outside], 90))
            limit = max(SURROUND_DARK[0], SURROUND_DARK[1] * float(np.median(lum[inside])))
        if surround > limit:
            return _not_dark(surround, limit)
    if exact:
        # Sums of uint8 values are exact in any order, so integer sums per channel give the mean bit for bit (numpy
        # sums in float64, exactly, then divides by the count, as here): from the field's masked histogram of each
        # channel, one pass in Pillow (0.24 ms against 0.33 for three selections of a strided plane).
        counts = histogram(small, inside).reshape(3, 256)
        r, g, b = (float(total) / n_inside for total in (counts @ np.arange(256, dtype=np.int64)).tolist())
    else:
        r, g, b = small[inside].astype(np.float64).mean(axis=0)
    return _colour_reason(r, g, b, surrounded)


def _not_dark(surround: float, limit: float) -> str:
    return (
        f"not a fundus photograph: the area around the round field is not dark (brightness {surround:.0f}, "
        f"limit {limit:.0f}); retake or refer"
    )


def _colour_reason(r: float, g: float, b: float, surrounded: bool) -> str | None:
    """Why the field's mean colour is not a colour fundus photograph's (or a monochrome red-free one's), or None."""
    blue_limit = MAX_BLUE_PER_RED[0] if surrounded else MAX_BLUE_PER_RED[1]
    if max(r, g, b) - min(r, g, b) >= MONOCHROME_CHROMA and (r < MIN_RED_PER_GREEN * g or r < b or b > blue_limit * r):
        return (
            f"not a fundus photograph: the field's mean colour (R {r:.0f}, G {g:.0f}, B {b:.0f}) is not red-dominant "
            f"with little blue (B/R {b / max(r, 1e-9):.2f}, limit {blue_limit}); retake or refer"
        )
    return None
