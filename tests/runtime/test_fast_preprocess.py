"""The compiled preprocessing loops (tlcompile/runtime/fast_preprocess.c) give the results of the numpy and Pillow code
they replace, which takes over where they cannot run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tlcompile.runtime import fast_preprocess, preprocess, screen
from tlcompile.runtime.preprocess import PreprocessSpec


@pytest.fixture(scope="module")
def kernel():
    if fast_preprocess._library() is None:
        pytest.skip(f"the preprocessing kernels were not built here: {fast_preprocess.status()}")


def pillow(rgb: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    """What prepare_image did before the kernel: crop_square, then Pillow's resize."""
    return preprocess.resize(preprocess.crop_square(rgb, top, left, side), size)


def test_the_kernel_gives_pillows_bytes_for_random_frames_windows_and_sizes(kernel):
    rng = np.random.default_rng(0)
    checked = 0
    for case in range(1500):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if case % 3 == 0:  # hard black/white edges: every rounding of a tap shows
            frame = (frame > 127).astype(np.uint8) * 255
        side = int(rng.integers(1, 130))
        size = int(rng.integers(1, 130))
        # Windows inside, across the edges of, and wholly outside the frame (crop_square fills black).
        top, left = (int(v) for v in rng.integers(-side - 5, max(h, w) + 5, 2))
        out = fast_preprocess.crop_resize(frame, top, left, side, size)
        if not fast_preprocess.takes(side, size):
            assert out is None
            continue
        assert out is not None and out.shape == (size, size, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, pillow(frame, top, left, side, size), err_msg=str((h, w, top, left, side)))
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("side,size", [(371, 112), (375, 224), (500, 448), (60, 224), (113, 112), (447, 112)])
def test_camera_sized_squares_match_pillow(kernel, side, size):
    """The squares a camera JPEG decoded at 1/8 (or 1/4) gives, up- and downscaled, around the 2x boundary of Pillow's
    reducing step (447 -> 112 is the largest the kernel takes)."""
    rng = np.random.default_rng(side)
    frame = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for top, left in [(0, 0), (2, 64), (-14, 45), (375 - side // 2, 500 - side // 2)]:
        np.testing.assert_array_equal(
            fast_preprocess.crop_resize(frame, top, left, side, size), pillow(frame, top, left, side, size)
        )


def test_sizes_the_kernel_does_not_take_are_left_to_pillow(kernel):
    frame = np.zeros((40, 40, 3), np.uint8)
    assert not fast_preprocess.takes(32, 32)  # no resize: the crop itself
    assert not fast_preprocess.takes(448, 112) and fast_preprocess.takes(447, 112)  # Pillow reduces by 2 first from 448
    assert fast_preprocess.crop_resize(frame, 0, 0, 32, 32) is None
    assert fast_preprocess.crop_resize(frame.astype(np.uint16), 0, 0, 32, 16) is None


def _frames(count: int, seed: int):
    """Random frames of the kinds find_field meets: noise, a bright disc (whole, or clipped by the frame) on a dark
    surround with text and hot pixels, all black, a thin strip; one in 15 large enough to be searched on a strided
    grid (cases 0, 15, 30, 45, ...: each kind among them)."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        h, w = (int(v) for v in rng.integers(1, 160, 2)) if case % 15 else (int(rng.integers(1024, 1300)), 1400)
        kind = case % 4
        if kind == 0:
            yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == 3:
            yield np.zeros((h, w, 3), np.uint8) if case % 8 == 3 else rng.integers(0, 3, (h, w, 3), dtype=np.uint8)
        else:
            yy, xx = np.mgrid[:h, :w]
            r = rng.uniform(0.2, 0.8) * max(h, w)
            disc = (xx - rng.uniform(0, w)) ** 2 + (yy - rng.uniform(0, h)) ** 2 <= r * r
            frame = rng.integers(0, 12, (h, w, 3), dtype=np.uint8)
            frame[disc] = rng.integers(20, 256, (int(disc.sum()), 3), dtype=np.uint8)
            frame[rng.integers(0, h, 5), rng.integers(0, w, 5)] = 255  # hot pixels
            frame[: max(1, h // 20), : max(1, w // 4)] = 200  # burnt-in text in a corner
            yield frame


def test_the_field_search_kernels_give_numpys_luminance_histogram_and_lines(kernel):
    for frame in _frames(300, seed=1):
        h, w = frame.shape[:2]
        step = max(1, min(h, w) // 512)
        small, counts = fast_preprocess.luminance_histogram(frame, step)
        np.testing.assert_array_equal(small, preprocess.luminance(frame[::step, ::step]))
        np.testing.assert_array_equal(counts, preprocess.histogram(small))
        for cut in (0, 5, int(small.max()) // 2, 254, 255):
            row_count, row_first, row_last, col_count, col_first, col_last = fast_preprocess.field_lines(small, cut)
            mask = small > cut
            np.testing.assert_array_equal(row_count, mask.sum(axis=1))
            np.testing.assert_array_equal(col_count, mask.sum(axis=0))
            for counts_, first, last, lines in ((row_count, row_first, row_last, mask), (col_count, col_first,
                                                                                       col_last, mask.T)):  # fmt: skip
                some = counts_ > 0
                np.testing.assert_array_equal(first[some], lines[some].argmax(axis=1))
                np.testing.assert_array_equal(last[some], lines.shape[1] - 1 - lines[some][:, ::-1].argmax(axis=1))
                assert (first[~some] == -1).all() and (last[~some] == -1).all()


@pytest.mark.parametrize("version", [2, 3])
def test_find_field_is_the_same_float_for_float_with_the_kernels_and_without(kernel, version, monkeypatch):
    frames = list(_frames(120, seed=2))
    with_kernels = [preprocess.find_field(f, 0.12, version) for f in frames]
    monkeypatch.setenv("TLCOMPILE_FAST_PREPROCESS", "0")
    without = [preprocess.find_field(f, 0.12, version) for f in frames]
    assert with_kernels == without  # dataclass equality: every float the same
    assert sum(f is not None and f.fitted for f in with_kernels) >= 20  # the fit itself was reached, not only None


def test_the_fundus_check_kernels_give_numpys_counts_histograms_and_sums(kernel):
    rng = np.random.default_rng(3)
    for frame in _frames(200, seed=4):
        h, w = frame.shape[:2]
        small, step = screen._grid(frame)
        hs, ws = small.shape[:2]
        if min(hs, ws) > 16:  # damage_reason's repeat count (a flat block pasted in so that some pixels repeat)
            frame[: h // 2, : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            small = frame[::step, ::step]
            p = screen.REPEAT_PERIOD
            centre = small[: hs - p, : ws - p]
            repeated = (
                (centre == small[: hs - p, p:]).all(axis=2)
                & (centre == small[p:, : ws - p]).all(axis=2)
                & (small.max(axis=2)[: hs - p, : ws - p] >= 30)
            )
            assert fast_preprocess.repeated_count(frame, step, p, 30) == np.count_nonzero(repeated)
        # not_fundus_reason's statistics, for circles anywhere (some through the exact-hypot band: a radius whose
        # square is a grid pixel's squared distance)
        cx, cy = rng.uniform(-0.2, 1.2) * w, rng.uniform(-0.2, 1.2) * h
        radius = float(np.hypot(round(cx / step) * step - cx + 3 * step, round(cy / step) * step - cy))
        for r_in, r_out in ((0.95 * radius, 1.05 * radius), (radius, radius * 1.0000000001)):
            n_in, n_out, lum_in, lum_out, sums = fast_preprocess.field_statistics(frame, step, cx, cy, r_in, r_out)
            yy, xx = np.ogrid[:hs, :ws]
            dx, dy = xx * step - cx, yy * step - cy
            d2 = dy * dy + dx * dx
            inside = screen._within(d2, dx, dy, r_in, inner=True)
            outside = screen._within(d2, dx, dy, r_out, inner=False)
            lum = small.max(axis=2)
            assert (n_in, n_out) == (np.count_nonzero(inside), np.count_nonzero(outside))
            np.testing.assert_array_equal(lum_in, np.bincount(lum[inside], minlength=256))
            np.testing.assert_array_equal(lum_out, np.bincount(lum[outside], minlength=256))
            assert sums == small[inside].astype(np.int64).sum(axis=0).tolist()


def test_the_fundus_checks_decide_the_same_with_the_kernels_and_without(kernel, monkeypatch):
    frames = list(_frames(120, seed=5))
    fields = [preprocess.find_field(f) for f in frames]
    rng = np.random.default_rng(6)
    for frame in frames[::4]:  # JPEG-like damage: a repeated block over part of the frame
        h, w = frame.shape[:2]
        frame[h // 3 :, : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)

    def decisions():
        pairs = zip(frames, fields, strict=True)
        return [(screen.damage_reason(f), screen.not_fundus_reason(f, found)) for f, found in pairs]

    with_kernels = decisions()
    monkeypatch.setenv("TLCOMPILE_FAST_PREPROCESS", "0")
    assert with_kernels == decisions()
    assert any(d for d, _ in with_kernels) and any(n for _, n in with_kernels)  # both checks fired somewhere


def _retina_frame() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    rgb = skdata.retina()
    frame = np.zeros((375, 500, 3), np.uint8)
    frame[:, 62:437] = np.asarray(Image.fromarray(rgb).resize((375, 375), Image.BICUBIC))
    return frame


SPECS = (
    PreprocessSpec(size=112),
    PreprocessSpec(size=224),
    PreprocessSpec(size=64, crop_fov=False),
    PreprocessSpec(size=96, ben_graham=True, circular_mask=0.9),
)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.size}px")
def test_prepare_image_is_the_same_with_the_kernel_and_with_pillow(kernel, spec, monkeypatch):
    frame = _retina_frame()
    with_kernel, field = preprocess.prepare_with_field(frame, spec)
    monkeypatch.setenv("TLCOMPILE_FAST_PREPROCESS", "0")
    assert fast_preprocess.status() == "numpy and Pillow (TLCOMPILE_FAST_PREPROCESS=0)"
    with_pillow, field_pillow = preprocess.prepare_with_field(frame, spec)
    np.testing.assert_array_equal(with_kernel, with_pillow)
    assert field == field_pillow


def test_without_a_c_compiler_pillow_resizes_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for key, value in {"tried": False, "value": None, "error": None}.items():
        monkeypatch.setattr(fast_preprocess.LIBRARY, key, value)
    frame = _retina_frame()
    assert fast_preprocess.crop_resize(frame, 0, 62, 375, 112) is None
    assert fast_preprocess.status().startswith("numpy and Pillow (") and "no-such-cc" in fast_preprocess.status()
    out, found = preprocess.prepare_image(frame, PreprocessSpec(size=112))
    assert found and out.shape == (112, 112, 3)
    assert not list((tmp_path / "cache").rglob("*.so*"))  # no half-built library left behind
