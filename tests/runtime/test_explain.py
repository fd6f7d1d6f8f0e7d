"""Heatmaps a grader can check (runtime/explain.py): the peak lands on the lesion a stub model reads, the pointing
game's arithmetic, the overlay PNG's writing rules, and ``predict --explain`` / ``serve --explain`` on a bundle."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlcompile.data import synthetic
from tlcompile.errors import TlcompileError
from tlcompile.runtime import explain
from tlcompile.runtime.predict import EARLIER_CSV_COLUMNS, check_csv_target
from tlcompile.runtime.preprocess import PreprocessSpec, luminance, prepare_with_field, to_input

SIZE = 48
SPEC = PreprocessSpec(size=SIZE)
LESION = (12, 33)  # row, column of the painted lesion in the network input


@dataclass
class RegionSession:
    """A stand-in InferenceSession whose P(referable) rises with how dark one small region is: the lesion it "sees".
    Everything else in the picture is irrelevant to it."""

    runtime: str = "stub"
    threads: int = 1
    exec_precision: str = "f32"
    calls: int = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        r, c = LESION
        patch = x[:, :, r - 2 : r + 3, c - 2 : c + 3].mean(axis=(1, 2, 3))
        return np.stack([np.zeros_like(patch), -3.0 * patch], axis=1).astype(np.float32)


def _fundus_with_lesion() -> tuple[np.ndarray, np.ndarray]:
    """A plain orange field on black with one dark red dot at LESION; and the lesion's mask."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    field = (yy - 23.5) ** 2 + (xx - 23.5) ** 2 <= 23**2
    img[field] = (210, 90, 60)
    dot = (yy - LESION[0]) ** 2 + (xx - LESION[1]) ** 2 <= 2**2
    img[dot] = (110, 15, 12)
    return img, dot


@pytest.mark.parametrize("method", explain.METHODS)
def test_heatmap_peaks_on_the_lesion_the_model_reads(method):
    img, dot = _fundus_with_lesion()
    x = to_input(img, SPEC)
    session = RegionSession()
    e = explain.explain_input(session, x, SPEC, method=method, batch=32)
    assert e.heat.shape == (SIZE, SIZE)
    r, c = e.peak
    assert abs(r - LESION[0]) <= 4 and abs(c - LESION[1]) <= 4, (e.peak, method)
    case = explain.pointing_case(e.heat, dot.astype(np.float32), e.field, explain.tolerance_px(SIZE))
    assert case is not None and case.hit
    assert 0 < case.chance < 0.1  # one small dot in a large field: a random peak rarely hits it
    assert session.calls > 1  # batched: not one call per patch
    assert np.array_equal(e.crop, img)  # the picture shown is the one the model saw


def test_pointing_game_on_a_constructed_case():
    field = np.ones((20, 20), bool)
    lesions = np.zeros((20, 20), np.float32)
    lesions[10, 10] = 1.0
    heat = np.zeros((20, 20), np.float32)
    heat[11, 10] = 5.0  # one pixel off the lesion: inside a tolerance of 1
    hit = explain.pointing_case(heat, lesions, field, 1.0)
    assert hit == explain.PointingCase(hit=True, centre_hit=True, chance=5 / 400)  # the lesion and its 4 neighbours
    heat2 = np.zeros((20, 20), np.float32)
    heat2[2, 3] = 1.0
    miss = explain.pointing_case(heat2, lesions, field, 1.0)
    assert miss is not None and not miss.hit
    # a lesion too faint to count, or outside the field, gives no case
    assert explain.pointing_case(heat, lesions * 0.1, field, 1.0) is None
    game = explain.pointing_game([hit, miss, hit, hit], tolerance=1.0, size=20)
    assert game["n"] == 4 and game["hit_rate"]["k"] == 3 and game["hit_rate"]["value"] == 0.75
    lo, hi = game["hit_rate"]["ci"]
    assert 0.2 < lo < 0.75 < hi <= 1.0  # Wilson
    assert game["chance"]["value"] == pytest.approx(5 / 400) and game["centre"]["value"] == 1.0


def test_peak_is_looked_for_inside_the_field_only():
    heat = np.zeros((10, 10), np.float32)
    heat[0, 0] = 9.0  # the black corner
    heat[5, 5] = 1.0
    field = np.zeros((10, 10), bool)
    field[2:8, 2:8] = True
    assert explain.peak(heat, field) == (5, 5)


def test_lesions_map_into_the_network_frame_like_the_photo():
    """to_network_frame carries a per-pixel map exactly as prepare_image carries the photo: the luminance of the
    photo, carried over, is the luminance of the prepared input (up to resampling)."""
    raw, _, lesions = synthetic.draw_with_lesions(1, seed=0, size=70)
    spec = PreprocessSpec(size=56)
    crop, found = prepare_with_field(raw, spec)
    assert found is not None
    carried = explain.to_network_frame(luminance(raw).astype(np.float32), raw, spec)
    assert np.abs(carried - luminance(crop)).mean() < 2.0
    assert explain.to_network_frame(lesions, raw, spec).max() > explain.LESION_LEVEL


def test_overlay_written_atomically_never_over_a_foreign_file(tmp_path):
    img, _ = _fundus_with_lesion()
    heat = np.zeros((SIZE, SIZE), np.float32)
    heat[LESION] = 1.0
    picture = explain.overlay(img, heat, np.ones((SIZE, SIZE), bool), caption="refer")
    target = tmp_path / "a.explain.png"
    explain.write_overlay(picture, target, source="cam/a.png")
    assert explain.is_ours(target) and Image.open(target).size[0] == 2 * 2 * SIZE + 4
    assert [p.name for p in tmp_path.iterdir()] == ["a.explain.png"]  # no temporary left behind
    explain.write_overlay(picture, target, source="cam/a.png")  # ours: a rerun replaces it
    foreign = tmp_path / "b.explain.png"
    Image.fromarray(img).save(foreign)
    before = foreign.read_bytes()
    with pytest.raises(TlcompileError, match="is never overwritten"):
        explain.write_overlay(picture, foreign, source="cam/b.png")
    assert foreign.read_bytes() == before


def test_explain_targets_same_stem_two_folders_and_refusals(tmp_path):
    out = explain.check_explain_dir(tmp_path / "ex")
    a, b = tmp_path / "left" / "eye.png", tmp_path / "right" / "eye.jpg"
    a.parent.mkdir()
    b.parent.mkdir()
    targets = explain.explain_targets([a, b], out)
    assert targets[a].name == "eye.explain.png"
    assert targets[b].name.startswith("eye.") and targets[b].name.endswith(".explain.png") and targets[b] != targets[a]
    (out / "eye.explain.png").write_text("a grader's notes")
    with pytest.raises(TlcompileError, match="never overwritten"):
        explain.explain_targets([a], out)
    with pytest.raises(TlcompileError, match="is a file"):
        explain.check_explain_dir(out / "eye.explain.png")
    with pytest.raises(TlcompileError, match="is a folder of input images"):
        explain.check_explain_dir(tmp_path / "left", inputs=[tmp_path / "right", tmp_path / "left"])
    with pytest.raises(TlcompileError, match="inside the bundle"):
        explain.check_explain_dir(tmp_path / "bundle" / "ex", bundle_root=tmp_path / "bundle")


def test_an_explain_folder_this_user_cannot_write_is_refused_before_anything_is_decided(tmp_path, monkeypatch):
    """A read-only folder (or mount) got every image decided and every heatmap computed, then 'wrote 0 heatmaps'
    and exit 0. (os.access is stubbed: as root, permission bits do not stop a write.)"""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))
    with pytest.raises(TlcompileError, match=r"^--explain '.*ro': no permission to write into it; give a folder"):
        explain.check_explain_dir(folder)


def test_a_heatmap_of_another_image_under_the_same_name_is_kept_not_replaced(tmp_path):
    """Monday's run over camA/ wrote IMG_0001.explain.png (its CSV names it); Tuesday's run over camB/ replaced it
    with camB/IMG_0001.jpg's heatmap, another patient's. Now Tuesday's gets a hashed name; each image's own heatmap
    is still replaced by its own rerun, whatever the order of the inputs."""
    out = explain.check_explain_dir(tmp_path / "heat")
    monday, tuesday = tmp_path / "camA" / "IMG_0001.jpg", tmp_path / "camB" / "IMG_0001.jpg"
    picture = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    explain.write_overlay(picture, explain.explain_targets([monday], out)[monday], source=str(monday))
    kept = (out / "IMG_0001.explain.png").read_bytes()
    target = explain.explain_targets([tuesday], out)[tuesday]
    assert target.name != "IMG_0001.explain.png" and target.name.endswith(".explain.png")
    explain.write_overlay(picture, target, source=str(tuesday))
    assert (out / "IMG_0001.explain.png").read_bytes() == kept
    both = explain.explain_targets([tuesday, monday], out)  # the other order: each keeps its own file
    assert both == {monday: out / "IMG_0001.explain.png", tuesday: target}


def test_a_heatmap_is_marked_with_its_images_full_path_so_relative_runs_from_two_folders_differ(
    tmp_path, monkeypatch, bundle_copy, fundus_images, run_cli
):
    """Monday 'cd camA; predict B IMG_0001.png --explain ../heat', Tuesday the same from camB: the mark said
    'IMG_0001.png' both times, and Tuesday's heatmap replaced Monday's (the review's case)."""
    for folder in ("camA", "camB"):
        (photo,) = fundus_images(tmp_path / folder, 1, seed={"camA": 1, "camB": 2}[folder])
        photo.rename(tmp_path / folder / "IMG_0001.png")
    heat = tmp_path / "heat"
    monkeypatch.chdir(tmp_path / "camA")
    assert run_cli("predict", str(bundle_copy), "IMG_0001.png", "--explain", str(heat)).returncode == 0
    assert explain.mark_of(heat / "IMG_0001.explain.png") == str(tmp_path / "camA" / "IMG_0001.png")
    monday = (heat / "IMG_0001.explain.png").read_bytes()
    monkeypatch.chdir(tmp_path / "camB")
    assert run_cli("predict", str(bundle_copy), "IMG_0001.png", "--explain", str(heat)).returncode == 0
    assert (heat / "IMG_0001.explain.png").read_bytes() == monday and len(list(heat.iterdir())) == 2


def test_csv_of_the_previous_version_is_still_ours(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text(",".join(EARLIER_CSV_COLUMNS[0]) + "\n")
    assert check_csv_target(old) == old


def test_predict_explain_without_torch(bundle_copy, tmp_path, fundus_images, run_cli):
    """predict --explain on a box without the [train] extras: a PNG per gradable image, named in the CSV; none for an
    ungradable frame; a rerun replaces its own PNGs; a foreign file in the way stops it before anything is decided."""
    folder = tmp_path / "camera"
    good = fundus_images(folder, 2)  # two are enough here
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(folder / "lens_cap.png")
    out_csv, ex = tmp_path / "out.csv", tmp_path / "heatmaps"
    args = ("predict", str(bundle_copy), str(folder), "--csv", str(out_csv), "--explain", str(ex))
    cli = run_cli(*args, block_train_modules=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.endswith("ATTEMPTED:\n"), cli.stdout  # torch & co. were not even tried
    assert "wrote 2 heatmaps" in cli.stdout
    rows = {row["file"]: row for row in csv.DictReader(out_csv.open())}
    for path in good:
        name = rows[str(path)]["explanation"]
        assert name == f"{path.stem}.explain.png" and explain.is_ours(ex / name)
    assert rows[str(folder / "lens_cap.png")]["explanation"] == ""
    assert sorted(p.name for p in ex.iterdir()) == sorted(f"{p.stem}.explain.png" for p in good)

    assert run_cli(*args).returncode == 0  # a rerun replaces its own heatmaps
    (ex / f"{good[0].stem}.explain.png").unlink()
    (ex / f"{good[0].stem}.explain.png").write_text("not ours")
    refused = run_cli(*args)
    assert refused.returncode != 0 and "never overwritten" in refused.stderr and "Traceback" not in refused.stderr
    assert (ex / f"{good[0].stem}.explain.png").read_text() == "not ours"


def test_serve_explain_writes_beside_the_record(bundle_copy, tmp_path, fundus_images, run_cli):
    """serve --explain (the CLI, without the [train] extras): a PNG beside each gradable image's record, named in it;
    an ungradable frame's record says none."""
    watch, out = tmp_path / "watch", tmp_path / "out"
    good = fundus_images(watch, 2)
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(watch / "lens_cap.png")
    args = ("serve", str(bundle_copy), "--watch", str(watch), "--out", str(out), "--once", "--settle", "0")
    cli = run_cli(*args, "--explain", block_train_modules=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.endswith("ATTEMPTED:\n"), cli.stdout
    for path in good:
        record = json.loads((out / f"{path.name}.json").read_text())
        assert record["explanation"] == f"{path.name}.explain.png" and explain.is_ours(out / record["explanation"])
    assert json.loads((out / "lens_cap.png.json").read_text())["explanation"] is None
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.name}.explain.png" for p in good)


def test_serve_explain_redo_and_same_name_new_content(tiny_build, tmp_path, fundus_images, few_rise_masks):
    """A redo after a crash (heatmap written, record not) replaces its own heatmap; a new photo under an old name gets
    its own heatmap beside its own record, the earlier one untouched."""
    import shutil

    from tlcompile.runtime.serve import serve

    watch, out = tmp_path / "watch", tmp_path / "out"
    first, second = fundus_images(tmp_path / "camera", 2)
    watch.mkdir()
    shutil.copy(first, watch / "eye.png")

    def run():
        serve(tiny_build.bundle, watch, out, once=True, settle=0, log=lambda _: None, explain=True)
        return sorted(p.name for p in out.glob("*.png"))

    assert run() == ["eye.png.explain.png"]
    (out / "eye.png.json").unlink()  # killed after the heatmap, before the record
    assert run() == ["eye.png.explain.png"]
    assert json.loads((out / "eye.png.json").read_text())["explanation"] == "eye.png.explain.png"
    before = (out / "eye.png.explain.png").read_bytes()
    (watch / "eye.png").unlink()
    shutil.copy(second, watch / "eye.png")  # the camera reuses the name for another photo
    pngs = run()
    assert len(pngs) == 2 and (out / "eye.png.explain.png").read_bytes() == before
    newer = [json.loads(p.read_text()) for p in out.glob("eye.png.*.json")]
    assert len(newer) == 1 and newer[0]["explanation"] in pngs and newer[0]["explanation"] != "eye.png.explain.png"


def test_predict_keeps_every_decision_when_a_heatmap_cannot_be_written(
    bundle_copy, tmp_path, fundus_images, monkeypatch, few_rise_masks
):
    """A heatmap that fails at write time (a file that appeared after the up-front check, a full disk) costs that
    heatmap only: every image is decided, the CSV is written with an empty explanation for it, and one warning line
    names the image."""
    import errno

    from typer.testing import CliRunner

    from tlcompile.cli import app

    folder = tmp_path / "camera"
    good = fundus_images(folder, 3)
    out_csv, ex = tmp_path / "out.csv", tmp_path / "heatmaps"
    write = explain.write_overlay

    def flaky(image, path, *, source):
        if path.name.startswith(good[0].stem):  # a grader saved notes under this name after predict checked it
            path.write_text("a grader's notes")
        elif path.name.startswith(good[1].stem):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(image, path, source=source)

    monkeypatch.setattr(explain, "write_overlay", flaky)
    args = ["predict", str(bundle_copy), str(folder), "--csv", str(out_csv), "--explain", str(ex)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # an output asked for is missing (as with unsent FHIR bundles)
    rows = {row["file"]: row for row in csv.DictReader(out_csv.open())}
    assert [rows[str(p)]["referral"] in ("refer", "no referral") for p in good] == [True] * 3
    assert [rows[str(p)]["explanation"] for p in good] == ["", "", f"{good[2].stem}.explain.png"]
    assert (ex / f"{good[0].stem}.explain.png").read_text() == "a grader's notes"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "never overwritten" in warnings[0] and str(good[0]) in warnings[0]
    assert str(good[1]) in warnings[1] and "No space left" in warnings[1]
    assert "error: 2 heatmaps could not be written (see above); every decision stands" in result.stderr
    assert "wrote 1 heatmap into" in result.stdout and "Traceback" not in result.output


def test_long_input_stem_gets_a_short_unique_heatmap_name(tmp_path):
    """A 250-character file name (the limit is 255 bytes) gives a heatmap name that fits with our suffix and the
    temporary name, the same on every run, distinct from another long name with the same beginning."""
    out = explain.check_explain_dir(tmp_path / "ex")
    a = tmp_path / ("a" * 246 + ".png")
    b = tmp_path / ("a" * 245 + "b.png")
    short = tmp_path / "eye.png"
    targets = explain.explain_targets([a, b, short], out)
    names = [targets[p].name for p in (a, b, short)]
    assert len(set(names)) == 3 and names[2] == "eye.explain.png"
    for name in names:
        assert name.endswith(explain.EXPLAIN_SUFFIX) and len(name.encode()) + len(".x.12345678.tmp") <= 255
    assert names[0].startswith("a" * explain.STEM_KEEP_BYTES + "~")
    assert [explain.explain_targets([p], out)[p].name for p in (a, b)] == names[:2]  # deterministic
    img, _ = _fundus_with_lesion()
    picture = explain.overlay(img, np.zeros((SIZE, SIZE), np.float32), np.ones((SIZE, SIZE), bool))
    explain.write_overlay(picture, targets[a], source=str(a))
    assert explain.mark_of(targets[a]) == str(a)
    assert explain.explain_targets([a], out)[a] == targets[a]  # ours now: a rerun may replace it


def _rise_reference(session, x, spec, *, temperature=1.0, batch=explain.BATCH, masks=explain.RISE_MASKS, seed=0):
    """RISE as first shipped (one expression per batch, a fresh ~11 input-sized temporaries each time): the map the
    buffered rise_map must reproduce."""
    import math

    size = x.shape[-1]
    rng = np.random.default_rng(seed)
    grid = explain.RISE_GRID
    cell = math.ceil(size / grid)
    up = (grid + 1) * cell
    fill = explain._fill(explain.to_crop(x, spec), spec)
    weighted = np.zeros((size, size), np.float64)
    covered = np.zeros((size, size), np.float64)
    total = 0.0
    for first in range(0, masks, batch):
        m = np.empty((min(batch, masks - first), size, size), np.float32)
        for i in range(m.shape[0]):
            coarse = (rng.random((grid + 1, grid + 1)) < explain.RISE_KEEP).astype(np.float32)
            big = np.asarray(Image.fromarray(coarse, "F").resize((up, up), Image.BILINEAR))
            dy, dx = rng.integers(0, cell, 2)
            m[i] = big[dy : dy + size, dx : dx + size]
        mm = m[:, None]
        scores = explain._scores(session, x * mm + fill * (1.0 - mm), temperature, batch)
        weighted += np.tensordot(scores, m, axes=1)
        covered += m.sum(axis=0)
        total += float(scores.sum())
    return ((weighted - (total / masks) * covered) / np.maximum(covered, 1e-6)).astype(np.float32)


def test_rise_map_unchanged_by_the_reused_buffers_and_the_smaller_batch():
    """The buffered RISE gives the first version's map bit for bit at one batch size (64 rows up to 112 px, as the
    quickstart runs it), and at a large input, where it takes fewer rows per call, the same map up to float64
    summation order."""
    img, _ = _fundus_with_lesion()
    x = to_input(img, SPEC)
    assert explain.batch_for(SIZE) == explain.batch_for(112) == explain.BATCH
    assert np.array_equal(explain.rise_map(RegionSession(), x, SPEC), _rise_reference(RegionSession(), x, SPEC))
    assert np.array_equal(
        explain.rise_map(RegionSession(), x, SPEC, temperature=0.7, batch=24, seed=3),
        _rise_reference(RegionSession(), x, SPEC, temperature=0.7, batch=24, seed=3),
    )
    big = 224
    spec = PreprocessSpec(size=big)
    xb = to_input(np.asarray(Image.fromarray(img).resize((big, big), Image.BILINEAR)), spec)
    session = RegionSession()
    heat = explain.rise_map(session, xb, spec, masks=64)
    assert explain.batch_for(big) == 16 and session.calls == 64 // 16
    reference = _rise_reference(RegionSession(), xb, spec, masks=64)  # 64 rows per call
    np.testing.assert_allclose(heat, reference, rtol=1e-5, atol=1e-9)
    assert explain.peak(heat, np.ones_like(heat, bool)) == explain.peak(reference, np.ones_like(reference, bool))


def test_rise_memory_stays_at_one_small_batch_at_512_px():
    """At 512 px the first version held 64 masked inputs plus ~3 temporaries as large (a peak of 546 MB here, before
    the runtime's own batch-64 activations); now one batch of batch_for(512) = 4 rows in buffers made once (45 MB)."""
    import tracemalloc

    size = 512
    spec = PreprocessSpec(size=size)
    img, _ = _fundus_with_lesion()
    x = to_input(np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)), spec)
    assert explain.batch_for(size) == explain.MIN_BATCH == 4
    session = RegionSession()
    tracemalloc.start()
    try:
        explain.rise_map(session, x, spec, masks=64)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert session.calls == 64 // 4
    assert peak_bytes < 80e6, peak_bytes  # 4 rows x 3 x 512 x 512 float32 = 12.6 MB of inputs


def test_serve_explain_writes_each_record_once_naming_a_heatmap_already_there(
    tiny_build, tmp_path, fundus_images, monkeypatch, few_rise_masks
):
    """serve --explain keeps its order on purpose (README): the heatmap first, then the record, written once; a
    record never appears without the heatmap it names, and is never rewritten to add it."""
    from tlcompile.runtime import serve as serve_mod

    watch, out = tmp_path / "watch", tmp_path / "out"
    fundus_images(watch, 2)
    writes: list[tuple[str, bool]] = []
    write = serve_mod.Ledger.write

    def spy(self, record, *, error):
        name = record.get("explanation")
        writes.append((record["file"], name is not None and (out / name).is_file()))
        return write(self, record, error=error)

    monkeypatch.setattr(serve_mod.Ledger, "write", spy)
    serve_mod.serve(tiny_build.bundle, watch, out, once=True, settle=0, log=lambda _: None, explain=True)
    assert sorted(writes) == sorted((p.name, True) for p in watch.iterdir())
