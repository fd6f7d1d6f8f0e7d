"""predict --csv never replaces an input or a bundle file, and its cells are not spreadsheet formulas (issue 20)."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pytest

from tlcompile.errors import TlcompileError
from tlcompile.runtime.predict import CSV_COLUMNS, ImageResult, check_csv_target, results_csv


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_csv_onto_an_input_photo_is_refused_and_the_photo_kept(tiny_build, tmp_path, fundus_images, run_cli):
    """The issue's example: --csv naming a photo given as input replaced the photo."""
    photos = fundus_images(tmp_path / "in", 2)
    before = _sha(photos[1])
    cli = run_cli("predict", str(tiny_build.bundle), *map(str, photos), "--csv", str(photos[1]))
    assert (
        cli.returncode == 2 and "is one of the input images" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    )
    assert _sha(photos[1]) == before
    # The same photo reached through a folder argument and a symbolic link is caught too.
    link = tmp_path / "link.png"
    link.symlink_to(photos[0])
    with pytest.raises(TlcompileError, match="one of the input images"):
        check_csv_target(link, inputs=photos)


def test_csv_inside_the_bundle_is_refused(bundle_copy, tmp_path, fundus_images, run_cli):
    photo = fundus_images(tmp_path / "in", 1)[0]
    for target in (bundle_copy / "bundle.json", bundle_copy / "results.csv", bundle_copy / "golden" / "x.csv"):
        before = target.read_bytes() if target.exists() else None
        with pytest.raises(TlcompileError, match="inside the bundle"):
            check_csv_target(target, inputs=[photo], bundle_root=bundle_copy)
        assert (target.read_bytes() if target.exists() else None) == before
    cli = run_cli("predict", str(bundle_copy), str(photo), "--csv", str(bundle_copy / "bundle.json"))
    assert cli.returncode == 2 and "inside the bundle" in cli.stderr
    assert run_cli("verify", str(bundle_copy)).returncode == 0


def test_an_existing_file_is_replaced_only_when_it_is_a_results_csv(tiny_build, tmp_path, fundus_images, run_cli):
    photo = fundus_images(tmp_path / "in", 1)[0]
    mine = tmp_path / "notes.csv"
    mine.write_text("patient,notes\n1,keep me\n")
    with pytest.raises(TlcompileError, match="not a results CSV"):
        check_csv_target(mine, inputs=[photo])
    assert mine.read_text() == "patient,notes\n1,keep me\n"
    out = tmp_path / "results.csv"
    assert run_cli("predict", str(tiny_build.bundle), str(photo), "--csv", str(out)).returncode == 0
    again = run_cli("predict", str(tiny_build.bundle), str(photo), "--csv", str(out))  # our own file: rewritten
    assert again.returncode == 0, again.stderr
    assert out.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)


@pytest.mark.parametrize("name", ['=HYPERLINK("x").png', "+1+1.png", "-2.png", "@SUM(A1).png", "\tx.png"])
def test_cells_that_start_like_a_formula_are_escaped(name, tiny_build, tmp_path, fundus_images, monkeypatch):
    rows = list(csv.DictReader(results_csv([ImageResult(file=name, error=name + ": cannot decode")]).splitlines()))
    assert rows[0]["file"] == "'" + name.replace("\t", "\\x09") and rows[0]["error"].startswith("'")
    # Through the real command, with a real file of that name.
    photo = fundus_images(tmp_path / "in", 1)[0]
    odd = tmp_path / "in" / name
    shutil.move(photo, odd)
    from tlcompile.runtime.bundle import load_bundle
    from tlcompile.runtime.predict import predict_paths

    bundle = load_bundle(tiny_build.bundle)
    monkeypatch.chdir(tmp_path / "in")  # given as a relative name, the file cell starts with the name itself
    text = results_csv(predict_paths(bundle, bundle.open_session(), [Path(name)]))
    cell = next(csv.DictReader(text.splitlines()))["file"]
    assert not cell.startswith(("=", "+", "-", "@", "\t"))


def test_a_file_name_that_is_not_utf8_or_holds_control_characters_is_escaped_not_fatal(tiny_build, tmp_path, run_cli):
    """A name with a byte that is not UTF-8 stopped the CSV write (UnicodeEncodeError) and every result was lost; ESC
    and a right-to-left override reached the terminal and the CSV raw."""
    import os

    from tlcompile.runtime.terminal import printable

    names = [os.fsdecode(b"bad\xff.jpg"), "x\x1b[31mred\u202e.jpg", "[bold]markup.jpg"]
    assert [printable(n) for n in names] == ["bad\\xff.jpg", "x\\x1b[31mred\\u202e.jpg", "[bold]markup.jpg"]
    folder = tmp_path / "in"
    folder.mkdir()
    photo = Path(tiny_build.bundle) / "golden"
    source = next(p for p in sorted(photo.iterdir()) if p.suffix == ".png")
    for name in names:
        shutil.copy(source, folder / name)
    out, heat = tmp_path / "results.csv", tmp_path / "heat"
    done = run_cli("predict", str(tiny_build.bundle), str(folder), "--csv", str(out), "--explain", str(heat))
    assert done.returncode == 0, done.stderr
    # the heatmaps too (the PNG's text chunk naming the image stopped the write, a traceback, no CSV)
    from tlcompile.runtime import explain

    marks = sorted(explain.mark_of(p) for p in heat.iterdir())
    assert marks == sorted(printable(str(folder / n)) for n in names)
    files = sorted(row["file"] for row in csv.DictReader(out.read_text(encoding="utf-8").splitlines()))
    assert files == sorted(f"{folder}/{printable(n)}" for n in names)
    assert "\x1b" not in done.stdout and "\u202e" not in done.stdout
    assert "bad\\xff.jpg" in done.stdout and "[bold]markup.jpg" in done.stdout  # shown as given, not as rich markup
