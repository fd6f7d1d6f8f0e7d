"""Memory bombs under Pillow's pixel limit and preprocessing sizes from a bundle (issue 20, medium)."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import MAX_DECODE_PIXELS, PreprocessSpec, load_rgb, prepare_image


def png_header_bomb(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A valid PNG of zeros: tiny on disk, width x height pixels when decoded (color_type 6 = RGBA, 2 = RGB,
    0 = grey)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    channels = {6: 4, 2: 3, 0: 1}[color_type]
    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    # Deflating the 648 MB of the issue's bomb took ~2.5 s a test. A full flush starts the compressor afresh, so every
    # 64-row block compresses to the same bytes: deflate one, repeat it, and add zlib's header and checksum.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the zlib wrapper is added below
    block = row * 64
    unit = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH) == unit
    blocks, rest = divmod(height, 64)
    tail = compressor.compress(row * rest) + compressor.flush()
    check = 1
    for _ in range(blocks):
        check = zlib.adler32(block, check)
    check = zlib.adler32(row * rest, check)
    idat = b"\x78\xda" + unit * blocks + tail + struct.pack(">I", check)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _refused_cheaply(path, *, seconds: float = 5.0, peak_mb: float = 64) -> str:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError) as info:
            load_rgb(path, draft_size=224)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < seconds and peak < peak_mb * 2**20, (elapsed, peak)
    return str(info.value)


def test_the_issues_81_mpx_16_bit_rgba_png_is_refused_from_its_header(tmp_path):
    """630 KB on disk, 81 Mpx RGBA 16-bit: took 2 GB and 14 s to decode; now refused before decoding."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_bomb(9000, 9000, 16, 6))
    assert len(path.read_bytes()) < 700_000 and 9000 * 9000 < Image.MAX_IMAGE_PIXELS  # under Pillow's own limit
    message = _refused_cheaply(path)
    assert message.startswith(f"{path}: image is too large to decode safely (9000x9000") and "\n" not in message


@pytest.mark.parametrize(
    ("width", "height", "bit_depth", "color_type"),
    [
        (7200, 7200, 8, 2),  # RGB, just over the pixel limit
        (6000, 6000, 8, 6),  # RGBA 36 Mpx: under the pixel limit, over the memory limit
        (7100, 7100, 16, 0),  # 16-bit grey
        (60000, 900, 8, 0),  # a strip
    ],
)
def test_the_class_of_header_bombs_is_refused(tmp_path, width, height, bit_depth, color_type):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_bomb(width, height, bit_depth, color_type))
    assert "too large to decode safely" in _refused_cheaply(path)


def test_a_camera_size_jpeg_is_still_read_through_its_draft(tmp_path):
    """A JPEG over the pixel limit is decoded at 1/8 scale when the input is small: it is not refused."""
    side = int((MAX_DECODE_PIXELS * 1.1) ** 0.5)
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 40, 20)).save(buffer, format="JPEG", quality=50)
    path = tmp_path / "big.jpg"
    path.write_bytes(buffer.getvalue())
    rgb = load_rgb(path, draft_size=224)
    assert rgb.shape[0] < side and rgb.shape[2] == 3
    with pytest.raises(DataError, match="too large to decode safely"):
        load_rgb(path)  # without a draft the whole frame would be decoded


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("size", 100000),
        ("size", 0),
        ("size", True),
        ("size", 2.5),
        ("std", [0, 1, 1]),
        ("mean", [float("nan"), 0, 0]),
        ("fov_threshold", 7),
        ("circular_mask", -1),
    ],
)
def test_preprocessing_specs_are_bounded(key, value):
    spec = PreprocessSpec(size=64).to_dict()
    spec[key] = value
    with pytest.raises(DataError, match=f"preprocessing {key}"):
        PreprocessSpec.from_dict(spec)


def test_a_bundle_asking_for_100000_px_fails_verify_without_allocating(bundle_copy):
    from tlcompile.runtime.bundle import verify_bundle
    from tlcompile.runtime.manifest import manifest_entries

    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["preprocessing"]["size"] = 100000
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    (bundle_copy / "manifest.json").write_text(json.dumps({"files": manifest_entries(bundle_copy)}))  # resealed
    tracemalloc.start()
    try:
        result = verify_bundle(bundle_copy)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.ok and peak < 256 * 2**20
    problems = " ".join(result.problems + (result.golden.problems if result.golden else []))
    assert "preprocessing size 100000 is out of range" in problems and "bundle.json" in problems
    with pytest.raises(DataError):
        prepare_image(np.zeros((8, 8, 3), np.uint8), PreprocessSpec(size=100000))
