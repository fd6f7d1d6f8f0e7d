"""Fundus preprocessing (torch-free) on a real retina photo and on edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import PreprocessSpec, find_fov, load_rgb, prepare_image, to_input

skimage_data = pytest.importorskip("skimage.data")


def test_fov_of_real_retina_photo():
    rgb = skimage_data.retina()  # 1411 x 1411 fundus photo, a full circular field nearly touching the frame
    box = find_fov(rgb)
    assert box is not None
    # Reference edges read once from brightness profiles through the centre (row/column 705), where the
    # rim rises from <10 to >100: top 7, bottom 1400, left 9, right 1400 (exclusive ends).
    for found, reference in zip(box, (7, 1400, 9, 1400), strict=True):
        assert abs(found - reference) <= 4


def test_crop_removes_black_surround_of_a_small_field():
    rgb = np.zeros((300, 400, 3), np.uint8)
    yy, xx = np.mgrid[:300, :400]
    disc = (yy - 150) ** 2 + (xx - 250) ** 2 < 80**2
    rgb[disc] = (180, 80, 40)
    out, found = prepare_image(rgb, PreprocessSpec(size=64))
    assert found and out.shape == (64, 64, 3)
    # After the crop the field touches all four sides of the square.
    lum = out.max(axis=2) > 30
    assert lum[32, :3].any() and lum[32, -3:].any() and lum[:3, 32].any() and lum[-3:, 32].any()


def test_dark_image_still_found_and_black_image_not():
    rgb = np.zeros((200, 200, 3), np.uint8)
    yy, xx = np.mgrid[:200, :200]
    rgb[(yy - 100) ** 2 + (xx - 100) ** 2 < 60**2] = (25, 12, 6)  # badly under-exposed
    assert find_fov(rgb) is not None
    assert find_fov(np.zeros((200, 200, 3), np.uint8)) is None
    _, found = prepare_image(np.zeros((50, 50, 3), np.uint8), PreprocessSpec(size=32))
    assert not found


def test_to_input_normalises_like_imagenet():
    spec = PreprocessSpec(size=4)
    img = np.full((4, 4, 3), 255, np.uint8)
    x = to_input(img, spec)
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_modes_are_converted(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (20, 10), color=100 if mode in ("L", "P") else (100, 50, 25, 255)).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (10, 20, 3) and rgb.dtype == np.uint8


def test_bad_files_raise_data_error(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for path in (empty, text, tmp_path / "missing.png"):
        with pytest.raises(DataError, match=path.name):
            load_rgb(path)
