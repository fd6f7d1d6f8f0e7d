"""FROZEN REFERENCE: tlcompile/runtime/screen.py of commit ba6566d (PREPROCESS_VERSION 2), before the speed-up.

Never edit this file: tests/unit/test_preprocess_identity.py checks that the runtime's faster code gives
bit-identical pixels, fields of view and screening verdicts to this one. The original docstring follows.

Cheap checks that a decoded image is an undamaged fundus photograph, before the model is asked (never torch).

The model answers for any input: a cat photo got "refer" with P = 1.0, and a JPEG with 70% of its data zeroed
(which decodes to a flat grey block) got "no referral". These checks catch such inputs in a few milliseconds;
they are not an image-quality (gradability) model:

- :func:`damage_reason`: a large region that is not the black surround and repeats exactly every 16 pixels across
  and down: flat grey, or the same 8x8/16x16 block again and again, the way a JPEG decoder fills data it lost (a
  camera or a transfer that zeroed part of the file). Such a file is reported as damaged.
- :func:`not_fundus_reason`: the field is not fundus-like: its mean colour is not red-dominant with little blue
  (colour photographs; monochrome red-free images are accepted), or, where a circular field was fitted with room
  around it, the surround is not dark.

Thresholds were set on the synthetic generator's styles, scikit-image's retina() and microaneurysms() (which must
pass) and its ordinary photos (chelsea, astronaut, rocket, coffee), with margins; see tests/runtime/test_screen.py.
"""

from __future__ import annotations

import numpy as np

from tests.unit.preprocess_v2_reference import FieldOfView

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
MIN_SURROUND_FRACTION = 0.02  # of the frame, outside the circle, for the surround rule to apply
SURROUND_DARK = (48, 0.4)  # its 90th percentile brightness must stay under max(48, 0.4 x the field's median)


def _grid(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    step = max(1, min(rgb.shape[:2]) // 512)
    return rgb[::step, ::step], step


def damage_reason(rgb: np.ndarray) -> str | None:
    """Why the decoded image looks damaged (a large flat block of one colour), or None."""
    small, _ = _grid(np.asarray(rgb))
    p = REPEAT_PERIOD
    if small.ndim != 3 or min(small.shape[:2]) < 4 * p:
        return None
    h, w = small.shape[:2]
    centre = small[: h - p, : w - p]
    repeated = (
        (centre == small[: h - p, p:]).all(axis=2)
        & (centre == small[p:, : w - p]).all(axis=2)
        & (centre.max(axis=2) >= FLAT_MIN_BRIGHTNESS)
    )
    fraction = float(repeated.sum()) / (h * w)
    if fraction <= MAX_FLAT_FRACTION:
        return None
    return (
        f"the image looks damaged: {fraction:.0%} of it is flat or one block repeated exactly (how a decoder fills "
        "data lost from a file); retake or resend it"
    )


def not_fundus_reason(rgb: np.ndarray, found: FieldOfView | None) -> str | None:
    """Why the image is not a fundus photograph's field, or None (also None when no field was found: that case is
    already ungradable)."""
    if found is None:
        return None
    rgb = np.asarray(rgb)
    small, step = _grid(rgb)
    h, w = small.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(xx * step - found.cx, yy * step - found.cy)
    inside = dist <= 0.95 * found.radius
    if inside.sum() < 16:
        return None
    outside = dist >= 1.05 * found.radius
    surrounded = found.fitted and outside.mean() >= MIN_SURROUND_FRACTION
    if surrounded:
        lum = small.max(axis=2)
        surround = float(np.percentile(lum[outside], 90))
        limit = max(SURROUND_DARK[0], SURROUND_DARK[1] * float(np.median(lum[inside])))
        if surround > limit:
            return (
                f"not a fundus photograph: the area around the round field is not dark (brightness {surround:.0f}, "
                f"limit {limit:.0f}); retake or refer"
            )
    r, g, b = small[inside].astype(np.float64).mean(axis=0)
    blue_limit = MAX_BLUE_PER_RED[0] if surrounded else MAX_BLUE_PER_RED[1]
    if max(r, g, b) - min(r, g, b) >= MONOCHROME_CHROMA and (r < MIN_RED_PER_GREEN * g or r < b or b > blue_limit * r):
        return (
            f"not a fundus photograph: the field's mean colour (R {r:.0f}, G {g:.0f}, B {b:.0f}) is not red-dominant "
            f"with little blue (B/R {b / max(r, 1e-9):.2f}, limit {blue_limit}); retake or refer"
        )
    return None
