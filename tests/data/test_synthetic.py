"""Tests for the synthetic fundus generator (tlcompile.data.synthetic): numbers and behaviour, small images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tlcompile.data import synthetic
from tlcompile.data.synthetic import (
    DEFAULT_DIFFICULTY,
    DEFAULT_GRADE_PROBS,
    FUNDUS_STYLES,
    GRADE_NAMES,
    generate,
    preview_grid,
    render_fundus,
    sample_grades,
    write_aptos,
)
from tlcompile.errors import DataError


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def test_constants_are_consistent():
    assert len(GRADE_NAMES) == 5 and GRADE_NAMES[0] == "no DR" and GRADE_NAMES[4] == "proliferative"
    assert len(DEFAULT_GRADE_PROBS) == 5 and sum(DEFAULT_GRADE_PROBS) == pytest.approx(1.0)
    assert sum(DEFAULT_GRADE_PROBS[2:]) == pytest.approx(0.41)  # referable prevalence, APTOS-like
    assert 0.0 <= DEFAULT_DIFFICULTY <= 1.0
    assert {"default", "camera_b"} <= set(FUNDUS_STYLES)
    for name, style in FUNDUS_STYLES.items():
        assert style.name == name
        with pytest.raises(AttributeError):  # frozen: a style cannot be changed by a caller
            style.vignetting = 0.0  # type: ignore[misc]


def test_generate_shapes_and_dtypes():
    images, grades = generate(6, seed=3, size=40)
    assert images.shape == (6, 40, 40, 3) and images.dtype == np.uint8
    assert grades.shape == (6,) and grades.dtype == np.int64
    assert set(grades.tolist()) <= {0, 1, 2, 3, 4}
    one = render_fundus(2, _rng(0), size=33)
    assert one.shape == (33, 33, 3) and one.dtype == np.uint8


def test_same_seed_gives_identical_bytes_and_image_i_does_not_depend_on_n():
    a, ga = generate(5, seed=11, size=48)
    b, gb = generate(5, seed=11, size=48)
    assert a.tobytes() == b.tobytes() and np.array_equal(ga, gb)
    c, gc = generate(9, seed=11, size=48)
    assert c[:5].tobytes() == a.tobytes() and np.array_equal(gc[:5], ga)
    first, g1 = generate(1, seed=11, size=48)
    assert first[0].tobytes() == a[0].tobytes() and g1[0] == ga[0]


def test_different_seeds_differ():
    a, _ = generate(3, seed=1, size=48)
    b, _ = generate(3, seed=2, size=48)
    for x, y in zip(a, b, strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).mean() > 2.0


@pytest.mark.parametrize("style", sorted(FUNDUS_STYLES))
def test_field_of_view_is_bright_in_the_centre_and_black_in_the_corners(style):
    for grade in range(5):
        img = render_fundus(grade, _rng(5, grade), size=64, style=style).astype(np.float64)
        corners = np.concatenate([img[:4, :4], img[:4, -4:], img[-4:, :4], img[-4:, -4:]]).reshape(-1, 3)
        centre = img[24:40, 24:40].reshape(-1, 3)
        assert corners.max() <= 3, (grade, style)
        assert centre.mean() > 40 and centre[:, 0].mean() > 70  # a lit, reddish fundus
        assert (img.sum(axis=2) > 30).mean() > 0.4  # the field covers a good part of the frame


def test_grades_follow_grade_probs():
    probs = (0.1, 0.2, 0.3, 0.25, 0.15)
    # sample_grades gives generate's grades without rendering: checked here on the first 300
    _, grades = generate(300, seed=0, size=32, grade_probs=probs)
    all_grades = sample_grades(2000, seed=0, grade_probs=probs)
    assert np.array_equal(all_grades[:300], grades)
    freq = np.bincount(all_grades, minlength=5) / len(all_grades)
    # 2000 draws: binomial sd <= 0.011; 0.035 is > 3 sd
    np.testing.assert_allclose(freq, probs, atol=0.035)
    default = np.bincount(sample_grades(2000, seed=1), minlength=5) / 2000
    np.testing.assert_allclose(default, DEFAULT_GRADE_PROBS, atol=0.035)
    assert set(sample_grades(200, seed=1, grade_probs=(1.0, 0.0, 0.0, 0.0, 0.0)).tolist()) == {0}


def _red_lesion_fraction(img: np.ndarray) -> float:
    """Fraction of field pixels in dark-red blobs: pixels whose green is well below their 9-px median
    neighbourhood (haemorrhages, microaneurysms, vessels), kept only where a 3x3 opening survives, which
    removes the 1-2 px wide vessels and leaves blob-like lesions."""
    field = img.astype(np.int32).sum(axis=2) > 60
    green = Image.fromarray(img[..., 1])
    local = np.asarray(green.filter(ImageFilter.MedianFilter(9)), np.float64)
    dark = np.asarray(green, np.float64) < 0.8 * local
    mask = Image.fromarray((dark & field).astype(np.uint8) * 255)
    opened = np.asarray(mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))) > 0
    return float(opened.sum() / max(field.sum(), 1))


def test_higher_grades_have_more_red_lesion_pixels():
    frac = {
        g: np.mean([_red_lesion_fraction(render_fundus(g, _rng(9, g, j), size=128, difficulty=0.3)) for j in range(8)])
        for g in (0, 2, 3)
    }
    assert frac[2] > 2 * frac[0] and frac[3] > 2 * frac[2], frac


def test_difficulty_lowers_lesion_contrast():
    easy = [_red_lesion_fraction(render_fundus(3, _rng(4, j), size=128, difficulty=0.0)) for j in range(4)]
    hard = [_red_lesion_fraction(render_fundus(3, _rng(4, j), size=128, difficulty=1.0)) for j in range(4)]
    assert np.mean(easy) > np.mean(hard)


def test_styles_differ_in_mean_colour():
    means = {}
    for style in ("default", "camera_b"):
        images, _ = generate(12, seed=2, size=48, style=style)
        field = images.sum(axis=3) > 60
        means[style] = images[field].mean(axis=0)
    d, b = means["default"], means["camera_b"]
    assert np.abs(d - b).max() > 15, means
    assert d[1] / d[0] < b[1] / b[0]  # camera_b is greener/yellower relative to red


def test_write_aptos_writes_csv_and_pngs_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "aptos"
    csv_path = write_aptos(out, 5, seed=7, size=40)
    assert csv_path == out / "train.csv"
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id_code", "diagnosis"] and len(rows) == 6
    ids = [r[0] for r in rows[1:]]
    assert len(set(ids)) == 5
    images, grades = generate(5, seed=7, size=40)
    for i, (id_code, diagnosis) in enumerate(rows[1:]):
        png = out / "train_images" / f"{id_code}.png"
        with Image.open(png) as im:
            assert im.size == (40, 40) and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), images[i])  # the same images generate() returns
        assert int(diagnosis) == grades[i]
    with pytest.raises(DataError, match="train.csv"):
        write_aptos(out, 2, seed=7, size=40)
    assert len(list(csv.reader(open(csv_path)))) == 6  # untouched
    write_aptos(out, 2, seed=8, size=40, overwrite=True)
    assert len(list(csv.reader(open(csv_path)))) == 3


def test_preview_grid_has_a_row_per_grade_and_the_real_image(tmp_path):
    real = np.zeros((50, 70, 3), np.uint8)
    real[..., 0] = 200
    path = preview_grid(tmp_path / "sub" / "p.png", size=32, per_grade=2, real_image=real)
    with Image.open(path) as im:
        w, h = im.size
        assert h >= 6 * 32 and w >= 2 * 32
    plain = preview_grid(tmp_path / "q.png", size=32, per_grade=2)
    with Image.open(plain) as im:
        assert 5 * 32 <= im.size[1] < 6 * 32


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: generate(0, seed=0), "n"),
        (lambda: generate(2, seed=0, size=16), "size"),
        (lambda: generate(2, seed=0, difficulty=1.5), "difficulty"),
        (lambda: generate(2, seed=0, difficulty=float("nan")), "difficulty"),
        (lambda: generate(2, seed=0, grade_probs=(0.5, 0.5)), "grade_probs"),
        (lambda: generate(2, seed=0, grade_probs=(0.5, 0.5, 0.5, 0.0, 0.0)), "grade_probs"),
        (lambda: generate(2, seed=0, grade_probs=(1.2, -0.2, 0.0, 0.0, 0.0)), "grade_probs"),
        (lambda: generate(2, seed=-1), "seed"),
        (lambda: sample_grades(0, seed=0), "n"),
        (lambda: render_fundus(5, np.random.default_rng(0)), "grade"),
        (lambda: render_fundus(1, 42), "rng"),
        (lambda: write_aptos("/nonexistent-never", 0, seed=0), "n"),
        (lambda: preview_grid("x.png", per_grade=0), "per_grade"),
    ],
)
def test_bad_arguments_raise_data_error_naming_the_argument(call, name):
    with pytest.raises(DataError) as info:
        call()
    assert name in str(info.value)


def test_unknown_style_names_the_value_and_the_valid_styles():
    with pytest.raises(DataError) as info:
        generate(1, seed=0, size=32, style="fancy_cam")
    msg = str(info.value)
    assert "fancy_cam" in msg and "default" in msg and "camera_b" in msg


def test_runs_without_torch(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    module = importlib.reload(synthetic)
    images, _ = module.generate(1, seed=0, size=32)
    assert images.shape == (1, 32, 32, 3)
