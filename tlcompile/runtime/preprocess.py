"""Fundus preprocessing shared by training and the deployed runtime (numpy + Pillow, never torch).

What was validated is what runs on the device: the training data module and ``tlcompile predict`` both call
:func:`prepare_image` (decode -> RGB -> crop to the field of view -> pad square -> resize) and
:func:`to_input` (uint8 HWC -> normalised float32 NCHW).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlcompile.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a camera image into a network input; saved in reports and bundles."""

    size: int
    crop_fov: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Pixels with max(R,G,B) above this fraction of the bright level count as inside the field of view.
    fov_threshold: float = 0.12
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD))
        return cls(**d)


def find_fov(rgb: np.ndarray, threshold: float = 0.12) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right; exclusive ends) of the circular field of view, or None.

    Robust to dark photographs: the threshold is relative to the 99th percentile of brightness, with a
    floor above sensor noise. A field that covers under 3% of the frame counts as "not found".
    """
    lum = rgb.max(axis=2) if rgb.ndim == 3 else rgb
    # Subsample big images for the statistics; the bbox is found on the full grid below.
    step = max(1, min(lum.shape) // 256)
    bright = float(np.percentile(lum[::step, ::step], 99))
    if bright < 8:  # an all-black (or nearly) frame
        return None
    mask = lum > max(6.0, threshold * bright)
    # Rows/columns where a meaningful run of the field is present (ignores isolated hot pixels and text).
    min_run = max(2, int(0.02 * min(lum.shape)))
    rows = np.flatnonzero(mask.sum(axis=1) >= min_run)
    cols = np.flatnonzero(mask.sum(axis=0) >= min_run)
    if rows.size == 0 or cols.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (bottom - top) * (right - left) < 0.03 * lum.size:
        return None
    return top, bottom, left, right


def crop_to_fov(rgb: np.ndarray, threshold: float = 0.12) -> tuple[np.ndarray, bool]:
    """Crop to the field of view and pad to a square (black, centred). Returns (image, fov_found)."""
    box = find_fov(rgb, threshold)
    if box is None:
        return pad_square(rgb), False
    top, bottom, left, right = box
    return pad_square(rgb[top:bottom, left:right]), True


def pad_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.zeros((side, side, 3), dtype=rgb.dtype)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = rgb
    return out


def load_rgb(path: str | Path, *, draft_size: int | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB (grayscale, palette and RGBA are converted).

    ``draft_size`` lets the JPEG decoder scale down while decoding (much faster for camera-size images).
    Raises :class:`DataError` naming the file for missing, empty, truncated or non-image files.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA") else img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: not an image Pillow can read (empty, wrong format or corrupt)") from err
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image is too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    img = Image.fromarray(rgb)
    return np.asarray(img.resize((size, size), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def prepare_image(image: np.ndarray | str | Path, spec: PreprocessSpec) -> tuple[np.ndarray, bool]:
    """Camera image (array or file) -> (uint8 (size, size, 3), fov_found)."""
    rgb = load_rgb(image, draft_size=spec.size * 2) if isinstance(image, (str, Path)) else np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise DataError(f"image array has shape {rgb.shape}; expected (H, W, 3) RGB")
    rgb = rgb[:, :, :3].astype(np.uint8, copy=False)
    found = True
    if spec.crop_fov:
        rgb, found = crop_to_fov(rgb, spec.fov_threshold)
    else:
        rgb = pad_square(rgb)
    return resize(rgb, spec.size), found


def to_input(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] and normalised."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
