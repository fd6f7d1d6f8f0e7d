"""Synthetic colour fundus photographs with diabetic-retinopathy grades 0-4.

No fundus data set can be downloaded at run time, so tlcompile ships this generator: the quickstart, the
tests and the transfer-learning study all train on it. It is numpy + Pillow only (it is imported by
torch-free installs) and vectorised: anatomy and lesions are rendered on coordinate grids, blobs as sums
of separable Gaussians (one matrix product per lesion type), vessels as Pillow polylines on a 2x canvas.

What an image contains
----------------------
* A circular field of view on black (sometimes clipped by the frame or, for some cameras, top and bottom;
  sometimes with the small rectangular notch many cameras leave on the field edge).
* Orange-red fundus with choroidal texture, vignetting and an illumination gradient.
* The optic disc (bright, with a paler cup) and a branching vessel tree leaving it: veins (darker, wider)
  and arteries running in pairs along the four arcades, the temporal arcades curving around the macula.
* A darker macula with the fovea about 2.5 disc diameters (DD) temporal to the disc.
* Lesions by grade, following the international clinical DR severity scale:

  ======  ===============  ===========================================================================
  grade   name             findings drawn
  ======  ===============  ===========================================================================
  0       no DR            none
  1       mild NPDR        microaneurysms only (a few tiny red dots in the posterior pole)
  2       moderate NPDR    more microaneurysms, dot/blot haemorrhages (fewer than severe, not in all
                           quadrants), hard exudates (yellow, clustered near the macula) often,
                           cotton-wool spots sometimes
  3       severe NPDR      many haemorrhages in all four quadrants, venous beading, cotton-wool spots,
                           exudates
  4       PDR              neovascular tufts at the disc (NVD) and/or along the arcades (NVE) plus
                           NPDR findings; sometimes a preretinal (boat-shaped) haemorrhage or
                           pan-retinal laser scars
  ======  ===============  ===========================================================================

* Nuisance: field position and size, rotation, left or right eye (disc on the left or right), colour
  cast, brightness, blur, sensor noise, illumination gradient, dust shadows.

``difficulty`` in [0, 1] scales lesion contrast and size down and nuisance (blur, noise, colour cast,
illumination gradient, rotation, dust) up. ``DEFAULT_DIFFICULTY`` is calibrated with
``benchmarks/tune_synthetic.py`` (its target, the runs and the AUCs they reached are listed there): a
MobileNetV3-small trained from scratch on 1500 images at 112 px for 10 epochs should find referable DR
(grade >= 2) clearly learnable but not saturated. What the quickstart build reaches today is in the
README. Most of the difficulty is the grade 1 / grade 2 border (a few microaneurysms against a few small
haemorrhages at 112 px) and nuisance; labels are never flipped.

Determinism: image ``i`` of ``generate(n, seed=s)`` is drawn from its own generator,
``np.random.default_rng(np.random.SeedSequence([s, i]))``, so it is the same whatever ``n`` is, and
``write_aptos`` writes the very same images as ``generate`` at the same size.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tlcompile.errors import DataError

GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")
#: APTOS-2019-like prevalence of grades 0-4; referable DR (grade >= 2) is about 0.41.
DEFAULT_GRADE_PROBS = (0.49, 0.10, 0.27, 0.05, 0.09)
#: Calibrated with benchmarks/tune_synthetic.py: learnable, not saturated (module docstring).
DEFAULT_DIFFICULTY = 0.25

_RGB = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class FundusStyle:
    """How one camera renders a fundus: colours are RGB in 0-255, geometry in fractions of the frame."""

    name: str
    description: str
    background_rgb: _RGB  # fundus colour at mid-periphery, before illumination
    vessel_rgb: _RGB  # colour a fully opaque vein tends to
    disc_rgb: _RGB  # neuro-retinal rim of the optic disc
    cup_rgb: _RGB  # the paler optic cup
    macula_gain: _RGB  # per-channel factor at the fovea (darker, less green/blue)
    haemorrhage_rgb: _RGB
    exudate_rgb: _RGB
    cotton_wool_rgb: _RGB
    field_radius: tuple[float, float]  # field radius / frame size, uniform range (> 0.5 clips at the frame)
    field_clip: float | None  # the circle is cut at +-field_clip * radius vertically (None: full circle)
    vignetting: float  # fraction of brightness lost at the field edge
    vignetting_power: float  # how late the fall-off starts (higher: flatter centre)
    notch_prob: float  # chance of the small rectangular notch on the field edge
    colour_jitter: float  # per-image log-std of the fundus colour (pigmentation differences)


FUNDUS_STYLES: dict[str, FundusStyle] = {
    "default": FundusStyle(
        name="default",
        description="orange-red fundus, full circular field, mild vignetting (APTOS-like)",
        background_rgb=(222.0, 92.0, 62.0),
        vessel_rgb=(140.0, 28.0, 26.0),
        disc_rgb=(255.0, 166.0, 112.0),
        cup_rgb=(255.0, 222.0, 165.0),
        macula_gain=(0.84, 0.55, 0.42),
        haemorrhage_rgb=(118.0, 14.0, 12.0),
        exudate_rgb=(252.0, 226.0, 110.0),
        cotton_wool_rgb=(245.0, 212.0, 180.0),
        field_radius=(0.44, 0.53),
        field_clip=None,
        vignetting=0.30,
        vignetting_power=2.5,
        notch_prob=0.3,
        colour_jitter=0.07,
    ),
    "camera_b": FundusStyle(
        name="camera_b",
        description="darker olive/yellow-green fundus, smaller field clipped top and bottom, strong vignetting",
        background_rgb=(168.0, 112.0, 48.0),
        vessel_rgb=(96.0, 46.0, 22.0),
        disc_rgb=(236.0, 214.0, 128.0),
        cup_rgb=(250.0, 244.0, 196.0),
        macula_gain=(0.78, 0.62, 0.50),
        haemorrhage_rgb=(82.0, 30.0, 12.0),
        exudate_rgb=(246.0, 236.0, 120.0),
        cotton_wool_rgb=(228.0, 222.0, 172.0),
        field_radius=(0.40, 0.45),
        field_clip=0.86,
        vignetting=0.55,
        vignetting_power=1.8,
        notch_prob=0.0,
        colour_jitter=0.09,
    ),
}

# Anatomy in canonical field units (field radius = 1): disc diameter and disc-fovea distance in DD.
_DISC_DIAMETER = (0.25, 0.31)
_DISC_FOVEA_DD = (2.3, 2.7)
_SUPERSAMPLE = 2  # vessels are drawn on a canvas this many times larger, then box-filtered down


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise DataError(f"size must be an integer >= 32 (pixels per side), got {size!r}")
    return int(size)


def _check_difficulty(difficulty: float) -> float:
    try:
        value = float(difficulty)
    except (TypeError, ValueError) as err:
        raise DataError(f"difficulty must be a number in [0, 1], got {difficulty!r}") from err
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise DataError(f"difficulty must be in [0, 1], got {difficulty!r}")
    return value


def _check_style(style: str) -> FundusStyle:
    if not isinstance(style, str) or style not in FUNDUS_STYLES:
        raise DataError(f"style must be one of {sorted(FUNDUS_STYLES)}, got {style!r}")
    return FUNDUS_STYLES[style]


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n must be an integer >= 1 (number of images), got {n!r}")
    return int(n)


def _check_grade(grade: int) -> int:
    if isinstance(grade, bool) or not isinstance(grade, (int, np.integer)) or not 0 <= grade <= 4:
        raise DataError(f"grade must be an integer 0-4 ({', '.join(GRADE_NAMES)}), got {grade!r}")
    return int(grade)


def _check_grade_probs(grade_probs: Sequence[float]) -> np.ndarray:
    try:
        probs = np.asarray(grade_probs, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"grade_probs must be 5 probabilities for grades 0-4, got {grade_probs!r}") from err
    if probs.shape != (5,):
        raise DataError(f"grade_probs must have 5 entries (grades 0-4), got {len(probs.ravel())}: {grade_probs!r}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or abs(probs.sum() - 1.0) > 1e-6:
        raise DataError(f"grade_probs must be non-negative and sum to 1, got {grade_probs!r} (sum {probs.sum():.6g})")
    return probs / probs.sum()


# --------------------------------------------------------------------------------------------------
# geometry


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Maps canonical field coordinates (radius 1, disc towards +u, superior -v) to pixels."""

    size: int
    cx: float
    cy: float
    radius: float  # field radius in pixels
    cos: float
    sin: float
    flip: float  # +1: disc on the right of the image, -1: on the left

    def to_pixels(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) canonical points -> pixel x, y (pixel centres at integers)."""
        u = pts[..., 0] * self.flip
        v = pts[..., 1]
        x = self.cx + self.radius * (self.cos * u - self.sin * v)
        y = self.cy + self.radius * (self.sin * u + self.cos * v)
        return x, y

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Canonical u, v of every pixel (H, W) and the radial distance from the field centre."""
        coords = np.arange(self.size, dtype=np.float32)
        dx = (coords[None, :] - self.cx) / self.radius
        dy = (coords[:, None] - self.cy) / self.radius
        u = (self.cos * dx + self.sin * dy) * self.flip
        v = -self.sin * dx + self.cos * dy
        return u, v, np.sqrt(dx * dx + dy * dy)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _blend(img: np.ndarray, alpha: np.ndarray, rgb: _RGB | np.ndarray) -> None:
    """In place: img <- img * (1 - alpha) + rgb * alpha, alpha (H, W) in [0, 1], rgb in 0-1."""
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(rgb, dtype=np.float32)


def _record(lesions: list[np.ndarray] | None, alpha: np.ndarray) -> None:
    """Keep a copy of one lesion layer's opacity for :func:`render_fundus`'s ``return_lesions``."""
    if lesions is not None:
        lesions.append(np.array(alpha, dtype=np.float32))


def _blobs(size: int, x: np.ndarray, y: np.ndarray, sigma: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussians (pixel units) as one (H, W) matrix product of separable profiles.

    The pixel's own extent (variance 1/12) is added and the amplitude scaled so the blob keeps its
    integral: a sub-pixel microaneurysm becomes a faint dot, as it would on a real sensor.
    """
    if len(x) == 0:
        return np.zeros((size, size), np.float32)
    f32 = np.float32
    sigma = np.asarray(sigma, f32)
    s2 = sigma**2 + f32(1.0 / 12.0)
    amp = np.asarray(amp, f32) * (sigma**2 / s2)  # ~1 for large blobs, < 1 for sub-pixel ones
    coords = np.arange(size, dtype=f32)
    inv = (-0.5 / s2)[:, None]
    gx = np.exp((coords[None, :] - np.asarray(x, f32)[:, None]) ** 2 * inv)
    gy = np.exp((coords[None, :] - np.asarray(y, f32)[:, None]) ** 2 * inv) * amp[:, None]
    return np.ascontiguousarray(gy.T) @ gx


def _sample_points(
    rng: np.random.Generator,
    n: int,
    centre: np.ndarray,
    r_min: float,
    r_max: float,
    avoid: np.ndarray,
    avoid_radius: float,
    *,
    quadrants: bool = False,
    field_limit: float = 0.93,
) -> np.ndarray:
    """n canonical points, area-uniform in an annulus around ``centre``, inside the field, off the disc.

    With ``quadrants`` the points are dealt evenly to the four quadrants around ``centre``.
    """
    out = np.zeros((0, 2))
    for _ in range(100):  # rejection sampling; every region used here accepts a good share of candidates
        if len(out) >= n:
            break
        m = 3 * n + 8
        r = np.sqrt(rng.uniform(r_min**2, r_max**2, m))
        if quadrants:
            k = np.arange(m) % 4
            theta = (k + rng.uniform(0.05, 0.95, m)) * (np.pi / 2)
        else:
            theta = rng.uniform(0.0, 2 * np.pi, m)
        pts = centre + np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
        ok = (np.hypot(pts[:, 0], pts[:, 1]) < field_limit) & (np.hypot(*(pts - avoid).T) > avoid_radius)
        out = np.concatenate([out, pts[ok]])
    if len(out) < n:
        raise AssertionError(f"no room for {n} points around {centre} in [{r_min}, {r_max}]")  # a bug, not user input
    if quadrants and len(out) > n:  # a random subset keeps the four quadrants about evenly filled
        return out[rng.permutation(len(out))[:n]]
    return out[:n]


# --------------------------------------------------------------------------------------------------
# vessels


def _grow_vessels(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: np.ndarray,
    length: np.ndarray,
    turn: np.ndarray,
    tau: np.ndarray,
    wobble: float,
    step: float,
    fovea: np.ndarray,
    faz: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """K smooth random vessel centre-lines at once, one per row; heading relaxes by ``turn`` over arc
    length ``tau``, plus a random walk of ``wobble`` radians per step.

    Returns x, y, heading (K, n) and the number of valid points per vessel: a vessel ends at its
    ``length``, at the field edge and at the foveal avascular zone.
    """
    k = len(heading)
    n = max(2, int(length.max() / step))
    t = np.arange(n) * step
    h = heading[:, None] + turn[:, None] * (1.0 - np.exp(-t / tau[:, None]))
    h += rng.normal(0.0, wobble, (k, n)).cumsum(axis=1)
    h[:, 0] = heading
    dx, dy = np.cos(h), np.sin(h)
    dx[:, 0] = 0.0
    dy[:, 0] = 0.0
    x = dx.cumsum(axis=1) * step + start[:, 0:1]
    y = dy.cumsum(axis=1) * step + start[:, 1:2]
    bad = (x * x + y * y > 1.02**2) | ((x - fovea[0]) ** 2 + (y - fovea[1]) ** 2 < faz * faz)
    bad |= t[None, :] > length[:, None]
    stop = np.where(bad.any(axis=1), bad.argmax(axis=1), n)
    return x, y, h, stop


def _vessel_tree(
    rng: np.random.Generator, disc: np.ndarray, fovea: np.ndarray, dd: float
) -> list[tuple[np.ndarray, float, float, bool]]:
    """Centre-lines of the retinal vessels: (points (N, 2), width at start, width at end, is_vein).

    Widths are in canonical units (field radius 1). Generated one generation at a time (trunks, branches,
    twigs), each generation as one vectorised batch.
    """
    deg = np.pi / 180.0
    faz = 0.35 * dd
    step = 0.02
    # Trunks leaving the disc: (is_vein, heading, length, turn, tau, width) for each side
    rows = []
    for side in (-1.0, 1.0):  # -1 superior, +1 inferior
        # temporal arcades: leave the disc vertically, curve around the macula towards the temporal side
        h0 = side * rng.uniform(78, 96) * deg
        rows.append((1, h0, 2.4, side * rng.uniform(72, 100) * deg, rng.uniform(0.22, 0.36), 0.10 * dd))
        rows.append(
            (
                0,
                h0 + rng.uniform(-14, 14) * deg,
                2.4,
                side * rng.uniform(72, 100) * deg,
                rng.uniform(0.15, 0.24),
                0.075 * dd,
            )
        )
        # nasal vessels: shorter, straighter, towards the nasal edge
        h1 = side * rng.uniform(25, 60) * deg
        rows.append((1, h1, 1.2, rng.normal(0, 15) * deg, 0.4, 0.075 * dd))
        rows.append((0, h1 + rng.uniform(-20, 20) * deg, 1.2, rng.normal(0, 15) * deg, 0.4, 0.06 * dd))
        # a small papillo-macular vessel towards the fovea
        rows.append((0, np.pi + side * rng.uniform(5, 25) * deg, 0.5, side * 0.3, 0.3, 0.035 * dd))
    gen = np.array(rows, dtype=np.float64)
    is_vein, heading, length, turn, tau, width = gen.T
    start = disc + rng.normal(0, 0.08 * dd, (len(gen), 2))

    vessels: list[tuple[np.ndarray, float, float, bool]] = []
    for depth in range(3):
        x, y, h, stop = _grow_vessels(rng, start, heading, length, turn, tau, 0.012 + 0.008 * depth, step, fovea, faz)
        xy = np.stack([x, y], axis=2)
        w_end = width * (0.55 if depth == 0 else 0.7)
        # branch points at roughly regular intervals along each vessel wide enough to branch
        spacing = int((0.3 if depth == 0 else 0.35) / step)
        parent, at = [], []
        for j in range(len(heading)):
            if stop[j] < 2:
                continue
            vessels.append((xy[j, : stop[j]], float(width[j]), float(w_end[j]), bool(is_vein[j])))
            if depth < 2 and width[j] >= 0.045 * dd and stop[j] > 5:
                idx = np.arange(int(spacing * rng.uniform(0.3, 1.0)), stop[j] - 3, spacing)
                parent.extend([j] * len(idx))
                at.extend(idx.tolist())
        if not parent:
            break
        parent_a, at_a = np.array(parent), np.array(at)
        m = len(parent_a)
        at_a = np.clip(at_a + rng.integers(-3, 4, m), 1, stop[parent_a] - 2)
        sign = np.where(rng.random(m) < 0.5, -1.0, 1.0)
        frac = at_a / stop[parent_a]
        w_here = width[parent_a] + (w_end[parent_a] - width[parent_a]) * frac
        start = np.stack([x[parent_a, at_a], y[parent_a, at_a]], axis=1)
        heading = h[parent_a, at_a] + sign * rng.uniform(25, 50, m) * deg  # acute Y-shaped bifurcation
        length = rng.uniform(0.3, 0.9, m) * (0.6 if depth else 1.0)
        turn = -sign * rng.uniform(5, 30, m) * deg  # curving back to run along the parent
        tau = np.full(m, 0.3)
        width = w_here * rng.uniform(0.6, 0.8, m)
        is_vein = is_vein[parent_a]
    return vessels


def _to_canvas(frame: _Frame, pts: np.ndarray) -> np.ndarray:
    """Canonical points (N, 2) -> coordinates (N, 2) on the supersampled drawing canvas."""
    x, y = frame.to_pixels(pts)
    xy = np.empty((len(x), 2))
    xy[:, 0] = x
    xy[:, 1] = y
    return (xy + 0.5) * _SUPERSAMPLE - 0.5


def _draw_polyline(draw: ImageDraw.ImageDraw, xy: np.ndarray, w0: float, w1: float, opacity: float) -> None:
    """Draw a tapering vessel through canvas points ``xy`` (N, 2), widths in canvas pixels; sub-pixel
    widths become fainter 1-px lines."""
    n = len(xy)
    # one width step per ~0.7 canvas pixels of taper, at most 3 (each step is one Pillow call)
    steps = min(3, 1 + int(abs(w1 - w0) / 0.7))
    chunk = max(6, -(-(n - 1) // steps))
    for a in range(0, n - 1, chunk):
        b = min(n, a + chunk + 1)
        w = w0 + (w1 - w0) * (a + b) / (2.0 * n)
        op = opacity * min(1.0, w)
        draw.line(xy[a:b].ravel().tolist(), fill=int(255 * op), width=max(1, int(w + 0.5)), joint="curve")


def _draw_tuft(
    draw: ImageDraw.ImageDraw,
    frame: _Frame,
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: float,
    opacity: float,
) -> None:
    """Neovascular tuft ("sea fan"): fine, irregular, overlapping vessel loops around ``centre``; thinner
    than any retinal vessel, so mostly sub-pixel (faint) lines at screening resolutions."""
    t = np.linspace(0.0, 2 * np.pi, 25)
    width = 0.006
    for _ in range(int(rng.integers(5, 10))):
        c = centre + rng.normal(0.0, 0.4 * radius, 2)
        rho = rng.uniform(0.2, 0.5) * radius
        r = rho * (1.0 + 0.35 * np.sin(2 * t + rng.uniform(0, 6.3)) + 0.25 * np.sin(3 * t + rng.uniform(0, 6.3)))
        r *= np.exp(rng.normal(0.0, 0.12, len(t)))  # kinks: no two loops alike, none a clean ellipse
        a = t + rng.uniform(0, 6.3)
        pts = c + np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
        w = width * frame.radius * _SUPERSAMPLE
        _draw_polyline(draw, _to_canvas(frame, pts), w, w, opacity)


# --------------------------------------------------------------------------------------------------
# rendering


@dataclasses.dataclass(frozen=True)
class _Scene:
    """One image's layout: the camera frame, the anatomy (canonical units) and per-pixel coordinates."""

    frame: _Frame
    dd: float  # disc diameter
    fovea: np.ndarray  # (2,)
    disc: np.ndarray  # (2,) disc centre
    u: np.ndarray  # (H, W) canonical coordinates of each pixel
    v: np.ndarray
    rho: np.ndarray  # (H, W) distance from the field centre, in field radii
    contrast: float  # lesion opacity factor from the difficulty
    scale: float  # lesion size factor from the difficulty

    def to_pixels(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.frame.to_pixels(pts)


def _place_scene(rng: np.random.Generator, st: FundusStyle, size: int, d: float) -> _Scene:
    """Field position and size, eye (disc left or right), rotation, disc and fovea."""
    deg = np.pi / 180.0
    radius = rng.uniform(*st.field_radius) * size
    cx = size / 2 - 0.5 + rng.normal(0, 0.025) * size
    cy = size / 2 - 0.5 + rng.normal(0, 0.02) * size
    angle = float(np.clip(rng.normal(0, 7 + 6 * d), -25, 25)) * deg
    flip = 1.0 if rng.random() < 0.5 else -1.0
    frame = _Frame(size, cx, cy, radius, math.cos(angle), math.sin(angle), flip)
    dd = rng.uniform(*_DISC_DIAMETER)
    fovea = np.array([rng.normal(-0.08, 0.07), rng.normal(0.03, 0.05)])
    disc = fovea + np.array([rng.uniform(*_DISC_FOVEA_DD) * dd, -rng.uniform(0.1, 0.45) * dd])
    u, v, rho = frame.grid()
    # lesion contrast and size fall with the difficulty (nuisance rises with it in _apply_camera)
    return _Scene(frame, dd, fovea, disc, u, v, rho, contrast=1.1 - 0.75 * d, scale=1.15 - 0.45 * d)


def _paint_fundus(rng: np.random.Generator, st: FundusStyle, sc: _Scene) -> np.ndarray:
    """Fundus colour with choroidal texture, the macula and the optic disc: (H, W, 3) float32 in 0-1."""
    f32 = np.float32
    size, dd = sc.frame.size, sc.dd
    colour = np.asarray(st.background_rgb) / 255.0 * np.exp(rng.normal(0, st.colour_jitter, 3))
    colour *= np.exp(rng.normal(0, st.colour_jitter * 0.7))  # overall pigmentation
    coarse = rng.normal(0, 1, (6, 6)).astype(f32)
    fine = rng.normal(0, 1, (max(8, size // 6),) * 2).astype(f32)
    tex = 0.045 * np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.BICUBIC))
    tex += 0.015 * np.asarray(Image.fromarray(fine, "F").resize((size, size), Image.BICUBIC))
    img = (1.0 + tex)[..., None] * colour.astype(f32)

    # macula: broad darkening, deeper and less green/blue at the fovea, a small darker foveola
    fu, fv, du0, dv0 = (float(c) for c in (*sc.fovea, *sc.disc))  # python floats keep the grids float32
    u, v = sc.u, sc.v
    r_fov2 = ((u - fu) ** 2 + (v - fv) ** 2) / dd**2
    mac = np.exp(-r_fov2 / (2 * 0.55**2))[..., None]
    gain = np.asarray(st.macula_gain, f32) ** rng.uniform(0.7, 1.1)
    img *= 1.0 - mac * (1.0 - gain)
    img *= (1.0 - 0.12 * np.exp(-r_fov2 / (2 * 1.3**2)))[..., None]
    img *= (1.0 - 0.12 * np.exp(-r_fov2 / (2 * 0.16**2)))[..., None]

    # optic disc: soft, slightly tall ellipse with a peripapillary glow and a paler cup
    du, dv = (u - du0) / (0.5 * dd * 0.93), (v - dv0) / (0.5 * dd * 1.07)
    r_disc = np.sqrt(du * du + dv * dv)
    img *= (1.0 + 0.22 * np.exp(-(r_disc**2) / (2 * 1.5**2)))[..., None]
    disc_px = 0.5 * dd * sc.frame.radius  # disc radius in pixels; the rim fades over ~20% of it (>= 1 px)
    rim = _smoothstep((1.0 - r_disc) * disc_px / max(1.0, 0.2 * disc_px) + 0.5) * 0.95
    _blend(img, rim, np.asarray(st.disc_rgb) / 255)
    cup_r = rng.uniform(0.3, 0.55)
    r_cup = np.hypot(du + 0.25 * cup_r, dv) / cup_r  # the cup sits temporal in the disc
    _blend(img, _smoothstep(1.0 - r_cup + 0.4) * 0.85, np.asarray(st.cup_rgb) / 255)
    return img


def _paint_vessels(
    rng: np.random.Generator,
    st: FundusStyle,
    sc: _Scene,
    img: np.ndarray,
    grade: int,
    lesions: list[np.ndarray] | None = None,
) -> None:
    """In place: the vessel tree (venous beading from grade 3) and, for grade 4, neovascular tufts (their opacity is
    appended to ``lesions`` when given)."""
    f32 = np.float32
    frame, dd, ss = sc.frame, sc.dd, _SUPERSAMPLE
    canvas = Image.new("L", (frame.size * ss, frame.size * ss), 0)  # vessel opacity, supersampled
    draw = ImageDraw.Draw(canvas)
    tree = _vessel_tree(rng, sc.disc, sc.fovea, dd)
    beading = grade >= 3 and rng.random() < 0.7
    # all centre-lines to canvas coordinates in one go, then one slice per vessel
    bounds = np.cumsum([0] + [len(pts) for pts, *_ in tree])
    canvas_xy = _to_canvas(frame, np.concatenate([pts for pts, *_ in tree]))
    to_canvas_px = frame.radius * ss
    for vein in (False, True):  # veins drawn last so they stay dark where they cross arteries
        opacity = 0.78 if vein else 0.52
        for j, (pts, w0, w1, is_vein) in enumerate(tree):
            if is_vein != vein:
                continue
            xy = canvas_xy[bounds[j] : bounds[j + 1]]
            _draw_polyline(draw, xy, w0 * to_canvas_px, w1 * to_canvas_px, opacity)
            if beading and vein and w0 > 0.06 * dd:
                # venous beading: sausage-like dilations along a stretch of the larger veins
                a = int(rng.integers(2, max(3, len(pts) // 2)))
                for i in range(a, min(len(pts), a + len(pts) // 3), int(rng.integers(4, 7))):
                    xc, yc = xy[i]
                    r_b = (w0 * 0.7 * rng.uniform(0.9, 1.25)) * to_canvas_px
                    draw.ellipse([xc - r_b, yc - r_b, xc + r_b, yc + r_b], fill=int(255 * opacity))
    _blend(img, np.asarray(canvas.reduce(ss), f32) / 255.0, np.asarray(st.vessel_rgb) / 255.0)
    if grade != 4:
        return
    nv = Image.new("L", canvas.size, 0)
    nv_draw = ImageDraw.Draw(nv)
    sites = []
    if rng.random() < 0.55:  # NVD: on or next to the disc
        sites.append(sc.disc + rng.normal(0, 0.25 * dd, 2))
    n_nve = int(rng.integers(1, 4)) if not sites or rng.random() < 0.5 else 0
    arcades = [p for p, w0, _, vein in tree if vein and w0 > 0.07 * dd and len(p) > 10]
    for _ in range(n_nve):  # NVE: along the arcades
        pts = arcades[int(rng.integers(len(arcades)))] if arcades else np.array([sc.fovea])
        sites.append(pts[int(rng.integers(len(pts) // 4, len(pts)))] + rng.normal(0, 0.02, 2))
    for site in sites:
        _draw_tuft(nv_draw, frame, rng, site, rng.uniform(0.35, 0.6) * dd * sc.scale, 0.8 * sc.contrast + 0.1)
    alpha = np.asarray(nv.reduce(ss), f32) / 255.0
    _blend(img, alpha, np.asarray(st.vessel_rgb) / 255.0 * (1.15, 0.9, 0.9))
    _record(lesions, alpha)


def _paint_lesions(
    rng: np.random.Generator,
    st: FundusStyle,
    sc: _Scene,
    img: np.ndarray,
    grade: int,
    lesions: list[np.ndarray] | None = None,
) -> None:
    """In place: the DR lesions of ``grade``, counts and spread after the international severity scale. Each
    lesion layer's opacity (H, W) is appended to ``lesions`` when given; recording draws nothing from ``rng``."""
    size, px, dd = sc.frame.size, sc.frame.radius, sc.dd  # px: canonical unit -> pixels
    fovea, disc, contrast, scale = sc.fovea, sc.disc, sc.contrast, sc.scale
    pois = rng.poisson
    n_ma = n_haem = n_cws = 0
    exudate_clusters = 0
    haem_in_quadrants = False
    haem_size = 1.0
    if grade == 1:
        n_ma = 1 + pois(2.5)
    elif grade == 2:
        # Moderate NPDR spans "just past mild" to "just short of severe": the lesion load varies per eye,
        # and the light end (one or two small haemorrhages, no exudates) is what makes grade 1 vs 2 hard.
        load = rng.random()
        n_ma = 3 + pois(3 + 6 * load)
        n_haem = 1 + pois(0.5 + 7 * load)
        haem_size = 0.75 + 0.4 * load
        exudate_clusters = (1 + pois(0.8)) if rng.random() < 0.2 + 0.6 * load else 0
        n_cws = (1 + pois(0.8)) if rng.random() < 0.1 + 0.3 * load else 0
    elif grade == 3:
        n_ma = 8 + pois(10)
        n_haem = 16 + pois(14)
        haem_in_quadrants = True
        exudate_clusters = (1 + pois(1.0)) if rng.random() < 0.6 else 0
        n_cws = (2 + pois(2)) if rng.random() < 0.75 else 0
    elif grade == 4:
        n_ma = 5 + pois(8)
        n_haem = 6 + pois(14)
        haem_in_quadrants = rng.random() < 0.5
        exudate_clusters = (1 + pois(0.8)) if rng.random() < 0.5 else 0
        n_cws = (1 + pois(1.5)) if rng.random() < 0.5 else 0

    red_xy, red_sig, red_amp = [], [], []
    if n_ma:  # microaneurysms: tiny dots, mostly in the posterior pole around the macula
        pts = _sample_points(rng, n_ma, fovea, 0.4 * dd, 1.0, disc, 0.8 * dd)
        red_xy.append(pts)
        red_sig.append(rng.uniform(0.008, 0.014, n_ma) * scale)
        red_amp.append(rng.uniform(1.0, 1.6, n_ma))
    if n_haem:  # dot and blot haemorrhages; blots are made of a few overlapping lumps
        if haem_in_quadrants:
            pts = _sample_points(rng, n_haem, fovea, 0.3 * dd, 1.1, disc, 0.8 * dd, quadrants=True)
        else:
            pts = _sample_points(rng, n_haem, fovea, 0.4 * dd, 0.75, disc, 0.8 * dd)
        sig = (0.015 + 0.028 * rng.random(n_haem) ** 2) * scale * haem_size
        red_xy.append(pts)
        red_sig.append(sig)
        red_amp.append(rng.uniform(1.5, 3.0, n_haem))
        blot = rng.random(n_haem) < (0.4 if grade == 2 else 0.6)
        if blot.any():
            k, m = int(blot.sum()), 2 if grade == 2 else 3  # lumps per blot: irregular, not round
            lumps = np.repeat(pts[blot], m, axis=0) + rng.normal(0, 1.0, (m * k, 2)) * np.repeat(sig[blot], m)[:, None]
            red_xy.append(lumps)
            red_sig.append(np.repeat(sig[blot], m) * rng.uniform(0.6, 1.0, m * k))
            red_amp.append(rng.uniform(1.5 if grade == 2 else 0.6, 2.5, m * k))
    if red_xy:
        x, y = sc.to_pixels(np.concatenate(red_xy))
        red = _blobs(size, x, y, np.concatenate(red_sig) * px, np.concatenate(red_amp))
        alpha = np.clip(1.3 * (1.0 - np.exp(-red)), 0.0, 1.0) * contrast
        _blend(img, alpha, np.asarray(st.haemorrhage_rgb) / 255.0)
        _record(lesions, alpha)

    if exudate_clusters:  # hard exudates: sharp-edged yellow flecks, clustered, often circinate near the macula
        xy, sigs = [], []
        for _ in range(exudate_clusters):
            centre = _sample_points(rng, 1, fovea, 0.5 * dd, 2.2 * dd, disc, 1.0 * dd)[0]
            k = 3 + pois(7)
            if rng.random() < 0.4:  # circinate ring around a leaking point
                a = rng.uniform(0, 2 * np.pi, k)
                rr = rng.uniform(0.25, 0.45) * dd * (1 + 0.15 * rng.normal(size=k))
                xy.append(centre + np.stack([rr * np.cos(a), rr * np.sin(a)], 1))
            else:
                xy.append(centre + rng.normal(0, 0.25 * dd, (k, 2)))
            sigs.append(rng.uniform(0.006, 0.016, k) * scale)
        x, y = sc.to_pixels(np.concatenate(xy))
        m = _blobs(size, x, y, np.concatenate(sigs) * px, np.full(len(x), 1.0))
        alpha = np.clip(2.2 * m - 0.25, 0.0, 1.0) * contrast
        _blend(img, alpha, np.asarray(st.exudate_rgb) / 255.0)
        _record(lesions, alpha)

    if n_cws:  # cotton-wool spots: soft, pale, fluffy, near the arcades
        pts = _sample_points(rng, n_cws, disc, 1.0 * dd, 3.5 * dd, disc, 0.9 * dd)
        x, y = sc.to_pixels(pts)
        m = _blobs(size, x, y, rng.uniform(0.025, 0.045, n_cws) * scale * px, np.full(n_cws, 1.0))
        alpha = 0.8 * (1.0 - np.exp(-1.8 * m)) * contrast
        _blend(img, alpha, np.asarray(st.cotton_wool_rgb) / 255.0)
        _record(lesions, alpha)

    if grade == 4 and rng.random() < 0.3:  # pan-retinal laser scars: pale rings with a pigmented centre
        k = int(rng.integers(15, 45))
        pts = _sample_points(rng, k, fovea, 3.0 * dd, 1.2, disc, 1.0 * dd)
        x, y = sc.to_pixels(pts)
        sig = np.full(k, rng.uniform(0.018, 0.028)) * px
        alpha = 0.55 * np.clip(_blobs(size, x, y, sig, np.ones(k)), 0, 1)
        _blend(img, alpha, (0.92, 0.85, 0.62))
        _record(lesions, alpha)
        _blend(img, 0.6 * np.clip(_blobs(size, x, y, sig * 0.5, np.ones(k)), 0, 1), (0.25, 0.12, 0.06))

    if grade == 4 and rng.random() < 0.25:  # preretinal haemorrhage: boat shaped, flat upper level
        c = _sample_points(rng, 1, fovea, 0.5 * dd, 2.5 * dd, disc, 1.0 * dd)[0]
        rb = rng.uniform(0.5, 1.0) * dd * scale
        cu, cv = float(c[0]), float(c[1])
        r_c = np.hypot(sc.u - cu, sc.v - cv) / rb
        level = (sc.v - (cv - rng.uniform(0.0, 0.4) * rb)) * px
        alpha = _smoothstep((1.0 - r_c) * rb * px + 0.5) * _smoothstep(level + 0.5)
        alpha = 0.9 * alpha * contrast
        _blend(img, alpha, np.asarray(st.haemorrhage_rgb) / 255.0 * (1.15, 1.0, 1.0))
        _record(lesions, alpha)


def _apply_camera(rng: np.random.Generator, st: FundusStyle, sc: _Scene, img: np.ndarray, d: float) -> np.ndarray:
    """Dust, vignetting, illumination gradient, colour cast, the field mask, blur and noise -> uint8."""
    f32 = np.float32
    frame = sc.frame
    size, cx, cy, radius = frame.size, frame.cx, frame.cy, frame.radius
    if rng.random() < 0.15 + 0.3 * d:  # dust on the optics: soft grey shadows, any grade
        k = int(rng.integers(1, 4))
        x, y = sc.to_pixels(rng.uniform(-0.7, 0.7, (k, 2)))
        m = _blobs(size, x, y, rng.uniform(0.02, 0.05, k) * radius, rng.uniform(0.1, 0.3, k))
        img *= (1.0 - np.clip(m, 0, 0.6))[..., None]
    vig = 1.0 - st.vignetting * rng.uniform(0.7, 1.3) * np.clip(sc.rho, 0, 1.2) ** st.vignetting_power
    phi = rng.uniform(0, 2 * np.pi)
    grad_strength = rng.uniform(0.0, 0.12 + 0.35 * d)
    coords = np.arange(size, dtype=f32)
    dx, dy = (coords[None, :] - cx) / radius, (coords[:, None] - cy) / radius
    illum = vig * (1.0 + grad_strength * (math.cos(phi) * dx + math.sin(phi) * dy))
    cast = np.exp(rng.normal(0, 0.03 + 0.08 * d, 3) + rng.normal(0.0, 0.08 + 0.1 * d))
    img *= illum[..., None]
    img *= cast.astype(f32)

    # field of view: soft-edged circle, optionally clipped top and bottom, sometimes notched
    edge_px = max(0.7, size / 256.0)
    mask = _smoothstep((1.0 - sc.rho) * radius / edge_px + 0.5)
    if st.field_clip is not None:
        mask = mask * _smoothstep((st.field_clip * radius - np.abs(coords - cy)[:, None]) / edge_px + 0.5)
    if rng.random() < st.notch_prob:
        a = rng.uniform(0, 2 * np.pi)
        nx, ny = cx + radius * math.cos(a), cy + radius * math.sin(a)
        half = 0.05 * radius
        notch = (np.abs(coords[None, :] - nx) < half) & (np.abs(coords[:, None] - ny) < half)
        mask = mask * ~notch
    img *= mask[..., None]

    out = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, 0.25 + 1.0 * d) * size / 128.0
    if blur > 0.15:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(out, dtype=f32)
    noise_sd = rng.uniform(0.5, 2.0 + 6.0 * d)
    arr += rng.normal(0.0, noise_sd, arr.shape).astype(f32)
    arr *= (mask > 0.01)[..., None]  # keep outside the field black despite blur and noise
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def render_fundus(
    grade: int,
    rng: np.random.Generator,
    *,
    size: int = 128,
    difficulty: float = DEFAULT_DIFFICULTY,
    style: str = "default",
    return_lesions: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render one fundus photograph of DR ``grade`` (0-4); (size, size, 3) uint8, black outside the field.

    Everything random is drawn from ``rng``, so the same generator state gives the same bytes. With
    ``return_lesions`` it returns (image, lesions): ``lesions`` (size, size) float32 in [0, 1] is the opacity every
    painted lesion (microaneurysms, haemorrhages, exudates, cotton-wool spots, laser scars, preretinal haemorrhage,
    neovascular tufts) was blended with, before the camera's blur, noise and field mask; all zero for grade 0. The
    image is the very same either way: recording draws nothing from ``rng`` and changes no pixel arithmetic. What
    only the generator knows, so an explanation's faithfulness can be tested against it (the pointing game).
    """
    grade = _check_grade(grade)
    size = _check_size(size)
    d = _check_difficulty(difficulty)
    st = _check_style(style)
    if not isinstance(rng, np.random.Generator):
        raise DataError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    scene = _place_scene(rng, st, size, d)
    img = _paint_fundus(rng, st, scene)
    lesions: list[np.ndarray] | None = [] if return_lesions else None
    _paint_vessels(rng, st, scene, img, grade, lesions)
    _paint_lesions(rng, st, scene, img, grade, lesions)
    out = _apply_camera(rng, st, scene, img, d)
    if lesions is None:
        return out
    opacity = np.zeros((size, size), np.float32)
    for alpha in lesions:
        np.maximum(opacity, np.clip(alpha, 0.0, 1.0), out=opacity)
    return out, opacity


# --------------------------------------------------------------------------------------------------
# data sets


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of how many images are drawn."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _draw_one(
    seed: int, index: int, probs: np.ndarray, size: int, difficulty: float, style: str, *, lesions: bool = False
) -> tuple[np.ndarray, int] | tuple[np.ndarray, int, np.ndarray]:
    """(image, grade), or (image, grade, lesion opacity) with ``lesions``: the same draws either way."""
    rng = _image_rng(seed, index)
    grade = int(rng.choice(5, p=probs))  # the first draw of the image's generator: see sample_grades
    if lesions:
        image, opacity = render_fundus(grade, rng, size=size, difficulty=difficulty, style=style, return_lesions=True)
        return image, grade, opacity
    return render_fundus(grade, rng, size=size, difficulty=difficulty, style=style), grade


def _checked(
    seed: int, size: int, difficulty: float, style: str, grade_probs: Sequence[float]
) -> tuple[int, int, float, np.ndarray]:
    """The generator's arguments checked (one-line DataErrors): (seed, size, difficulty, grade probabilities)."""
    _check_style(style)
    return _check_seed(seed), _check_size(size), _check_difficulty(difficulty), _check_grade_probs(grade_probs)


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise DataError(f"index must be a non-negative integer, got {index!r}")
    return int(index)


def draw_with_lesions(
    index: int,
    *,
    seed: int,
    size: int = 128,
    difficulty: float = DEFAULT_DIFFICULTY,
    style: str = "default",
    grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Image ``index`` of ``generate(n, seed=seed, ...)`` (any n > index) with its grade and its lesion opacity
    (see :func:`render_fundus`'s ``return_lesions``): (image, grade, lesions)."""
    seed, size, difficulty, probs = _checked(seed, size, difficulty, style, grade_probs)
    return _draw_one(seed, _check_index(index), probs, size, difficulty, style, lesions=True)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def sample_grades(n: int, *, seed: int, grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS) -> np.ndarray:
    """The grades (n,) int64 that ``generate(n, seed=seed, grade_probs=grade_probs)`` returns, without
    rendering any image (each image's grade is the first draw of its own generator)."""
    n = _check_n(n)
    seed = _check_seed(seed)
    probs = _check_grade_probs(grade_probs)
    return np.array([_image_rng(seed, i).choice(5, p=probs) for i in range(n)], dtype=np.int64)


def generate(
    n: int,
    *,
    seed: int,
    size: int = 128,
    difficulty: float = DEFAULT_DIFFICULTY,
    style: str = "default",
    grade_probs: Sequence[float] = DEFAULT_GRADE_PROBS,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic fundus images and their DR grades: images (n, size, size, 3) uint8, grades (n,) int64.

    Each image's grade is drawn from ``grade_probs`` with the image's own generator, so image ``i`` and its
    grade do not depend on ``n``.
    """
    n = _check_n(n)
    seed, size, difficulty, probs = _checked(seed, size, difficulty, style, grade_probs)
    images = np.empty((n, size, size, 3), np.uint8)
    grades = np.empty(n, np.int64)
    for i in range(n):
        images[i], grades[i] = _draw_one(seed, i, probs, size, difficulty, style)
    return images, grades


def generate_one(
    seed: int, index: int, *, size: int = 128, difficulty: float = DEFAULT_DIFFICULTY, style: str = "default"
) -> tuple[np.ndarray, int]:
    """Image ``index`` of :func:`generate` (any ``n`` above ``index``, the same other arguments) and its grade: lets a
    caller draw the images in any order, or across processes, with the same result."""
    seed, size, difficulty, probs = _checked(seed, size, difficulty, style, DEFAULT_GRADE_PROBS)
    return _draw_one(seed, _check_index(index), probs, size, difficulty, style)


def write_aptos(
    out_dir: str | pathlib.Path,
    n: int,
    *,
    seed: int,
    size: int = 256,
    difficulty: float = DEFAULT_DIFFICULTY,
    style: str = "default",
    overwrite: bool = False,
) -> pathlib.Path:
    """Write an APTOS-2019-shaped data set: ``train.csv`` (id_code,diagnosis) and ``train_images/<id>.png``.

    Image ``i`` is ``syn{i:06d}`` and equals ``generate(..., seed=seed, size=size)[0][i]``. Returns the CSV
    path. An existing ``train.csv`` is only replaced with ``overwrite=True``.
    """
    n = _check_n(n)
    seed = _check_seed(seed)
    size = _check_size(size)
    difficulty = _check_difficulty(difficulty)
    _check_style(style)
    out = pathlib.Path(out_dir)
    csv_path = out / "train.csv"
    if csv_path.exists() and not overwrite:
        raise DataError(f"{csv_path} already exists; pass overwrite=True to replace it, or choose another out_dir")
    image_dir = out / "train_images"
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the image folder {image_dir}: {err}") from err
    probs = np.asarray(DEFAULT_GRADE_PROBS, np.float64)
    rows = []
    for i in range(n):
        image, grade = _draw_one(seed, i, probs, size, difficulty, style)
        id_code = f"syn{i:06d}"
        Image.fromarray(image, "RGB").save(image_dir / f"{id_code}.png")
        rows.append((id_code, grade))
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:  # written last, atomically: a CSV means the images are there
        writer = csv.writer(fh)
        writer.writerow(["id_code", "diagnosis"])
        writer.writerows(rows)
    tmp.replace(csv_path)
    return csv_path


def _as_rgb_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """A real photograph (H, W[, 3|4]) as a centre-cropped square (size, size, 3) uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"real_image must be an (H, W, 3) RGB array, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    s = min(h, w)
    arr = arr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.asarray(Image.fromarray(arr, "RGB").resize((size, size), Image.LANCZOS))


def preview_grid(
    path: str | pathlib.Path,
    *,
    seed: int = 0,
    size: int = 192,
    per_grade: int = 4,
    difficulty: float = DEFAULT_DIFFICULTY,
    style: str = "default",
    real_image: np.ndarray | None = None,
) -> pathlib.Path:
    """Save a PNG contact sheet: one labelled row per grade (``per_grade`` images), plus a last row with
    ``real_image`` (a real fundus photograph, centre-cropped and resized) when given. Returns the path."""
    seed = _check_seed(seed)
    size = _check_size(size)
    difficulty = _check_difficulty(difficulty)
    _check_style(style)
    if isinstance(per_grade, bool) or not isinstance(per_grade, (int, np.integer)) or per_grade < 1:
        raise DataError(f"per_grade must be an integer >= 1, got {per_grade!r}")
    label_w, gap = 110, 4
    rows = 5 + (real_image is not None)
    sheet = Image.new("RGB", (label_w + per_grade * (size + gap), rows * (size + gap)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for grade in range(5):
        y0 = grade * (size + gap)
        draw.text((6, y0 + size // 2 - 12), f"grade {grade}\n{GRADE_NAMES[grade]}", fill=(235, 235, 235))
        for j in range(per_grade):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 1000 + grade, j]))
            tile = render_fundus(grade, rng, size=size, difficulty=difficulty, style=style)
            sheet.paste(Image.fromarray(tile, "RGB"), (label_w + j * (size + gap), y0))
    if real_image is not None:
        y0 = 5 * (size + gap)
        draw.text((6, y0 + size // 2 - 6), "real photo", fill=(235, 235, 235))
        sheet.paste(Image.fromarray(_as_rgb_uint8(real_image, size), "RGB"), (label_w, y0))
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
