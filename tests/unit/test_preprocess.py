"""Fundus preprocessing (torch-free) on a real retina photo and on edge cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import (
    PreprocessSpec,
    find_field,
    find_fov,
    load_rgb,
    prepare_image,
    read_image,
    to_input,
)

skimage_data = pytest.importorskip("skimage.data")


def test_fov_of_real_retina_photo():
    rgb = skimage_data.retina()  # 1411 x 1411 fundus photo, a full circular field nearly touching the frame
    box = find_fov(rgb)
    assert box is not None
    # Reference edges read once from brightness profiles through the centre (row/column 705), where the
    # rim rises from <10 to >100: top 7, bottom 1400, left 9, right 1400 (exclusive ends); the box is now the
    # fitted circle's, cut to the frame.
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


# The field of view of skimage's retina photo (1411 x 1411, a full field nearly touching the frame, with the small
# rectangular notch at the upper right): centre and radius found once and checked by eye on 80 px crops of the
# rim at top, bottom, left, right and both diagonals with the circle drawn on them -- the circle runs on the step
# from black to fundus everywhere and passes under the notch.
RETINA_CX, RETINA_CY, RETINA_R = 704.3, 703.0, 697.2


def _assert_circle(found, cx, cy, r, tol=3.0):
    assert found is not None and found.fitted
    assert abs(found.cx - cx) <= tol and abs(found.cy - cy) <= tol and abs(found.radius - r) <= tol, found


def test_field_circle_of_real_retina_photo():
    _assert_circle(find_field(skimage_data.retina()), RETINA_CX, RETINA_CY, RETINA_R)


def _with_text(rgb):
    out = rgb.copy()
    for k in range(6):  # burnt-in caption in the black corner (date, eye, patient number)
        out[1345:1385, 30 + 28 * k : 50 + 28 * k] = 255
    return out


def _bigger_notch(rgb):
    out = rgb.copy()
    out[80:160, 1150:1260] = (150, 60, 40)  # a tab reaching 60 px outside the rim
    return out


@pytest.mark.parametrize(
    "name, transform, dx, dy",
    [
        (
            "dark",
            lambda im: (
                (im.astype(np.float32) * 0.12 + np.random.default_rng(0).normal(0, 1.5, im.shape))
                .clip(0, 255)
                .astype(np.uint8)
            ),
            0,
            0,
        ),
        ("clipped top and bottom", lambda im: im[250:1300], 0, -250),
        ("clipped at the top only", lambda im: im[400:], 0, -400),
        ("clipped left and right", lambda im: im[:, 120:1250], -120, 0),
        ("small in a wide frame", lambda im: np.pad(im, ((200, 300), (700, 500), (0, 0))), 700, 200),
        ("text in a corner", _with_text, 0, 0),
        ("a bigger notch", _bigger_notch, 0, 0),
    ],
)
def test_field_edge_is_robust(name, transform, dx, dy):
    found = find_field(transform(skimage_data.retina()))
    _assert_circle(found, RETINA_CX + dx, RETINA_CY + dy, RETINA_R, tol=4.0)


def test_clipped_field_is_prepared_like_the_whole_one():
    """The crop is the square around the fitted circle, so a clipped photo lands at the same place and scale."""
    rgb = skimage_data.retina()
    spec = PreprocessSpec(size=128)
    whole, _ = prepare_image(rgb, spec)
    clipped, found = prepare_image(rgb[250:1300], spec)
    assert found
    rows = slice(30, 95)  # the part the clipping kept, away from its edges
    diff = np.abs(whole[rows].astype(int) - clipped[rows].astype(int))
    assert diff.mean() < 3 and clipped[:20].max() == 0  # the cut-off top is black, not stretched fundus


def _flat_disc(size=200, colour=(180, 90, 40), radius=80):
    rgb = np.zeros((size, size, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    rgb[inside] = colour
    return rgb, inside


def test_ben_graham_is_neutral_on_flat_fundus_and_has_no_rim_ring():
    rgb, _ = _flat_disc()
    # A smooth illumination gradient across the field: local-average subtraction removes it.
    gain = np.linspace(0.7, 1.1, rgb.shape[1])[None, :, None]
    rgb = (rgb * gain).astype(np.uint8)
    out, found = prepare_image(rgb, PreprocessSpec(size=96, ben_graham=True))
    assert found
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 47.5, xx - 47.5)
    inside, rim, outside = r < 40, (r > 42) & (r < 46), r > 49
    assert np.abs(out[inside].astype(int) - 128).max() <= 6
    # A plain blur mixes the black surround into the local average and leaves a bright ring here (~+200).
    assert np.abs(out[rim].astype(int) - 128).mean() <= 6
    assert (out[outside] == 128).all()


def test_ben_graham_brings_out_a_small_dark_lesion():
    rgb, _ = _flat_disc()
    rgb[96:104, 96:104] = (90, 30, 15)  # a haemorrhage-sized dark spot
    out, _ = prepare_image(rgb, PreprocessSpec(size=96, ben_graham=True))
    plain, _ = prepare_image(rgb, PreprocessSpec(size=96))
    centre = (slice(46, 50), slice(46, 50))
    assert out[centre].mean() < 60 and out[10:20, 40:56].mean() == pytest.approx(128, abs=2)
    assert plain[centre].mean() > 20  # without the subtraction the spot is only moderately darker


@pytest.mark.parametrize("ben_graham, background", [(False, 0), (True, 128)])
def test_circular_mask(ben_graham, background):
    rgb, _ = _flat_disc(radius=98)
    masked, _ = prepare_image(rgb, PreprocessSpec(size=100, circular_mask=0.8, ben_graham=ben_graham))
    unmasked, _ = prepare_image(rgb, PreprocessSpec(size=100, ben_graham=ben_graham))
    yy, xx = np.mgrid[:100, :100]
    r = np.hypot(yy - 49.5, xx - 49.5)
    assert (masked[r > 41] == background).all()
    assert np.array_equal(masked[r < 39], unmasked[r < 39])


def test_sixteen_bit_and_transparent_images_are_converted(tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((8, 10), 40000, np.uint16)).save(wide)
    rgb, stored = read_image(wide)
    assert stored == (8, 10) and rgb.shape == (8, 10, 3) and int(rgb[0, 0, 0]) == round(40000 / 65535 * 255)
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., :3] = 255  # white where transparent: a naive conversion would make the surround white
    rgba[2:4, 2:4] = (200, 100, 50, 255)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_rgb(path)
    assert out[0, 0].tolist() == [0, 0, 0] and out[2, 2].tolist() == [200, 100, 50]


def test_preprocessing_and_data_checks_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import tlcompile.runtime.preprocess, tlcompile.data.checks, tlcompile.data.sources, tlcompile.data.cache\n"
        "import tlcompile.data.datamodule\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_spec_size_that_is_not_a_whole_number_is_not_valid_rather_than_out_of_range():
    from tlcompile.runtime.preprocess import MAX_INPUT_SIZE

    for size, what in (("a", "is not valid"), (2.5, "is not valid"), (True, "is not valid"), (0, "is out of range")):
        with pytest.raises(DataError, match=f"preprocessing size {size!r} {what}; valid: a whole number of pixels"):
            PreprocessSpec(size=size)
    assert PreprocessSpec(size=MAX_INPUT_SIZE).size == MAX_INPUT_SIZE
