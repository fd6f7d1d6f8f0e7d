"""Bad data: a corpus of broken files and rows, each reported with file and reason; skip leaves exactly those out."""

from __future__ import annotations

import csv
import re
import sys

import numpy as np
import pytest

from tests.data.conftest import fundus, jpeg_bytes, png_bytes, png_claiming_size, save, write_csv
from tlcompile.data.checks import PROBLEM_KINDS, DataProblemsError
from tlcompile.data.datamodule import check_data, load_data
from tlcompile.recipe import DataConfig

GOOD = 40


@pytest.fixture
def bad_root(tmp_path):
    """APTOS layout: 40 good images, then one bad file or row per kind. Returns (root, {id or line: kind})."""
    root = tmp_path / "clinic"
    images = root / "train_images"
    rows: list[list[object]] = []
    for i in range(GOOD):
        save(images / f"ok{i:02d}.png", fundus(i, i % 5))
        rows.append([f"ok{i:02d}", i % 5])
    good = fundus(99, 2)
    bad_files = {
        "trunc_jpeg": jpeg_bytes(fundus(100, 1))[:-400],
        "trunc_png": png_bytes(fundus(101, 1))[:300],
        "zero": b"",
        "text": b"this is the clinic's export log, not an image\n",
        "html": b"<html><body>404 Not Found</body></html>",
        "broken_png": (lambda d: d[:200] + bytes(b ^ 0xFF for b in d[200:260]) + d[260:])(png_bytes(fundus(102, 3))),
        "bomb": png_claiming_size(good, 20000, 20000),
    }
    for name, data in bad_files.items():
        (images / f"{name}.png").write_bytes(data)
        rows.append([name, 2])
    save(images / "tiny.png", fundus(103, 1, width=20, height=16))  # under image_size 32
    save(images / "lens_cap.png", np.zeros((60, 72, 3), np.uint8))  # all black: no field of view
    (images / "copy_of_ok05.png").write_bytes((images / "ok05.png").read_bytes())  # same photograph, same label
    (images / "copy_of_ok06.png").write_bytes((images / "ok06.png").read_bytes())  # same photograph, other label
    rows += [["tiny", 1], ["lens_cap", 0], ["copy_of_ok05", 0], ["copy_of_ok06", 4]]
    rows += [["ghost", 2], ["ok07", 4], ["nine", 9], ["nine_b", "severe"], ["nolabel", ""], ["", 3]]
    for name in ("nine", "nine_b", "nolabel"):
        save(images / f"{name}.png", fundus(200 + len(name), 0))
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    expected = {
        "trunc_jpeg": "truncated",
        "trunc_png": "truncated",
        "zero": "empty",
        "text": "not_image",
        "html": "not_image",
        "broken_png": "corrupt",
        "bomb": "too_large",
        "tiny": "too_small",
        "lens_cap": "no_fov",
        "copy_of_ok05": "duplicate_image",
        "copy_of_ok06": "duplicate_image",
        "ok06": "duplicate_image",
        "ghost": "missing",
        "ok07": "duplicate_id",
        "nine": "label_out_of_range",
        "nine_b": "label_invalid",
        "nolabel": "label_missing",
        "": "no_id",
    }
    return root, expected


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(source="aptos", root=root, image_size=32, **kw)


def test_every_bad_file_is_reported_with_file_and_reason(bad_root):
    root, expected = bad_root
    report = check_data(_cfg(root), seed=0)
    by_id = {}
    for p in report.problems:
        by_id.setdefault(p.id or "", []).append(p)
    # ok07's second row and ok06 (whose copy has another label) are both problems; everything else once.
    assert {k: {p.kind for p in v} for k, v in by_id.items()} == {k: {v} for k, v in expected.items()}
    kinds = set(expected.values())
    assert len(kinds) >= 8 and kinds <= set(PROBLEM_KINDS)
    assert report.problem_counts()["truncated"] == 2 and report.problem_counts()["not_image"] == 2
    for p in report.problems:
        assert p.reason and p.where.startswith("train.csv line ")
        if p.kind not in ("no_id", "label_out_of_range", "label_invalid", "label_missing", "duplicate_id"):
            assert p.file.endswith(f"train_images/{p.id}.png"), p
    described = {p.id: p.describe() for p in report.problems}
    assert "image '" in described["ghost"] and described["ghost"].endswith("ghost.png' does not exist")
    assert "same content as 'ok05'" in described["copy_of_ok05"]
    # Label problems name the image id as well as the CSV line (issue 20).
    assert re.fullmatch(
        r"train\.csv line \d+ \(image id 'nine'\): label 9 is out of range; valid: DR grades 0-4", described["nine"]
    )
    assert "(image id 'nolabel'): has no label" in described["nolabel"] and "(image id 'nine_b')" in described["nine_b"]
    assert "different label (grades 1, 4)" in described["ok06"]
    assert "is 20x16 pixels, under data.min_image_side 32" in described["tiny"]
    assert "decompression" in described["bomb"] or "too large" in described["bomb"]
    assert report.used == GOOD - 2  # ok06 (conflicting copy) and ok07 (duplicate rows) are out
    # Sizes of every file that decoded: the good ones but ok07 (its rows disagree, so it is never read), two copies,
    # the tiny one and the black frame.
    assert report.sizes["images"] == GOOD + 3 and report.sizes["most_common"][0] == {
        "size": "72x60",
        "images": GOOD + 2,
    }


def test_skip_leaves_exactly_the_problem_images_out(bad_root, tmp_path):
    root, expected = bad_root
    dm = load_data(_cfg(root, on_error="skip"), seed=0, report_dir=tmp_path / "report")
    problem_ids = {p.id for p in dm.report.problems if p.id is not None}
    assert set(dm.ids) == {f"ok{i:02d}" for i in range(GOOD)} - {"ok06", "ok07"}
    assert problem_ids == set(expected) - {""}
    assert dm.fov_found.all() and (dm.images.reshape(len(dm.ids), -1).max(axis=1) > 0).all()  # no black stand-ins
    rows = list(csv.DictReader((tmp_path / "report" / "problems.csv").open()))
    assert len(rows) == len(dm.report.problems) == len(expected) + 1  # ok07 has two problem rows
    assert {r["kind"] for r in rows} == set(expected.values())
    assert all(r["reason"] for r in rows)
    assert (tmp_path / "report" / "data_check.json").is_file()


def test_fail_stops_with_the_list_and_writes_it(bad_root, tmp_path):
    root, _ = bad_root
    with pytest.raises(DataProblemsError) as info:
        load_data(_cfg(root), seed=0, report_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("19 data problems in aptos: ") and "\n" not in message
    assert "(and 16 more)" in message and str(tmp_path / "problems.csv") in message and "data.on_error: skip" in message
    assert len(info.value.report.problems) == 19
    assert (tmp_path / "problems.csv").read_text().count("\n") == 20


def test_clean_data_has_no_problems(aptos_root):
    report = check_data(DataConfig(source="aptos", root=aptos_root, image_size=32), seed=0)
    assert report.problems == [] and report.used == 30 and report.splits["patients_in_two_splits"] == 0


def test_data_check_command(bad_root, aptos_root, write_recipe, tmp_path, monkeypatch, capsys):
    from tlcompile.cli import main

    root, _ = bad_root

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["tlcompile", "data", "check", *args])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code, capsys.readouterr().out

    recipe = write_recipe({"data": {"source": "aptos", "root": str(aptos_root), "image_size": 32}})
    code, out = run(str(recipe))
    assert code == 0 and "images: 30 listed, 30 usable, 0 with problems" in out and "problems: none" in out
    assert "per grade: 0 no DR 6, 1 mild 6, 2 moderate 6, 3 severe 6, 4 proliferative 6" in out
    assert "image size (w x h): min 72x60, median 72x60, max 72x60" in out

    code, out = run(str(recipe), "--set", f"data.root={root}", "--out", str(tmp_path / "check"))
    assert code == 1
    assert (
        "problems: missing 1, empty 1, not_image 2, truncated 2, corrupt 1, too_large 1, too_small 1, "
        "no_fov 1, duplicate_image 3, "
        "duplicate_id 2, no_id 1, label_missing 1, label_invalid 1, label_out_of_range 1"
    ) in out
    assert "truncated: train.csv line 42: image '" in out and "trunc_jpeg.png' is truncated" in out
    assert (tmp_path / "check" / "problems.csv").is_file()


def test_a_split_without_a_referable_or_a_non_referable_image_is_refused_before_training(tmp_path):
    """Five images of grade 0 and 1: data check said 'problems: none', the build trained ('val AUC nan'), locked a
    threshold of 1.0 and failed at its very end, naming a temporary folder."""
    from tlcompile.errors import DataError

    root = tmp_path / "aptos"
    rows = []
    for i in range(12):
        save(root / "train_images" / f"a{i:03d}.png", fundus(i, i % 2))  # no DR and mild only
        rows.append([f"a{i:03d}", i % 2])
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    report = check_data(_cfg(root), seed=0)
    assert any(
        n.startswith("no build can use this split: the val split has 0 referable and ") and "data.split" in n
        for n in report.notes
    ), report.notes
    gap = load_data(_cfg(root), seed=0).split_class_gap()
    assert gap is not None and gap.startswith("the val split has 0 referable")
    # the build stops at its data stage, before any training
    from rich.console import Console

    from tlcompile.build import build
    from tlcompile.recipe import validate_recipe_dict

    recipe = validate_recipe_dict(
        {"data": {"source": "aptos", "root": str(root), "image_size": 32}, "model": {"arch": "cbr_small"}}
    )
    with pytest.raises(DataError, match=r"^data: the val split has 0 referable and \d+ non-referable images"):
        build(recipe, tmp_path / "build", console=Console(quiet=True))
    assert not (tmp_path / "build" / "02_train").exists()


def test_a_label_csv_row_is_named_by_the_line_it_starts_on_and_a_unicode_line_break_stays_in_its_cell(tmp_path):
    """U+2028 inside a cell split the row in two (an invented 'label_missing' row that stopped a build), and a quoted
    field over two lines put the rows after it one line early in every message."""
    from tlcompile.data.sources import _read_csv_rows

    path = tmp_path / "labels.csv"
    path.write_text('image,grade,note\na.png,0,x\u2028y\nb.png,1,"two\nlines"\nc.png,R2,ok\n\nd.png,2,last\n')
    header, rows = _read_csv_rows(path)
    assert header == ["image", "grade", "note"]
    assert [(line, row["image"]) for line, row in rows] == [(2, "a.png"), (3, "b.png"), (5, "c.png"), (7, "d.png")]
    assert rows[0][1]["note"] == "x\u2028y" and rows[1][1]["note"] == "two\nlines"
