"""The image-quality gate: is a fundus photograph gradable? Measures, limits, verdict (numpy + Pillow, never torch).

``predict``, ``serve`` and ``verify`` run it on what ``prepare_photo`` already decoded (the RGB frame and the
field of view it fitted). A photo that fails gets ``ungradable`` with the reasons and the advice to retake it, and no
referral decision: the model was trained and validated on gradable photos only.

What is measured
----------------
The field is resampled so that its radius is :data:`WORK_RADIUS` pixels (every measure is then in units of the
field, whatever the camera's resolution) and the measures are taken inside 0.92 of the radius (the rim is dark by
vignetting and soft by the lens):

========== ============================================================================================= =========
measure    what it is                                                                                     fails if
========== ============================================================================================= =========
coverage   share of the field's 8x8-pixel blocks that lie in the frame and are not black (< 0.15 of the  below
           field's median brightness): a field cut by the frame, an eyelid or a half-occluded pupil
focus      vessel visibility: the 95th percentile of |green - its 3x3 local mean| over the field,        below
           divided by the field's median green (a blur-sensitive focus measure, normalised for exposure;
           vessels and lesion edges are the fine structure a focused fundus photo has)
brightness median brightness (max of R, G, B) of the field: under-exposure                               below
saturated  share of field pixels whose green channel is >= 200: over-exposure washes out the green channel  above
           that carries the contrast of vessels and lesions (a bright red channel is common and harmless;
           in a well-exposed photo only the optic disc's cup reaches it)
evenness   10th percentile of a block's mean brightness over the median of the blocks at the same radius   below
           (radial vignetting is normal; a dark side, an eyelash shadow or a crescent is not)
glare      share of field pixels whose green is >= 200 and over twice the field's median green: specular  above
           reflexes and light leaks in an otherwise normally exposed photo (the optic cup alone stays
           under about half a percent)
========== ============================================================================================= =========

Each measure has a limit (calibrated at build time on val images a grader could grade, see
:func:`calibrate`, or fixed by the recipe's ``quality.limits``). Per measure the ratio ``r`` of value to limit
(limit to value for the 'above' measures) gives a score ``r^4 / (1 + r^4)`` (0.5 at the limit); the photo's quality
score is the lowest of them, so it is gradable exactly when its score is >= 0.5, and the reasons are the measures
below their limits.

Cost: one crop, one Pillow resize to about 128 x 128, Pillow histograms and a few numpy passes: 2-3 ms per photo on a
500x375 draft (the README's quality section has the measurement and its CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlcompile.errors import BundleError
from tlcompile.runtime.manifest import inside
from tlcompile.runtime.preprocess import (
    FieldOfView,
    find_field,
    histogram,
    luminance,
    median_of_histogram,
    read_input,
)

QUALITY_VERSION = 1  # bumped whenever a measure's arithmetic changes: limits calibrated for another version are void
WORK_RADIUS = 64  # field radius in pixels the measures are taken at
_INNER = 0.92  # of the radius: inside the rim
_BLOCK = 8
_DARK_BLOCK = 0.15  # of the field's median brightness: a block this dark is not seen (occluded or outside)
_SATURATED_GREEN = 200
_GLARE_RELATIVE = 2.0
_STEEPNESS = 4

# measure -> (direction: fails below 'min' / above 'max', default limit, the tightest and the loosest limit a
# calibration may set: a measure that every gradable photo passes by far is not set on its own extreme value)
MEASURES: dict[str, tuple[str, float, float, float]] = {
    "coverage": ("min", 0.85, 0.92, 0.6),
    "focus": ("min", 0.08, 1.0, 0.0),
    "brightness": ("min", 40.0, 60.0, 10.0),
    "saturated": ("max", 0.15, 0.15, 0.6),
    "evenness": ("min", 0.5, 0.8, 0.2),
    "glare": ("max", 0.02, 0.01, 0.2),
}
# Measures whose limits are not calibrated but set by what the build validated on (its val photos as taken): a photo
# past one is outside what the model was shown to read. measure -> direction. A gate has 'chroma' (its limit
# MONOCHROME_CHROMA) when no val photo was monochrome, and 'green_median' (the val photos' largest) and 'green_low' (the
# same median green, their smallest) when any had a field; its calibrated 'brightness' limit is raised to their
# darkest's. An older tlcompile refuses a gate with them ("not a measure"), rather than deciding without them.
DOMAIN: dict[str, str] = {"chroma": "min", "green_median": "max", "green_low": "min"}
#: Every measure a gate may hold a limit for, in the order its reasons are given.
# domain first (what a retake must change), but green_low last: a photo too dark overall is said so first
GATED: dict[str, str] = {
    **{k: v for k, v in DOMAIN.items() if k != "green_low"},
    **{k: v[0] for k, v in MEASURES.items()},
    "green_low": DOMAIN["green_low"],
}

#: Reason codes (CSV, serve records) and the words for each measure's failure.
REASONS = {
    "field": "no field of view found",
    "resolution": "resolution too low",  # set by predict (runtime/screen.py too_small_reason), before the measures
    "coverage": "partial field of view",
    "focus": "out of focus",
    "brightness": "too dark",
    "saturated": "over-exposed",
    "evenness": "uneven illumination",
    "glare": "glare or artefact",
    # the DOMAIN measures: what the build validated on
    "chroma": "monochrome (red-free) photograph, and this model was validated on colour photographs only",
    "green_median": "over-exposed beyond every photo the model was validated on",
    "green_low": "darker in green (the vessels' channel) than every photo the model was validated on",
}
RETAKE = "retake"


@dataclass(frozen=True)
class Assessment:
    """One photo's quality: the measures, the score (0-1; >= 0.5 passes), and the failed measures (reason codes)."""

    score: float
    reasons: tuple[str, ...]
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def gradable(self) -> bool:
        return not self.reasons

    def words(self) -> str:
        """'out of focus, too dark'."""
        return ", ".join(REASONS.get(code, code) for code in self.reasons)

    def sentence(self, limits: dict[str, float]) -> str:
        """'ungradable image: out of focus (focus 0.031, limit 0.080), too dark (...); retake'."""
        parts = []
        for code in self.reasons:
            if code in self.measures:
                parts.append(f"{REASONS[code]} ({code} {self.measures[code]:.3g}, limit {limits[code]:.3g})")
            else:
                parts.append(REASONS.get(code, code))
        return f"ungradable image: {', '.join(parts)}; {RETAKE}"


def _work_image(rgb: np.ndarray, found: FieldOfView) -> tuple[np.ndarray, np.ndarray]:
    """The field resampled to radius WORK_RADIUS on a (2R, 2R, 3) uint8 canvas, and where the canvas is in frame."""
    h, w = rgb.shape[:2]
    top, bottom, left, right = found.box(h, w)
    side = 2 * WORK_RADIUS
    canvas = np.zeros((side, side, 3), np.uint8)
    inframe = np.zeros((side, side), bool)
    if bottom <= top or right <= left or found.radius <= 0:
        return canvas, inframe
    scale = WORK_RADIUS / found.radius
    # canvas coordinates of the crop's corner: the circle's top-left (cx - r, cy - r) maps to (0, 0)
    y0 = (top - (found.cy - found.radius)) * scale
    x0 = (left - (found.cx - found.radius)) * scale
    ch, cw = max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))
    crop = np.ascontiguousarray(rgb[top:bottom, left:right, :3])
    small = np.asarray(Image.fromarray(crop).resize((cw, ch), Image.BILINEAR, reducing_gap=2.0))
    ty, tx = round(y0), round(x0)
    sy0, sx0 = max(0, -ty), max(0, -tx)
    dy0, dx0 = max(0, ty), max(0, tx)
    hh, ww = min(ch - sy0, side - dy0), min(cw - sx0, side - dx0)
    if hh > 0 and ww > 0:
        canvas[dy0 : dy0 + hh, dx0 : dx0 + ww] = small[sy0 : sy0 + hh, sx0 : sx0 + ww]
        inframe[dy0 : dy0 + hh, dx0 : dx0 + ww] = True
    return canvas, inframe


def _disc_masks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    side = 2 * WORK_RADIUS
    c = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side]
    rho = np.hypot(xx - c, yy - c) / WORK_RADIUS
    inner = rho <= _INNER
    nb = side // _BLOCK
    bc = (np.arange(nb) + 0.5) * _BLOCK - 0.5
    brho = np.hypot(bc[None, :] - c, bc[:, None] - c) / WORK_RADIUS
    return inner, brho <= _INNER - 0.04, brho


_INNER_MASK, _BLOCK_MASK, _BLOCK_RHO = _disc_masks()  # constants of WORK_RADIUS, computed once at import


def _blocks(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0] // _BLOCK
    return x.reshape(nb, _BLOCK, nb, _BLOCK).mean(axis=(1, 3))


def measure(rgb: np.ndarray, found: FieldOfView) -> dict[str, float]:
    """The quality measures of a photo (uint8 RGB) whose field of view was found (see the module docstring)."""
    canvas, inframe = _work_image(np.asarray(rgb), found)
    lum = luminance(canvas)  # max of R, G, B, plane by plane (canvas.max(axis=2) is 10x slower)
    green = canvas[:, :, 1].astype(np.float32)
    inside = _INNER_MASK & inframe
    n_inside = int(np.count_nonzero(inside))
    if n_inside < 64:
        # (no colour or exposure to speak of: a gate's DOMAIN limits skip a measure a photo does not have, so such a
        # frame is refused for its coverage, not called monochrome)
        return {"coverage": 0.0, "focus": 0.0, "brightness": 0.0, "saturated": 0.0, "evenness": 0.0, "glare": 0.0}
    # medians of uint8 planes from Pillow histograms: the same floats as np.median, without copies or partitions
    green8 = canvas[:, :, 1]
    median = median_of_histogram(histogram(lum, inside)) or 0.0
    block_lum = _blocks(lum.astype(np.float32))
    block_in = _blocks(inframe.astype(np.float32)) > 0.5
    seen = _BLOCK_MASK & block_in & (block_lum >= _DARK_BLOCK * max(median, 1.0))
    coverage = float(np.count_nonzero(seen)) / float(np.count_nonzero(_BLOCK_MASK))
    # focus: fine detail of the green channel where the field is seen (not at the rim, not on black occluders)
    seen_px = np.repeat(np.repeat(seen, _BLOCK, axis=0), _BLOCK, axis=1) & inside
    pad = np.pad(green, 1, mode="edge")
    local = (
        pad[:-2, :-2] + pad[:-2, 1:-1] + pad[:-2, 2:] + pad[1:-1, :-2] + pad[1:-1, 1:-1] + pad[1:-1, 2:]
        + pad[2:, :-2] + pad[2:, 1:-1] + pad[2:, 2:]
    ) / 9.0  # fmt: skip
    interior = seen_px.copy()
    interior[1:-1, 1:-1] &= seen_px[:-2, 1:-1] & seen_px[2:, 1:-1] & seen_px[1:-1, :-2] & seen_px[1:-1, 2:]
    detail = np.abs(green - local)[interior]
    green_median = (median_of_histogram(histogram(green8, interior)) or 0.0) if detail.size else 0.0
    focus = float(np.percentile(detail, 95)) / max(green_median, 8.0) if detail.size >= 64 else 0.0
    green_counts = histogram(green8, inside)
    green_median_all = median_of_histogram(green_counts) or 0.0
    glare_cut = max(_GLARE_RELATIVE * green_median_all, _SATURATED_GREEN)
    glare = float(green_counts[math.ceil(glare_cut) :].sum()) / n_inside
    saturated = float(green_counts[_SATURATED_GREEN:].sum()) / n_inside
    # evenness: each seen block against the median of the seen blocks in its radial ring
    ratios = []
    for lo, hi in ((0.0, 0.35), (0.35, 0.6), (0.6, 0.75), (0.75, 1.0)):
        ring = seen & (_BLOCK_RHO >= lo) & (_BLOCK_RHO < hi)
        if np.count_nonzero(ring) >= 3:
            values = block_lum[ring]
            ratios.append(values / max(float(np.median(values)), 1.0))
    ring_all = _BLOCK_MASK & block_in
    # blocks not seen count as dark: an eyelash shadow that reaches black is uneven as well as unseen
    dark = np.count_nonzero(ring_all & ~seen)
    merged = np.concatenate([*ratios, np.zeros(dark, np.float32)]) if ratios else np.zeros(1)
    evenness = float(np.percentile(merged, 10))
    return {
        "coverage": round(coverage, 6),
        "focus": round(focus, 6),
        "brightness": round(median, 3),
        "saturated": round(saturated, 6),
        "evenness": round(evenness, 6),
        "glare": round(glare, 6),
        # the DOMAIN measures: the spread of the field's mean R, G and B (whole-number sums from the planes'
        # histograms: exact), under MONOCHROME_CHROMA for a monochrome (red-free) photo; and its median green
        "chroma": round(_chroma(canvas, inside, green_counts, n_inside), 3),
        "green_median": round(green_median_all, 3),
        # the same median green, held to the darkest val photo's (a gamma or a green cast leaves 'brightness', the
        # median of max(R, G, B), in range while the vessels fade)
        "green_low": round(green_median_all, 3),
    }


def _chroma(canvas: np.ndarray, inside: np.ndarray, green_counts: np.ndarray, n: int) -> float:
    levels = np.arange(256, dtype=np.int64)
    means = [
        float(int(counts.astype(np.int64) @ levels)) / n
        for counts in (histogram(canvas[:, :, 0], inside), green_counts, histogram(canvas[:, :, 2], inside))
    ]
    return max(means) - min(means)


def _ratio(name: str, value: float, limit: float) -> float:
    direction = GATED[name]
    if direction == "min":
        return value / limit if limit > 0 else math.inf
    return limit / value if value > 0 else math.inf


def judge(measures: dict[str, float], limits: dict[str, float]) -> Assessment:
    """The verdict on measured values: the lowest per-measure score and the measures past their limits."""
    scores, reasons = [], []
    for name in GATED:
        if name not in limits or name not in measures:
            continue
        r = _ratio(name, measures[name], limits[name])
        scores.append(1.0 if math.isinf(r) else r**_STEEPNESS / (1.0 + r**_STEEPNESS))
        if r < 1.0:
            reasons.append(name)
    score = min(scores) if scores else 1.0
    return Assessment(score=round(float(score), 4), reasons=tuple(reasons), measures=measures)


@dataclass(frozen=True)
class QualityGate:
    """The gate a bundle carries (bundle.json ``quality``): the limits per measure and how they were set."""

    limits: dict[str, float]
    version: int = QUALITY_VERSION

    @property
    def colour_only(self) -> bool:
        """The build validated colour photographs only: a monochrome one is refused (limit on 'chroma')."""
        return "chroma" in self.limits

    def assess(self, rgb: np.ndarray, found: FieldOfView | None) -> Assessment:
        if found is None:
            return Assessment(score=0.0, reasons=("field",))
        return judge(measure(rgb, found), self.limits)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "limits": dict(self.limits)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "bundle.json quality") -> QualityGate:
        """Read and check a gate; a bad block raises :class:`BundleError` naming the key and what is valid."""
        if not isinstance(d, dict):
            raise BundleError(f"{where} is {d!r}; expected an object with version and limits")
        version = d.get("version")
        if version != QUALITY_VERSION:
            raise BundleError(
                f"{where}.version is {version!r}; this tlcompile measures quality version {QUALITY_VERSION} "
                "(rebuild the bundle, or use the tlcompile that built it)"
            )
        limits = d.get("limits")
        if not isinstance(limits, dict) or not limits:
            raise BundleError(f"{where}.limits is {limits!r}; expected an object of measure: limit")
        for name, value in limits.items():
            if name not in GATED:
                raise BundleError(f"{where}.limits.{name}: not a measure; valid: {', '.join(GATED)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise BundleError(f"{where}.limits.{name} is {value!r}; expected a finite number >= 0")
        return cls(limits={k: float(v) for k, v in limits.items()}, version=version)


# ------------------------------------------------------------------------------------------------ calibration
def calibrate(
    values: dict[str, np.ndarray], target: float, fixed: dict[str, float] | None = None
) -> tuple[dict[str, float], float]:
    """Limits such that ``target`` of the gradable photos measured in ``values`` (measure -> array over photos) pass.

    Only gradable photos are used: the limits sit at the edge of what gradable photos look like, so the gate's
    catch of ungradable ones, measured on other images, is not tuned to the degradations it is tested on. Every
    calibrated measure rejects the same share ``q`` of the gradable photos (its ``q`` quantile, kept within the
    measure's bounds in :data:`MEASURES`); ``q`` is searched so that the share passing all of them is ``target``.
    ``fixed`` limits (the recipe's ``quality.limits``) are used as given. Returns (limits, share passing)."""
    fixed = dict(fixed or {})
    n = len(next(iter(values.values())))
    free = [m for m in MEASURES if m not in fixed]

    def limits_at(q: float) -> dict[str, float]:
        out = dict(fixed)
        for m in free:
            direction, _, tight, loose = MEASURES[m]
            v = np.asarray(values[m], np.float64)
            if direction == "min":
                out[m] = float(np.clip(np.quantile(v, q), loose, tight))
            else:
                out[m] = float(np.clip(np.quantile(v, 1.0 - q), tight, loose))
        return {m: out[m] for m in MEASURES}

    def share(limits: dict[str, float]) -> float:
        ok = np.ones(n, bool)
        for m, lim in limits.items():
            v = np.asarray(values[m], np.float64)
            ok &= v >= lim if MEASURES[m][0] == "min" else v <= lim
        return float(ok.mean()) if n else 1.0

    lo, hi = 0.0, max(0.0, 1.0 - target)
    for _ in range(40):  # bisection on the per-measure reject share: the joint pass share falls as q rises
        mid = (lo + hi) / 2
        if share(limits_at(mid)) >= target:
            lo = mid
        else:
            hi = mid
    best = limits_at(lo)
    return {m: round(v, 6) for m, v in best.items()}, share(best)


# ------------------------------------------------------------------------------------------------ verify
SCORE_TOLERANCE = 1e-3  # the measures are a few float32 sums and percentiles: the same on every box within this
GREY_STEP_SHARE = 0.05  # share of pixels moved by one grey level in the random perturbations below
_SAFETY = 2.0  # a box may differ from the build by the perturbation's spread in either direction


def _one_grey_level(rgb: np.ndarray) -> list[np.ndarray]:
    """The frame as another Pillow build might decode or resize it: every pixel one grey level up, every pixel one
    down, and three fixed random sets of GREY_STEP_SHARE of the pixels moved by +-1 (export/bundle.py: resizes may
    differ by one rounding step between Pillow builds)."""
    x = np.asarray(rgb, np.int16)[:, :, :3]
    out = [x + 1, x - 1]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        moved = (rng.random(x.shape[:2]) < GREY_STEP_SHARE) * rng.choice(np.array([-1, 1], np.int16), x.shape[:2])
        out.append(x + moved[:, :, None])
    return [np.clip(v, 0, 255).astype(np.uint8) for v in out]


def golden_tolerance(
    rgb: np.ndarray, found: FieldOfView, limits: dict[str, float], base: dict[str, float] | None = None
) -> tuple[dict[str, float], float]:
    """How far one grey level of difference in the frame can move each measure and the score on this frame:
    (per-measure tolerance, score tolerance), each _SAFETY x the largest move over :func:`_one_grey_level`'s
    perturbations (the score's plus SCORE_TOLERANCE). ``base``: the frame's measures, when already taken."""
    base = measure(rgb, found) if base is None else base
    score = judge(base, limits).score
    spread = dict.fromkeys(GATED, 0.0)
    score_spread = 0.0
    for frame in _one_grey_level(rgb):
        f = find_field(frame)
        if f is None:
            continue
        m = measure(frame, f)
        for k in GATED:
            spread[k] = max(spread[k], abs(m.get(k, 0.0) - base.get(k, 0.0)))
        score_spread = max(score_spread, abs(judge(m, limits).score - score))
    return {k: _SAFETY * v + 1e-6 for k, v in spread.items()}, _SAFETY * score_spread + SCORE_TOLERANCE


def golden_mismatch(
    got: Assessment,
    stored_score: float,
    stored_reasons: list[str],
    tolerance: dict[str, float],
    score_tol: float,
    limits: dict[str, float],
) -> str | None:
    """Why this box's assessment of a golden frame does not reproduce the build's, or None when it does: the score
    within ``score_tol``, and the same reasons for every measure clear of its limit by more than its tolerance (a
    measure within one grey level's move of its limit may fall on either side on another box)."""
    if abs(got.score - stored_score) > score_tol:
        return f"score differs by {abs(got.score - stored_score):.4f} (tolerance here {score_tol:.4f})"
    if "field" in got.reasons or "field" in stored_reasons:
        return None if list(got.reasons) == list(stored_reasons) else "the field of view is found on one side only"
    for k, limit in limits.items():
        value = got.measures.get(k)
        if (k in got.reasons) != (k in stored_reasons) and (
            value is None or abs(value - limit) > tolerance.get(k, 0.0)
        ):
            shown = "absent" if value is None else f"{value:.4g}"
            return f"{k} {shown} is clear of its limit {limit:.4g} yet the verdict on it differs"
    unknown = set(stored_reasons) - set(limits)
    return f"unknown reasons {sorted(unknown)}" if unknown else None


@dataclass
class QualityCheck:
    """``tlcompile verify``'s check of the bundle's gate: the block is sound and reproduces, on this box, the scores
    and verdicts the build computed for the golden frames."""

    present: bool = False
    samples: int = 0
    max_abs_score_diff: float = 0.0
    limits: dict[str, float] = field(default_factory=dict)
    imageability: float | None = None
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the golden frames were not run (the bundle failed an earlier check)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if not self.present:
            return "  quality gate: absent (a bundle built without one: photos are not checked for quality)"
        if self.skipped:
            return f"  quality gate: present, {self.skipped}"
        if self.problems:
            return "  quality gate: FAIL"
        shown = f", imageability on test {self.imageability:.1%}" if self.imageability is not None else ""
        return (
            f"  quality gate: pass: {self.samples} golden frames give the build's scores and verdicts (max |Δscore| "
            f"{self.max_abs_score_diff:.1e}){shown}"
        )


def check_quality(root: Path, meta: dict[str, Any], where: str, draft_size: int) -> QualityCheck:
    """Check a bundle's ``quality`` block (absent: nothing to check, a bundle from before the gate)."""
    block = meta.get("quality")
    check = QualityCheck(present=block is not None)
    if block is None:
        return check
    try:
        gate = QualityGate.from_dict(block, f"{where}: quality")
    except BundleError as err:
        check.problems.append(str(err))
        return check
    check.limits = gate.limits
    image = block.get("imageability")
    check.imageability = image.get("value") if isinstance(image, dict) else None
    golden = block.get("golden")
    if not isinstance(golden, list) or not golden:
        check.problems.append(f"{where}: quality.golden must list the golden frames' expected scores")
        return check
    for i, g in enumerate(golden):
        if not isinstance(g, dict) or not isinstance(g.get("image"), str) or not isinstance(g.get("score"), float):
            check.problems.append(f"{where}: quality.golden[{i}] needs image (a path) and score (a number)")
            return check
        rgb, _ = read_input(inside(root, g["image"], f"{where}: quality.golden[{i}].image"), draft_size=draft_size)
        found = find_field(rgb)
        got = gate.assess(rgb, found)
        diff = abs(got.score - g["score"])
        check.max_abs_score_diff = max(check.max_abs_score_diff, diff)
        check.samples += 1
        stored = list(g.get("reasons", []))
        if found is None:
            why = None if list(got.reasons) == stored else "no field of view found on this box"
        elif diff <= SCORE_TOLERANCE and list(got.reasons) == stored:
            why = None  # reproduced: no tolerance can make it a mismatch, so the perturbed frames are not measured
        else:
            tolerance, score_tol = golden_tolerance(rgb, found, gate.limits, got.measures)
            why = golden_mismatch(got, g["score"], stored, tolerance, score_tol, gate.limits)
        if why:
            check.problems.append(
                f"{where}: quality.golden[{i}] ({g['image']}): this box scores {got.score:.4f} "
                f"({', '.join(got.reasons) or 'gradable'}), the build stored {g['score']:.4f} "
                f"({', '.join(stored) or 'gradable'}): {why}; the gate's limits or measures differ"
            )
    return check


SHRINK_RADIUS = 4 * WORK_RADIUS  # field radius a photo is shrunk to before it is degraded, measured or shipped


def shrink(rgb: np.ndarray, max_radius: int = SHRINK_RADIUS) -> np.ndarray:
    """The whole frame scaled so that its field radius is ``max_radius`` px (unchanged when it is at most 10% over
    that, or has no field). The degradations are defined in units of the field radius and the measures are taken at a
    radius of WORK_RADIUS px, so a copy drawn at this size keeps its label and measures what the full size would,
    up to the sensor noise the resize averages."""
    found = find_field(rgb)
    if found is None or found.radius <= 1.1 * max_radius:  # the slack: a shrunk photo is not shrunk again
        return rgb
    scale = max_radius / found.radius
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb[:, :, :3])).resize(size, Image.BILINEAR, reducing_gap=2.0)
    )
