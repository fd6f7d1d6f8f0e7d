"""Heatmaps a grader can check: where the deployed model looked (never imports torch).

The method is black-box **RISE** (Petsiuk et al., 2018) on the bundle's own session (OpenVINO or ONNX Runtime): 256
random smooth masks (a 7 x 7 grid of cells, each kept with probability 1/2, upsampled bilinearly with a random
shift) keep part of the picture and replace the rest with a heavily blurred copy (the fundus colour and shading stay,
small lesions vanish); the masked inputs run in batches through the same session ``predict`` uses, and a pixel's
heat is how much higher P(referable DR) is, on average, when that pixel is kept. The masks come from a fixed seed,
so one image always gets the same heatmap. No graph surgery: it explains exactly the model that decides (int8,
pruned, either runtime), with nothing beyond numpy and Pillow. Occlusion (a sliding blurred patch) is kept as the
alternative method.

Why RISE: measured on the quickstart bundle's 123 referable test images (``benchmarks/explain_methods.py``; the
table is in the README), its heatmap's peak fell on a painted lesion most often among the methods cheap enough for
a clinic box: 0.82 against 0.75 for occlusion (16 px patch, stride 8, about half the cost), 0.76 for RISE with 128
masks, 0.36 for the white-box activation map and 0.26 for chance. OpenVINO's XAI toolkit (``openvino-xai``) was not
used: its releases pin an older OpenVINO and numpy than tlcompile runs on.

The pointing game (:func:`pointing_game`) scores a heatmap against lesions only a generator knows: a hit when the
heatmap's peak inside the field of view lies within ``tolerance`` pixels of a painted lesion; chance is the share of
the field within that tolerance of a lesion (a peak placed uniformly at random), and a trivial baseline puts the
peak at the field's centre.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tlcompile.errors import TlcompileError
from tlcompile.evaluate.clinical import proportion
from tlcompile.evaluate.metrics import referable_classes, softmax
from tlcompile.io import STEM_KEEP_BYTES, STEM_MAX_BYTES, atomic_path, fitting_name  # noqa: F401 - the stem limits, re-exported
from tlcompile.runtime.inference import InferenceSession
from tlcompile.runtime.outputs import check_output_folder, refuse_inside_bundle
from tlcompile.runtime.preprocess import PreprocessSpec, _square_window, find_field, to_input
from tlcompile.runtime.terminal import printable

if TYPE_CHECKING:
    from tlcompile.runtime.bundle import Bundle
    from tlcompile.runtime.predict import PreparedImage

METHODS = ("occlusion", "rise")
DEFAULT_METHOD = "rise"
#: Occlusion patch and stride as fractions of the input side: 1/7 and 1/14 (16 and 8 px at 112 px, 13 x 13 = 169
#: patched inputs per image).
PATCH_FRACTION = 1 / 7
STRIDE_FRACTION = 1 / 14
#: RISE: random masks on a coarse grid, each cell kept with probability RISE_KEEP.
RISE_MASKS = 256
RISE_GRID = 7
RISE_KEEP = 0.5
#: Rows per session call (models are exported with a dynamic batch axis) at an input side of BATCH_SIZE_PX or less;
#: larger inputs get fewer rows (:func:`batch_for`), so that one batch's inputs and activations stay about the size of
#: 64 rows at 112 px whatever the model's input size (4 rows at 512 px, never fewer).
BATCH = 64
BATCH_SIZE_PX = 112
MIN_BATCH = 4
#: The blur that makes the occluder (Gaussian sigma as a fraction of the side): wider than any lesion.
FILL_BLUR_FRACTION = 1 / 10
#: Pointing game: a lesion pixel is one painted at this opacity or more; a hit is a peak within TOLERANCE_FRACTION of
#: the input side (4 px at 112 px) of one.
LESION_LEVEL = 0.2
TOLERANCE_FRACTION = 1 / 28
EXPLAIN_SUFFIX = ".explain.png"
#: The overlay's full colour needs at least this much heat (a change of P(referable DR)): see :func:`overlay`.
HEAT_FLOOR = 0.001
# Written into every overlay PNG (a text chunk): a later run may replace a file that carries it, never another one.
PNG_MARK_KEY = "tlcompile-explain"


def batch_for(size: int) -> int:
    """Rows per session call at an input side of ``size`` px: BATCH up to BATCH_SIZE_PX, then fewer in proportion to
    the pixels per row (at least MIN_BATCH)."""
    if size <= BATCH_SIZE_PX:
        return BATCH
    return max(MIN_BATCH, round(BATCH * (BATCH_SIZE_PX / size) ** 2))


def tolerance_px(size: int) -> float:
    """The pointing game's tolerance at an input side of ``size`` pixels."""
    return max(1.0, size * TOLERANCE_FRACTION)


# ------------------------------------------------------------------------------------------- scoring
def referable_probability(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(referable DR) per row, the same score the bundle's threshold is on (see ``Bundle.interpret``)."""
    p = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return p[:, referable_classes(p.shape[1])].sum(axis=1)


def _scores(session: InferenceSession, x: np.ndarray, temperature: float, batch: int) -> np.ndarray:
    out = []
    for i in range(0, x.shape[0], batch):
        out.append(referable_probability(session.run(np.ascontiguousarray(x[i : i + batch])), temperature))
    return np.concatenate(out)


def to_crop(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The network input (1, 3, H, W) back to the uint8 (H, W, 3) picture the model saw."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    rgb = (np.asarray(x, dtype=np.float32).reshape(3, *x.shape[-2:]) * std + mean) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


def _fill(crop: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The occluder: the picture blurred far beyond any lesion, as a network input (1, 3, H, W)."""
    sigma = max(1.0, crop.shape[0] * FILL_BLUR_FRACTION)
    blurred = np.asarray(Image.fromarray(crop).filter(ImageFilter.GaussianBlur(sigma)))
    return to_input(blurred, spec)


def occlusion_map(
    session: InferenceSession,
    x: np.ndarray,
    spec: PreprocessSpec,
    *,
    temperature: float = 1.0,
    batch: int | None = None,
    patch: int | None = None,
    stride: int | None = None,
) -> np.ndarray:
    """Heat (H, W) float32: mean drop of P(referable DR) when a patch over the pixel is blurred away; ``batch`` rows
    per session call (None: :func:`batch_for` the input size)."""
    size = x.shape[-1]
    batch = batch or batch_for(size)
    patch = patch or max(2, round(size * PATCH_FRACTION))
    stride = stride or max(1, round(size * STRIDE_FRACTION))
    fill = _fill(to_crop(x, spec), spec)
    starts = list(range(0, max(1, size - patch) + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    boxes = [(t, lft) for t in starts for lft in starts]
    base = _scores(session, x, temperature, batch)[0]
    heat = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for first in range(0, len(boxes), batch):  # one batch of patched inputs in memory at a time
        chunk = boxes[first : first + batch]
        batch_x = np.repeat(x, len(chunk), axis=0)
        for k, (t, lft) in enumerate(chunk):
            batch_x[k, :, t : t + patch, lft : lft + patch] = fill[0, :, t : t + patch, lft : lft + patch]
        drops = base - _scores(session, batch_x, temperature, batch)
        for k, (t, lft) in enumerate(chunk):
            heat[t : t + patch, lft : lft + patch] += drops[k]
            count[t : t + patch, lft : lft + patch] += 1
    return (heat / np.maximum(count, 1)).astype(np.float32)


MASK_CACHE_BYTES = 32 << 20  # RISE's masks are kept between images below this size (12.8 MB at 112 px, 256 masks)


def _draw_masks(rng: np.random.Generator, out: np.ndarray, size: int, grid: int, keep: float) -> None:
    """Fill ``out`` (n, size, size) with the next n RISE masks of ``rng``: coarse random grids, upsampled, shifted."""
    cell = math.ceil(size / grid)
    up = (grid + 1) * cell
    for i in range(out.shape[0]):
        coarse = (rng.random((grid + 1, grid + 1)) < keep).astype(np.float32)
        big = np.asarray(Image.fromarray(coarse, "F").resize((up, up), Image.BILINEAR))
        dy, dx = rng.integers(0, cell, 2)
        out[i] = big[dy : dy + size, dx : dx + size]


@functools.lru_cache(maxsize=2)
def _all_masks(size: int, masks: int, grid: int, keep: float, seed: int) -> np.ndarray:
    """Every mask of a (size, masks, grid, keep, seed): the same for every image, so drawn once (read-only)."""
    out = np.empty((masks, size, size), np.float32)
    _draw_masks(np.random.default_rng(seed), out, size, grid, keep)
    out.flags.writeable = False
    return out


def rise_map(
    session: InferenceSession,
    x: np.ndarray,
    spec: PreprocessSpec,
    *,
    temperature: float = 1.0,
    batch: int | None = None,
    masks: int | None = None,
    grid: int = RISE_GRID,
    keep: float = RISE_KEEP,
    seed: int = 0,
) -> np.ndarray:
    """RISE (Petsiuk et al. 2018): heat (H, W) = E[score | pixel kept] - E[score], over random smooth masks.

    Computed ``batch`` masks at a time (None: :func:`batch_for` the input size), in buffers made once and reused:
    with A = sum of score x mask, B = sum of masks and S = sum of scores, heat = (A - (S / masks) B) / B. The masks
    depend on ``seed`` only (drawn one after another, whatever the batch); each masked input is x * m + fill * (1 - m)
    rounded exactly as that expression is, so the map is the same bit for bit at a given batch, and across batches up
    to the order the float64 sums are added in (and whatever the runtime's kernels do with another batch size)."""
    size = x.shape[-1]
    masks = RISE_MASKS if masks is None else masks  # None: RISE_MASKS as it is when called
    batch = batch or batch_for(size)
    # The masks depend on the arguments only: kept between images when small, else drawn batch by batch (the same
    # masks in the same order either way).
    cached = _all_masks(size, masks, grid, keep, seed) if masks * size * size * 4 < MASK_CACHE_BYTES else None
    rng = np.random.default_rng(seed)
    fill = _fill(to_crop(x, spec), spec)
    dtype = np.result_type(x.dtype, fill.dtype, np.float32)
    weighted = np.zeros((size, size), np.float64)
    covered = np.zeros((size, size), np.float64)
    total = 0.0
    rows = min(batch, masks)
    m_buf = np.empty((rows if cached is None else 0, size, size), np.float32)  # the masks, when drawn per batch
    rest_buf = np.empty((rows, size, size), np.float32)  # 1 - mask
    part_buf = np.empty((rows, size, size), dtype)  # one channel of fill * (1 - mask)
    in_buf = np.empty((rows, x.shape[1], size, size), dtype)  # the masked inputs
    for first in range(0, masks, batch):
        n = min(batch, masks - first)
        rest, part, masked = rest_buf[:n], part_buf[:n], in_buf[:n]
        if cached is not None:
            m = cached[first : first + n]
        else:
            m = m_buf[:n]
            _draw_masks(rng, m, size, grid, keep)
        np.subtract(1.0, m, out=rest)
        for c in range(x.shape[1]):  # masked = x * m + fill * (1 - m), one channel at a time, no temporaries
            np.multiply(x[0, c], m, out=masked[:, c])
            np.multiply(fill[0, c], rest, out=part)
            np.add(masked[:, c], part, out=masked[:, c])
        scores = _scores(session, masked, temperature, batch)
        weighted += np.tensordot(scores, m, axes=1)
        covered += m.sum(axis=0)
        total += float(scores.sum())
    heat = (weighted - (total / masks) * covered) / np.maximum(covered, 1e-6)
    return heat.astype(np.float32)


def method_detail(method: str, size: int) -> str:
    """One line saying what a method's heat means, for the report and the overlay's caption."""
    if method == "rise":
        return (
            f"RISE: {RISE_MASKS} random {RISE_GRID} x {RISE_GRID} masks, blurred fill; heat = how much higher "
            "P(referable DR) is when the pixel is kept"
        )
    return (
        f"occlusion: {max(2, round(size * PATCH_FRACTION))} px patch, stride {max(1, round(size * STRIDE_FRACTION))} "
        "px, blurred fill; heat = drop of P(referable DR) when the pixel is covered"
    )


def heatmap(
    session: InferenceSession, x: np.ndarray, spec: PreprocessSpec, *, method: str = DEFAULT_METHOD, **kw: Any
) -> np.ndarray:
    if method == "occlusion":
        return occlusion_map(session, x, spec, **kw)
    if method == "rise":
        return rise_map(session, x, spec, **kw)
    raise TlcompileError(f"explanation method '{method}' is not known; valid: {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------- field and peak
def field_mask(crop: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(H, W) bool: the field of view inside the picture the model saw (the whole frame when none is found)."""
    size = crop.shape[0]
    found = find_field(crop, spec.fov_threshold, spec.version)
    inside = crop.max(axis=2) > 0
    if found is None:
        return np.ones((size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - found.cx) ** 2 + (yy - found.cy) ** 2 <= (found.radius - 1.0) ** 2
    return disc & inside if (disc & inside).any() else np.ones((size, size), bool)


def peak(heat: np.ndarray, field: np.ndarray) -> tuple[int, int]:
    """(row, column) of the hottest pixel inside the field."""
    masked = np.where(field, heat, -np.inf)
    r, c = np.unravel_index(int(np.argmax(masked)), heat.shape)
    return int(r), int(c)


def field_centre(field: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(field)
    return int(round(rows.mean())), int(round(cols.mean()))


# --------------------------------------------------------------------------------------- pointing game
def to_network_frame(values: np.ndarray, rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A per-pixel map of the photo (H, W) carried into the network input's frame (size, size) exactly as
    ``prepare_image`` carries the photo: the same field, the same square crop, a bilinear resize."""
    h, w = rgb.shape[:2]
    top, left, side = _square_window(h, w, find_field(rgb, spec.fov_threshold, spec.version), spec.crop_fov)
    square = np.zeros((side, side), np.float32)
    y0, y1, x0, x1 = max(0, top), min(h, top + side), max(0, left), min(w, left + side)
    if y1 > y0 and x1 > x0:
        square[y0 - top : y1 - top, x0 - left : x1 - left] = values[y0:y1, x0:x1]
    if side == spec.size:
        return square
    return np.asarray(Image.fromarray(square, "F").resize((spec.size, spec.size), Image.BILINEAR), dtype=np.float32)


def _near(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels within ``tolerance`` (Euclidean, pixel centres) of a True pixel of ``mask``."""
    r = int(math.floor(tolerance))
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > tolerance * tolerance:
                continue
            out[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] |= mask[
                max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)
            ]
    return out


@dataclass(frozen=True)
class PointingCase:
    """One referable image's pointing game: hit by the heatmap's peak, by the field's centre, and the chance that a
    peak drawn uniformly in the field hits."""

    hit: bool
    centre_hit: bool
    chance: float


def pointing_case(heat: np.ndarray, lesions: np.ndarray, field: np.ndarray, tolerance: float) -> PointingCase | None:
    """The pointing game on one image (network frame); None when no lesion pixel lies in the field."""
    lesion = (lesions >= LESION_LEVEL) & field
    if not lesion.any():
        return None
    near = _near(lesion, tolerance) & field
    r, c = peak(heat, field)
    cr, cc = field_centre(field)
    return PointingCase(hit=bool(near[r, c]), centre_hit=bool(near[cr, cc]), chance=float(near.sum() / field.sum()))


def pointing_game(cases: list[PointingCase], *, tolerance: float, size: int) -> dict[str, Any]:
    """Hit rate with a Wilson 95% CI against the chance rate (mean of the per-image chances, the expected hit rate
    of a uniformly random peak; its CI treats the images' hits as Bernoulli draws) and the centre baseline."""
    n = len(cases)
    hits = sum(c.hit for c in cases)
    chance = float(np.mean([c.chance for c in cases])) if cases else None
    return {
        "n": n,
        "hit_rate": proportion(hits, n),
        "chance": {"value": chance, "ci": _chance_ci(cases)},
        "centre": proportion(sum(c.centre_hit for c in cases), n),
        "tolerance_px": round(tolerance, 3),
        "input_size": size,
        "lesion_level": LESION_LEVEL,
    }


def _chance_ci(cases: list[PointingCase]) -> list[float] | None:
    """95% interval of a random peak's hit count over these images (Poisson-binomial, normal approximation)."""
    if not cases:
        return None
    p = np.array([c.chance for c in cases])
    mean, sd = p.mean(), math.sqrt(float((p * (1 - p)).sum())) / len(p)
    return [max(0.0, float(mean - 1.96 * sd)), min(1.0, float(mean + 1.96 * sd))]


# --------------------------------------------------------------------------------------------- overlay
def _jet(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on a blue-cyan-yellow-red scale."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)


def overlay(crop: np.ndarray, heat: np.ndarray, field: np.ndarray, *, scale: int = 2, caption: str = "") -> Image.Image:
    """The picture the model saw beside the same picture with the heat blended in (positive heat only, full colour at
    the larger of its maximum and HEAT_FLOOR; no heat and outside the field left as they are), the peak ringed;
    ``scale`` times larger (bilinear)."""
    size = crop.shape[0]
    pos = np.clip(heat, 0, None)
    top = float(pos[field].max()) if field.any() else 0.0
    # Colours are scaled to the image's own maximum, but never stretched beyond HEAT_FLOOR: a model sure there is
    # nothing (heat of a few ten-thousandths everywhere) gets a bare picture, not its noise painted full red.
    v = pos / max(top, HEAT_FLOOR)
    alpha = (0.7 * v)[..., None] * field[..., None]
    blended = crop.astype(np.float32) * (1 - alpha) + _jet(v).astype(np.float32) * alpha
    side = size * scale
    left = Image.fromarray(crop).resize((side, side), Image.BILINEAR)
    right = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    bar = 14 if caption else 0
    out = Image.new("RGB", (2 * side + 4, side + bar), (0, 0, 0))
    out.paste(left, (0, 0))
    out.paste(right, (side + 4, 0))
    draw = ImageDraw.Draw(out)
    if top >= HEAT_FLOOR:
        r, c = peak(heat, field)
        x, y, rad = side + 4 + (c + 0.5) * scale, (r + 0.5) * scale, 3 * scale
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], outline=(255, 255, 255), width=max(1, scale // 2))
    if caption:
        draw.text((3, side + 1), caption[:80], fill=(235, 235, 235))
    return out


def mark_of(path: Path) -> str | None:
    """What an overlay of ours says it explains (its PNG text chunk); None for any other file."""
    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get(PNG_MARK_KEY) if img.format == "PNG" else None
    except Exception:  # not an image, unreadable: not ours
        return None


def mark_for(source: str) -> str:
    """The text chunk a heatmap of ``source`` carries: escaped as the terminal shows names (a file name's bytes that
    are not UTF-8 stopped the PNG's write, and predict with it), at most 500 characters."""
    return printable(source)[:500]


def is_ours(path: Path) -> bool:
    """A file this module wrote (its PNG carries our text chunk): the only kind a later run may replace."""
    return mark_of(path) is not None


def write_overlay(image: Image.Image, path: Path, *, source: str) -> None:
    """Write the overlay PNG atomically; never replaces a file that is not an overlay of ours."""
    from PIL import PngImagePlugin

    if path.is_symlink() or (path.exists() and not is_ours(path)):
        raise TlcompileError(
            f"'{path}' exists and is not a heatmap tlcompile wrote; it is never overwritten; "
            "give another --explain folder or move the file"
        )
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_MARK_KEY, mark_for(source))
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
    except OSError as err:
        raise TlcompileError(f"cannot write the heatmap '{path}' ({err.strerror or err}); check the folder") from err


# ------------------------------------------------------------------------------------------- explainer
@dataclass
class Explanation:
    heat: np.ndarray
    crop: np.ndarray
    field: np.ndarray
    peak: tuple[int, int]
    ms: float


def explain_input(
    session: InferenceSession,
    x: np.ndarray,
    spec: PreprocessSpec,
    *,
    temperature: float = 1.0,
    method: str = DEFAULT_METHOD,
    batch: int | None = None,
) -> Explanation:
    """The heatmap of one network input (1, 3, H, W) and the picture and field it belongs to."""
    t0 = time.perf_counter()
    crop = to_crop(x, spec)
    heat = heatmap(session, x, spec, method=method, temperature=temperature, batch=batch)
    field = field_mask(crop, spec)
    return Explanation(heat=heat, crop=crop, field=field, peak=peak(heat, field), ms=(time.perf_counter() - t0) * 1e3)


def batch_size_of(meta: dict[str, Any], size: int) -> int:
    """Rows per call the bundle's model takes at input side ``size``: :func:`batch_for` it with a dynamic batch axis,
    else the model's fixed batch."""
    shape = (meta.get("input") or {}).get("shape") or [None]
    first = shape[0]
    return first if isinstance(first, int) and first > 0 else batch_for(size)


class Explainer:
    """``predict --explain`` / ``serve --explain``: one heatmap overlay PNG per gradable image, through the session
    that decided it. Ungradable images get none (the model was never validated on them)."""

    def __init__(self, bundle: Bundle, session: InferenceSession, *, method: str = DEFAULT_METHOD) -> None:
        if method not in METHODS:
            raise TlcompileError(f"explanation method '{method}' is not known; valid: {', '.join(METHODS)}")
        self.bundle, self.session, self.method = bundle, session, method
        self.spec = bundle.preprocessing
        self.batch = batch_size_of(bundle.meta, self.spec.size)
        self.ms: list[float] = []  # heatmap time per explained image, this run

    def write(self, prepared: PreparedImage, target: Path, *, source: str | None = None) -> str | None:
        """Explain a decided image into ``target`` (refused when it holds a file not ours); returns the PNG's name,
        None for an ungradable image. ``source`` (default: the image's path) is written into the PNG."""
        if prepared.x is None:
            return None
        result = prepared.result
        e = explain_input(
            self.session,
            prepared.x,
            self.spec,
            temperature=self.bundle.temperature,
            method=self.method,
            batch=self.batch,
        )
        self.ms.append(e.ms)
        prob = result.referable_dr_probability
        caption = f"{result.referral}" + (f"  P(referable DR) {prob:.3f}" if prob is not None else "")
        caption += f"  {self.method} heat max {float(e.heat[e.field].max()):+.3f}"
        # the image's full path: a later run from another folder tells it from another image of the same name
        mark = source or str(Path(result.file).resolve())
        write_overlay(overlay(e.crop, e.heat, e.field, caption=caption), target, source=mark)
        return target.name


def check_explain_dir(
    folder: str | Path, *, bundle_root: Path | None = None, inputs: Iterable[str | Path] = ()
) -> Path:
    """The --explain folder: created when missing; refused when it is a file, inside the bundle, or a folder of input
    images (its PNGs would be taken for photos by the next run over that folder)."""
    folder = Path(folder)
    check_output_folder("--explain", folder, what="the heatmap PNGs")
    for item in inputs:
        if Path(item).is_dir() and Path(item).resolve() == folder.resolve():
            raise TlcompileError(
                f"--explain '{folder}' is a folder of input images; the heatmaps would be read as photos next time; "
                "give another folder"
            )
    refuse_inside_bundle("--explain", folder, bundle_root, kind="folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TlcompileError(
            f"--explain '{folder}' cannot be created ({err.strerror or err}); give another folder"
        ) from err
    return folder


def _explains_another(target: Path, path: Path) -> bool:
    """``target`` is a heatmap of ours made for another image than ``path``: its mark names the image by its full
    path (a heatmap from before the marks were full paths: as it was given, which matches only as given)."""
    if target.is_symlink() or not target.is_file():
        return False
    mark = mark_of(target)
    if mark is None:
        return False
    return mark != mark_for(str(path.resolve())) if Path(mark).is_absolute() else mark != mark_for(str(path))


def explain_targets(paths: list[Path], folder: Path) -> dict[Path, Path]:
    """``<folder>/<image stem>.explain.png`` per input (a stem over STEM_MAX_BYTES: its first STEM_KEEP_BYTES + '~' +
    a hash of the whole stem, so the name fits the filesystem); two inputs with one stem (two folders) get the second
    and later a short hash of their full path, and so does an input whose plain name holds the heatmap of another
    image (an earlier run's: the results CSV of that run names it, and it stays). Refuses (before anything is
    decided) when a target holds a file not ours."""
    import hashlib

    targets: dict[Path, Path] = {}
    taken: set[str] = set()
    for path in paths:
        stem = fitting_name(path.stem)  # a long stem: shortened + hash of the whole
        name = f"{stem}{EXPLAIN_SUFFIX}"
        if name in taken or _explains_another(folder / name, path):
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
            name = f"{stem}.{digest}{EXPLAIN_SUFFIX}"
        taken.add(name)
        target = folder / name
        if target.is_symlink() or (target.exists() and not is_ours(target)):
            raise TlcompileError(
                f"--explain: '{target}' exists and is not a heatmap tlcompile wrote; it is never overwritten; "
                "give another --explain folder or move the file"
            )
        targets[path] = target
    return targets
