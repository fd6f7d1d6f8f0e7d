"""``tlcompile predict`` on a bundle, and the proof that predict / verify need nothing from the [train] extras."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tlcompile.errors import DataError
from tlcompile.runtime.bundle import Bundle, load_bundle
from tlcompile.runtime.predict import expand_inputs, predict_image, predict_paths, results_csv


def _black_frame(path):
    Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(path)  # lens cap on: no field of view
    return path


def test_predict_and_verify_without_torch(bundle_copy, tmp_path, fundus_images, corrupt_images, run_cli):
    """On a box with `pip install tlcompile` alone: every [train] module is unimportable, and predict and verify
    (which benches the candidates and pins one) still work and load none of them."""
    folder = tmp_path / "camera"
    good = fundus_images(folder, 5)
    bad = corrupt_images(folder)
    black = _black_frame(folder / "lens_cap.png")
    out_csv = tmp_path / "out.csv"

    verify = run_cli("verify", str(bundle_copy), block_train_modules=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "\nPASS\n" in verify.stdout and verify.stdout.endswith("ATTEMPTED:\n")  # not even tried
    assert (bundle_copy / "device.json").is_file() and "pinned: " in verify.stdout

    cli = run_cli("predict", str(bundle_copy), str(folder), "--csv", str(out_csv), block_train_modules=True)
    assert "pinned for this CPU by tlcompile verify" in cli.stderr
    assert "synthetic images only: a demonstration, NOT for clinical use" in cli.stderr  # the model card, on every run
    assert cli.returncode == 1, cli.stdout + cli.stderr  # two files could not be read
    assert "error: 2 of 8 images could not be read" in cli.stderr and "Traceback" not in cli.stderr
    assert cli.stdout.endswith("ATTEMPTED:\n"), cli.stdout  # torch & co. were not even tried

    rows = {row["file"]: row for row in csv.DictReader(out_csv.open())}
    assert set(rows) == {str(p) for p in [*good, *bad, black]}
    threshold = load_bundle(bundle_copy).threshold
    for path in good:
        row = rows[str(path)]
        p = float(row["referable_dr_probability"])
        assert row["referral"] == ("refer" if p >= threshold else "no referral")
        assert row["ungradable"] == "False" and row["error"] == "" and row["grade"] == ""  # a referable-task bundle
    for path in bad:
        assert rows[str(path)]["error"].startswith(f"{path}: ") and rows[str(path)]["referral"] == ""
    assert rows[str(black)]["referral"] == "ungradable" and rows[str(black)]["referable_dr_probability"] == ""


def test_predict_reproduces_the_golden_expectations(tiny_build):
    """predict's path (file -> bundle preprocessing -> runtime -> threshold) gives what the build recorded."""
    bundle = load_bundle(tiny_build.bundle)
    session = bundle.open_session()
    expected = bundle.meta["golden"]["expected"]
    results = predict_paths(bundle, session, [tiny_build.bundle / e["image"] for e in expected])
    for result, e in zip(results, expected, strict=True):
        assert result.referral == e["referral"] and result.fov_found
        assert result.referable_dr_probability == pytest.approx(e["referable_dr_probability"], abs=1e-6)
        assert result.threshold == bundle.threshold and result.latency_ms > 0


def test_ungradable_is_flagged_also_when_the_bundle_does_not_crop(tiny_build, tmp_path, fundus_images):
    bundle = load_bundle(tiny_build.bundle)
    meta = json.loads(json.dumps(bundle.meta))
    meta["preprocessing"]["crop_fov"] = False
    no_crop = Bundle(root=bundle.root, meta=meta)
    session = bundle.open_session()
    black = predict_image(no_crop, session, _black_frame(tmp_path / "black.png"))
    assert black.ungradable and black.referral == "ungradable" and black.referable_dr_probability is None
    fundus = predict_image(no_crop, session, fundus_images(tmp_path / "f", 1)[0])
    assert not fundus.ungradable and fundus.referral in ("refer", "no referral")


class _FiveGradeSession:
    runtime, threads, exec_precision = "test", 1, "f32"

    def run(self, x):
        assert x.shape == (1, 3, 48, 48) and x.dtype == np.float32
        return np.log(np.array([[0.1, 0.1, 0.2, 0.5, 0.1]], np.float32))


def test_five_grade_bundle_reports_the_grade(tiny_build, tmp_path, fundus_images):
    meta = json.loads((tiny_build.bundle / "bundle.json").read_text())
    meta.update(task="grade", class_names=["no DR", "mild", "moderate", "severe", "proliferative"])
    meta["operating_point"]["threshold"] = 0.5
    result = predict_image(
        Bundle(root=tiny_build.bundle, meta=meta), _FiveGradeSession(), fundus_images(tmp_path, 1)[0]
    )
    assert (result.grade, result.grade_name) == (3, "severe")
    assert result.grade_probability == pytest.approx(0.5, abs=1e-6)
    assert result.referable_dr_probability == pytest.approx(0.8, abs=1e-6) and result.referral == "refer"
    row = next(csv.DictReader(results_csv([result]).splitlines()))
    assert row["grade"] == "3" and row["grade_name"] == "severe" and row["referable_dr_probability"] == "0.800000"


def test_expand_inputs(tmp_path, fundus_images):
    images = fundus_images(tmp_path / "d", 3)
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / ".hidden.png").write_bytes(b"")
    assert expand_inputs([tmp_path / "d"]) == images  # image extensions only, sorted
    assert expand_inputs([images[2], images[0]]) == [images[2], images[0]]  # files as given
    with pytest.raises(DataError, match="no such file or folder"):
        expand_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files in this folder"):
        expand_inputs([tmp_path / "empty"])
    # A file named twice, also through its folder or a link, is decided once, where it first appears.
    (tmp_path / "link.png").symlink_to(images[1])
    twice = [images[1], tmp_path / "d", images[1], tmp_path / "link.png"]
    assert expand_inputs(twice) == [images[1], images[0], images[2]]
    os.mkfifo(tmp_path / "camera.jpg")  # not a file a decoder can read, but not missing either
    with pytest.raises(DataError, match="not a regular file"):
        expand_inputs([tmp_path / "camera.jpg"])
