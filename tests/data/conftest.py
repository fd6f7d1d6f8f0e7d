"""Small fundus data sets written in each public layout, and a corpus of bad files (tiny images, fast)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def fundus(index: int, grade: int, *, width: int = 72, height: int = 60) -> np.ndarray:
    """A small distinct fundus-like frame: black surround, an orange disc whose colour carries the grade, and noise
    seeded by ``index`` (so no two images have the same bytes)."""
    rng = np.random.default_rng([index, grade])
    yy, xx = np.mgrid[:height, :width]
    r = min(width, height) // 2 - 3
    disc = (yy - height // 2) ** 2 + (xx - width // 2) ** 2 < r * r
    rgb = np.zeros((height, width, 3), np.uint8)
    base = np.array([170, 60 + 12 * grade, 30], np.float64)
    rgb[disc] = np.clip(base + rng.normal(0, 6, (int(disc.sum()), 3)), 0, 255).astype(np.uint8)
    return rgb


def save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_claiming_size(rgb: np.ndarray, width: int, height: int) -> bytes:
    """A valid small PNG whose header claims ``width`` x ``height`` (a decompression bomb as Pillow sees it)."""
    data = png_bytes(rgb)
    ihdr = bytearray(data[16:29])
    ihdr[0:4], ihdr[4:8] = struct.pack(">I", width), struct.pack(">I", height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return data[:16] + bytes(ihdr) + crc + data[33:]


@pytest.fixture
def aptos_root(tmp_path) -> Path:
    """APTOS 2019: train.csv (id_code, diagnosis) + train_images/<id_code>.png; 30 images, grades cycling 0-4."""
    root = tmp_path / "aptos"
    rows = []
    for i in range(30):
        grade = i % 5
        save(root / "train_images" / f"a{i:03d}.png", fundus(i, grade))
        rows.append([f"a{i:03d}", grade])
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    return root
