"""Degraded copies for the image-quality gate (tlcompile.data.degrade): deterministic, labelled per kind and level,
both sides of the gradable line present, and the photos they are drawn from are the generator's, unchanged."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tlcompile.data import synthetic
from tlcompile.data.degrade import (
    KINDS,
    LEVELS,
    degrade,
    degraded_copies,
    gradable_label,
    stream_copies,
    write_degraded,
)
from tlcompile.errors import DataError


@pytest.fixture(scope="module")
def photos():
    return list(synthetic.generate(4, seed=3, size=128)[0])


def test_every_kind_has_gradable_and_ungradable_levels():
    for kind in KINDS:
        labels = {ok for _, ok in LEVELS[kind]}
        assert labels == {True, False}, kind  # the gate is tested on both sides of every kind
    # the mild levels the issue names are gradable: slight blur, slight under-exposure
    assert gradable_label("blur", 0.005) and gradable_label("dark", 0.75)
    assert not gradable_label("blur", 0.025) and not gradable_label("dark", 0.2)
    with pytest.raises(DataError, match="not one of blur's levels"):
        gradable_label("blur", 0.01)


def test_copies_are_deterministic_and_leave_the_photos_alone(photos):
    before = [p.copy() for p in photos]
    a = degraded_copies(photos, seed=5, per_image=3)
    b = degraded_copies(photos, seed=5, per_image=3)
    assert len(a) == 4 + 12 and [c.kind for c in a[:4]] == ["none"] * 4
    assert all(
        np.array_equal(x.image, y.image) and (x.kind, x.level) == (y.kind, y.level) for x, y in zip(a, b, strict=True)
    )
    assert all(np.array_equal(p, q) for p, q in zip(photos, before, strict=True))
    assert all(c.gradable == gradable_label(c.kind, c.level) for c in a[4:])
    c = degraded_copies(photos, seed=6, per_image=3)
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a[4:], c[4:], strict=True))


def test_degradations_do_what_they_say(photos):
    photo = photos[0]
    lum = photo.max(axis=2).astype(float)
    field = lum > 20
    rng = np.random.default_rng(0)
    dark = degrade(photo, "dark", 0.2, rng).max(axis=2).astype(float)
    assert np.median(dark[field]) < 0.3 * np.median(lum[field])
    hidden = degrade(photo, "partial", 0.5, rng).max(axis=2)
    assert 0.4 < np.mean(hidden[field] < 8) < 0.6
    assert (degrade(photo, "overexposed", 3.0, rng)[:, :, 1][field] >= 200).mean() > 0.5
    assert (degrade(photo, "blur", 0.04, rng)[lum < 8] == 0).all()  # the black surround stays black
    with pytest.raises(DataError, match="valid: blur"):
        degrade(photo, "fog", 1.0, rng)
    with pytest.raises(DataError, match="no field of view"):
        degrade(np.zeros((64, 64, 3), np.uint8), "blur", 0.04, rng)


def test_the_quality_stage_redraws_the_generators_photos_bit_for_bit():
    """The quality stage re-draws val/test photos from the generator's documented per-image generators: they must be
    the very photos the data stage generated (the training data and checkpoints never change)."""
    from tlcompile.build.stages.quality import split_indices
    from tlcompile.data.datamodule import load_data
    from tlcompile.recipe import validate_recipe_dict

    recipe = validate_recipe_dict(
        {"seed": 4, "data": {"source": "synthetic", "num_images": 30, "image_size": 32, "split": {"val": 0.2}}}
    )
    data = load_data(recipe.data, seed=recipe.seed)
    idx = split_indices(data, recipe, "val")
    redrawn = [data.photo(int(i)) for i in idx]
    raw, grades = synthetic.generate(30, seed=4, size=40)
    assert len(idx) == len(redrawn) > 0
    assert all(np.array_equal(raw[i], p) for i, p in zip(idx, redrawn, strict=True))
    assert np.array_equal(grades, data.grades)


def test_synth_degrade_writes_copies_with_a_gradable_column(tmp_path):
    out = tmp_path / "syn"
    synthetic.write_aptos(out, 3, seed=0, size=96)
    path = write_degraded(out, seed=0, per_image=2)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 3 + 6 and {r["kind"] for r in rows[:3]} == {"none"}
    for r in rows[3:]:
        assert (out / "degraded_images" / f"{r['id_code']}.png").is_file()
        assert r["gradable"] == str(int(gradable_label(r["kind"], float(r["level"]))))
    with pytest.raises(DataError, match="never replaced"):
        write_degraded(out, seed=0, per_image=2)


def test_a_photo_without_a_field_does_not_collapse_the_plan(photos):
    """A black frame among the photos gets only its 'none' entry; the copies planned for it are drawn from another
    photo, so every kind still appears (the old fallback gave every photo the same first kind: all mild blur)."""
    black = np.zeros_like(photos[0])
    mixed = [photos[0], black, *photos[1:]]
    copies = degraded_copies(mixed, seed=2, per_image=5)
    drawn = [c for c in copies if c.kind != "none"]
    assert len(drawn) == 5 * 5  # every planned copy drawn, none of them from the black frame
    assert all(c.index != 1 for c in drawn)
    assert {c.kind for c in drawn} == set(KINDS)
    assert {c.gradable for c in drawn} == {True, False}
    # the photos with a field keep the copies they would have had anyway (same kind, level and image)
    alone = [c for c in degraded_copies(mixed[:1], seed=2, per_image=5) if c.kind != "none"]
    assert alone and all(c.index == 0 for c in alone)


def test_streaming_holds_one_photo_and_gives_the_in_memory_copies(photos):
    loaded = []

    def load(i):
        loaded.append(i)
        return photos[i]

    streamed = list(stream_copies(len(photos), load, seed=5, per_image=3))
    assert loaded == list(range(len(photos)))  # each photo read once, in order
    listed = degraded_copies(photos, seed=5, per_image=3)
    key = lambda c: (c.index, c.kind, c.level, c.image.tobytes())  # noqa: E731
    assert sorted(map(key, streamed)) == sorted(map(key, listed))


def test_synth_degrade_streams_and_never_leaves_partial_files(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    synthetic.write_aptos(out, 3, seed=0, size=96)
    written = []
    from tlcompile.data import degrade as degrade_module

    real = degrade_module.atomic_write_with

    def spy(path, writer):
        written.append(path.name)
        return real(path, writer)

    monkeypatch.setattr(degrade_module, "atomic_write_with", spy)
    write_degraded(out, seed=0, per_image=2)
    assert len(written) == 6 and not list((out / "degraded_images").glob(".*.tmp"))
