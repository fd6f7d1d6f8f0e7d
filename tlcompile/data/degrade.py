"""Degraded copies of fundus photographs, labelled by whether a grader could still see the lesions (numpy + Pillow).

The image-quality gate (:mod:`tlcompile.runtime.quality`) is calibrated and measured on these copies. The photos
themselves are never changed: a copy is drawn from a photo, a kind, a level and its own seeded generator, so the
training data (and the quickstart's checkpoints) stay exactly what they were.

Kinds and levels, and why each level is gradable or not
-------------------------------------------------------
Sizes are in units of the field radius ``r`` (the generator draws microaneurysms as Gaussian dots of sigma
0.008-0.014 r, dot haemorrhages from 0.011 r up; real microaneurysms in a 45-degree photograph are smaller, about
0.004-0.008 r). A Gaussian dot of sigma ``s`` blurred with sigma ``b`` keeps ``s^2 / (s^2 + b^2)`` of its peak
contrast. The levels are chosen well either side of the line, never on it:

=========== ================================ ================================ =====================================
kind        gradable levels                  ungradable levels                the rule
=========== ================================ ================================ =====================================
blur        sigma 0.003 r, 0.005 r           sigma 0.025 r, 0.04 r            gradable while a 0.008 r dot keeps
                                                                              >= 70% of its contrast; at 0.025 r
                                                                              a microaneurysm keeps <= 24% and a
                                                                              0.011 r dot haemorrhage <= 16%: gone
                                                                              in the sensor noise
dark        gain 0.75, 0.6                   gain 0.2, 0.12                   a red lesion's contrast in green falls
                                                                              from ~25 grey levels to <= 5, under
                                                                              3 sd of the sensor noise
overexposed gain 1.2, 1.35                   gain 3 + 35% veil, 4 + 45% veil  the green channel saturates over most
                                                                              of the field: exudates and cotton-wool
                                                                              spots vanish, red lesions lose most of
                                                                              their contrast
partial     5% of the field hidden           35%, 50% of the field hidden     lesions in a hidden third of the field
            (a crescent at the rim)          (black, from one side)           cannot be graded (protocols grade the
                                                                              whole field)
glare       a 0.3%-of-field reflex           a reflex over 6%, 12% of the     the reflex saturates the area it
                                             field in the central 60%         covers, where lesions would be
eyelash     band at 80% brightness           band at 20% brightness over     lesions under the band lose 80% of
            over 15% of the field            40%, 55% of the field            their contrast (as 'dark')
uneven      brightness falls to 70% across   falls to 15%, 8% across the     the dark side is as 'dark'
            the field                        field
=========== ================================ ================================ =====================================

Every copy then gets fresh sensor noise (sd 1.5 grey levels) as a camera would add after the optics, and the
black surround stays black.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from tlcompile.errors import DataError
from tlcompile.io import atomic_write_text, atomic_write_with
from tlcompile.runtime.preprocess import find_field
from tlcompile.runtime.quality import measure, shrink

if TYPE_CHECKING:
    from tlcompile.data.datamodule import PhotoSource

# kind -> ((level, gradable), ...): see the module docstring for why each level is on its side
LEVELS: dict[str, tuple[tuple[float, bool], ...]] = {
    "blur": ((0.003, True), (0.005, True), (0.025, False), (0.04, False)),
    "dark": ((0.75, True), (0.6, True), (0.2, False), (0.12, False)),
    "overexposed": ((1.2, True), (1.35, True), (3.0, False), (4.0, False)),
    "partial": ((0.05, True), (0.35, False), (0.5, False)),
    "glare": ((0.003, True), (0.06, False), (0.12, False)),
    "eyelash": ((0.15, True), (0.4, False), (0.55, False)),
    "uneven": ((0.7, True), (0.15, False), (0.08, False)),
}
KINDS = tuple(LEVELS)
SENSOR_NOISE_SD = 1.5


@dataclass(frozen=True)
class Copy:
    """One degraded copy: which photo, how it was degraded, and whether a grader could still grade it."""

    index: int  # of the photo in the list it was drawn from
    kind: str  # a KINDS name, or "none" for the photo itself
    level: float
    gradable: bool
    image: np.ndarray


def _field(rgb: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    found = find_field(rgb)
    h, w = rgb.shape[:2]
    if found is None:
        raise DataError("degrade: no field of view found in the photo; only fundus photographs can be degraded")
    surround = rgb.max(axis=2) < 8
    return found.cx, found.cy, found.radius, surround


def degrade(rgb: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """A degraded copy of a uint8 RGB fundus photograph (see the module docstring for the kinds and levels)."""
    if kind not in LEVELS:
        raise DataError(f"degrade: kind '{kind}' is not valid; valid: {', '.join(KINDS)}")
    rgb = np.asarray(rgb, np.uint8)[:, :, :3]
    cx, cy, r, surround = _field(rgb)
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    angle = rng.uniform(0, 2 * math.pi)
    along = math.cos(angle) * dx + math.sin(angle) * dy  # -1..1 across the field in a random direction
    img = rgb.astype(np.float32)
    if kind == "blur":
        img = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(level * r)), np.float32)
    elif kind == "dark":
        img *= level
    elif kind == "overexposed":
        veil = 0.0 if level < 2 else (0.35 if level < 3.5 else 0.45)
        img = img * level * (1 - veil) + 255.0 * veil
    elif kind == "partial":
        # hide the share `level` of the disc's area: everything beyond the chord at distance t from the centre
        t = _chord_for_share(level)
        img[along > t] = 0.0
    elif kind == "glare":
        # a soft saturated reflex of area level * pi r^2, centred in the central 60% of the field
        rho, phi = 0.6 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        gx, gy = cx + rho * r * math.cos(phi), cy + rho * r * math.sin(phi)
        radius = math.sqrt(level) * r
        d2 = ((xx - gx) ** 2 + (yy - gy) ** 2) / radius**2
        alpha = np.clip(1.6 * np.exp(-0.5 * d2 * 1.5), 0.0, 1.0)[..., None]  # ~flat top, soft edge
        img = img * (1 - alpha) + 255.0 * alpha * np.array([1.0, 0.98, 0.92], np.float32)
    elif kind == "eyelash":
        # a soft band from one side covering `level` of the field, brightness 0.8 (light) or 0.2 (heavy)
        t = _chord_for_share(level)
        transmit = 0.8 if level < 0.3 else 0.2
        ramp = np.clip((along - t) / 0.08 + 0.5, 0.0, 1.0)
        stripes = 1.0 - 0.15 * (np.sin(along * 40.0 + rng.uniform(0, 6.3)) > 0.6)  # lashes are strands
        img *= (1.0 - ramp * (1.0 - transmit * stripes))[..., None]
    elif kind == "uneven":
        gain = 1.0 - (1.0 - level) * np.clip((along + 1.0) / 2.0, 0.0, 1.0)
        img *= gain[..., None]
    img += rng.normal(0.0, SENSOR_NOISE_SD, img.shape).astype(np.float32)
    img[surround] = 0.0
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _chord_for_share(share: float) -> float:
    """Distance t from the centre (in radii) of the chord that cuts off ``share`` of a unit disc's area."""
    lo, hi = -1.0, 1.0
    for _ in range(40):
        t = (lo + hi) / 2
        segment = (math.acos(t) - t * math.sqrt(1 - t * t)) / math.pi
        lo, hi = (t, hi) if segment > share else (lo, t)
    return (lo + hi) / 2


def copy_plan(n: int, *, seed: int, per_image: int = 1, kinds: tuple[str, ...] = KINDS) -> list[tuple[int, str, float]]:
    """Which (photo index, kind, level) copies to draw from ``n`` photos: ``per_image`` per photo, kinds and levels
    taken in turn (so every kind and level appears), shuffled by ``seed``."""
    combos = [(k, lvl) for k in kinds for lvl, _ in LEVELS[k]]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDE9]))
    order = rng.permutation(n * per_image)
    return [(int(j) % n, *combos[i % len(combos)]) for i, j in enumerate(order)]


def gradable_label(kind: str, level: float) -> bool:
    for lvl, ok in LEVELS[kind]:
        if math.isclose(lvl, level):
            return ok
    raise DataError(f"degrade: level {level} is not one of {kind}'s levels {[v for v, _ in LEVELS[kind]]}")


def stream_copies(n: int, load: Callable[[int], np.ndarray], *, seed: int, per_image: int = 1) -> Iterator[Copy]:
    """Photo by photo (``load(i)`` for i in 0..n-1, only one held at a time): the photo as it is (kind "none",
    gradable), then the copies :func:`copy_plan` gave it, each drawn with its own generator (seed, copy number): the
    same inputs and seed give the same copies.

    A photo without a field of view cannot be degraded: it gets only its "none" entry, and the copies planned for it
    are drawn from the next photo that has a field (from the first such photo at the end, loaded once more), so the
    plan's kinds and levels, taken in turn, all still appear."""
    todo: dict[int, list[tuple[int, str, float]]] = {}
    for j, (i, kind, level) in enumerate(copy_plan(n, seed=seed, per_image=per_image)):
        todo.setdefault(i, []).append((j, kind, level))
    pending: list[tuple[int, str, float]] = []
    first: int | None = None
    for i in range(n):
        photo = np.asarray(load(i))
        yield Copy(i, "none", 0.0, True, photo)
        pending += todo.pop(i, [])
        if find_field(photo) is None:
            continue
        first = i if first is None else first
        yield from _draw(i, photo, pending, seed)
        pending = []
    if pending and first is not None:
        yield from _draw(first, np.asarray(load(first)), pending, seed)


def _draw(i: int, photo: np.ndarray, plan: list[tuple[int, str, float]], seed: int) -> Iterator[Copy]:
    for j, kind, level in plan:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0B, j]))
        yield Copy(i, kind, level, gradable_label(kind, level), degrade(photo, kind, level, rng))


def degraded_copies(images: list[np.ndarray] | np.ndarray, *, seed: int, per_image: int = 1) -> list[Copy]:
    """Every photo as it is (kind "none"), then the degraded copies of :func:`stream_copies`, all in memory (for a
    few photos; the build streams)."""
    out = list(stream_copies(len(images), lambda i: images[i], seed=seed, per_image=per_image))
    return [c for c in out if c.kind == "none"] + [c for c in out if c.kind != "none"]


def write_degraded(out_dir: str | Path, *, seed: int, per_image: int) -> Path:
    """Degraded copies of an APTOS-style folder's photos (``train.csv`` + ``train_images/``, as ``tlcompile data
    synth`` writes it): ``degraded_images/<id>_<n>.png`` and ``degraded.csv`` (id_code, source, kind, level,
    gradable, diagnosis), the photos themselves listed first as kind ``none``. One photo is read at a time and every
    image is written atomically. Returns the CSV's path; an existing ``degraded.csv`` is never replaced."""
    out = Path(out_dir)
    source_csv, target = out / "train.csv", out / "degraded.csv"
    if target.exists():
        raise DataError(f"{target} already exists; it is never replaced: give another --out folder")
    try:
        with open(source_csv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise DataError(f"{source_csv}: cannot read it ({err.strerror or err}); degrade needs train.csv") from err
    folder = out / "degraded_images"
    folder.mkdir(exist_ok=True)

    def load(i: int) -> np.ndarray:
        path = out / "train_images" / f"{rows[i]['id_code']}.png"
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as err:
            raise DataError(f"{path} (listed in {source_csv}): cannot read it as an image ({err})") from err

    lines = [["id_code", "source", "kind", "level", "gradable", "diagnosis"]]
    lines += [[r["id_code"], r["id_code"], "none", "0", "1", r["diagnosis"]] for r in rows]
    counts: dict[int, int] = {}
    for c in stream_copies(len(rows), load, seed=seed, per_image=per_image):
        if c.kind == "none":
            continue
        counts[c.index] = counts.get(c.index, 0) + 1
        row = rows[c.index]
        name = f"{row['id_code']}_{counts[c.index]}"
        image = Image.fromarray(c.image)
        atomic_write_with(folder / f"{name}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
        lines.append([name, row["id_code"], c.kind, f"{c.level:g}", str(int(c.gradable)), row["diagnosis"]])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    atomic_write_text(target, buffer.getvalue())  # last: a CSV means the images are there
    return target


@dataclass(frozen=True)
class Measured:
    """What the quality stage keeps of one photo or copy: which photo (index into the data module), how it was degraded,
    its label, and its measures (None: no field of view found). The image itself is dropped once measured."""

    index: int
    kind: str
    level: float
    gradable: bool
    measures: dict[str, float] | None


def measure_photos(task: tuple[PhotoSource, np.ndarray, int, int]) -> tuple[list[Measured], float]:
    """The photos ``idx`` of ``photos`` (a :class:`~tlcompile.data.datamodule.PhotoSource`), each shrunk for the gate
    and then its degraded copies (:func:`stream_copies` with ``seed`` and ``per_image``), streamed one photo at a time:
    what was measured of each, and the mean seconds per measure. Picklable in and out (the quality stage runs val and
    test in a process each)."""
    photos, idx, seed, per_image = task
    out: list[Measured] = []
    seconds = 0.0
    for c in stream_copies(len(idx), lambda k: shrink(photos(int(idx[k]))), seed=seed, per_image=per_image):
        t0 = time.perf_counter()
        found = find_field(c.image)
        m = None if found is None else measure(c.image, found)
        seconds += time.perf_counter() - t0
        out.append(Measured(int(idx[c.index]), c.kind, c.level, c.gradable, m))
    return out, seconds / max(1, len(out))
