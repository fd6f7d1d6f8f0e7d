"""serve against the files an attacker (or an odd camera) leaves: one file never stops the service (issue 20)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlcompile.io import STEM_MAX_BYTES as MAX_STEM_BYTES
from tlcompile.runtime import serve as serve_module
from tlcompile.runtime.serve import TRUNCATION_RETRIES, record_stem, serve


def _records(out: Path) -> dict[str, list[dict]]:
    return {
        kind: [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        for kind, folder in (("results", out), ("errors", out / "errors"))
    }


def _quiet(_line: str) -> None:
    pass


def test_record_names_always_fit():
    for name in ("a.png", "é" * 118 + ".png", "x" * 255, "👁" * 63 + ".jpg", os.fsdecode(b"\xff\xfe" * 120 + b".png")):
        stem = record_stem(name)
        assert len(os.fsencode(stem)) <= MAX_STEM_BYTES
        # With the collision suffix, .json and atomic_path's temporary name it still fits in 255 bytes.
        assert len(os.fsencode(f".{stem}.0123456789ab.json.abcdefgh.tmp")) <= 255
    assert record_stem("a.png") == "a.png"
    assert record_stem("é" * 118 + ".png") != record_stem("é" * 118 + ".jpg")  # the hash tells long names apart


def test_long_odd_and_unreadable_names_become_records_and_serve_goes_on(
    tiny_build, tmp_path, fundus_images, monkeypatch
):
    """The issue's cases: a 237-byte UTF-8 name made serve exit at every start; an unreadable file crashed it with a
    traceback at every start. Now each is that file's record, the other images are decided, and a restart redoes
    nothing."""
    watch = tmp_path / "camera"
    good = fundus_images(watch, 3)
    long_name = "é" * 114 + "x_eye.png"  # 237 bytes of UTF-8, the example
    long_path = watch / long_name
    os.rename(good[0], long_path)
    assert len(os.fsencode(long_name)) == 237
    odd_name = os.fsdecode(b"scan\xff\n01.png")  # undecodable byte and a newline: must not crash the log line
    os.rename(good[1], watch / odd_name)
    locked = watch / "locked.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(locked)
    locked.chmod(0o000)
    if (
        os.geteuid() == 0
    ):  # root reads anything: make reading this one file fail as it would for another user's 0600 file
        real = serve_module.sha256_file

        def deny(path, *args, **kwargs):
            if Path(path).name == "locked.png":
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(serve_module, "sha256_file", deny)
    log: list[str] = []
    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=log.append)
    assert (stats.results, stats.errors) == (3, 1)
    out = watch / "results"
    records = _records(out)
    assert sorted(r["file"] for r in records["results"]) == sorted([long_name, odd_name, good[2].name])
    assert [r["file"] for r in records["errors"]] == ["locked.png"]
    assert "cannot read the file (Permission denied)" in records["errors"][0]["error"]
    assert (out / f"{record_stem(long_name)}.json").is_file()
    assert all("\n" not in line for line in log)
    again = serve(tiny_build.bundle, watch, once=True, settle=0, log=_quiet)
    assert (again.results, again.errors, again.already_done) == (0, 0, 4)


def test_output_failure_stops_serve_with_one_line(tiny_build, tmp_path, fundus_images, run_cli):
    watch = tmp_path / "camera"
    fundus_images(watch, 1)
    out = tmp_path / "records"
    out.mkdir()
    (out / "errors").write_text("a file where the errors folder should be")
    cli = run_cli("serve", str(tiny_build.bundle), "--watch", str(watch), "--out", str(out), "--once", "--settle", "0")
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "errors" in cli.stderr
    assert (out / "errors").read_text() == "a file where the errors folder should be"  # the user's file is left alone


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_half_written_camera_file_is_retried_and_recorded_under_its_name(tiny_build, tmp_path, fundus_images):
    """A camera pauses longer than --settle mid-file: the cut-off file is retried after it settles again (bounded),
    and when the camera finishes, the result is recorded under the normal name with no error record."""
    from tlcompile.data.synthetic import generate

    watch = tmp_path / "camera"
    watch.mkdir()
    data = _png_bytes(generate(1, seed=3, size=96)[0][0])
    path = watch / "frame.png"
    path.write_bytes(data[: len(data) // 2])
    log: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=serve,
        args=(tiny_build.bundle, watch, tmp_path / "out"),
        kwargs={"settle": 0.1, "interval": 0.05, "log": log.append, "stop": stop},
    )
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not any("looks cut off" in line for line in log):
            assert time.monotonic() < deadline and thread.is_alive(), log
            time.sleep(0.02)
        with open(path, "ab") as f:  # the camera writes the rest
            f.write(data[len(data) // 2 :])
        while not (tmp_path / "out" / "frame.png.json").exists():
            assert time.monotonic() < deadline and thread.is_alive(), log
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(30)
    records = _records(tmp_path / "out")
    assert [r["file"] for r in records["results"]] == ["frame.png"] and records["errors"] == []
    assert records["results"][0]["size"] == len(data)


def test_a_file_that_stays_cut_off_gets_one_error_record_after_bounded_retries(tiny_build, tmp_path, quick_retries):
    watch = tmp_path / "camera"
    watch.mkdir()
    data = _png_bytes(np.full((64, 64, 3), 90, np.uint8))
    (watch / "cut.png").write_bytes(data[:70])
    (watch / "empty.jpg").write_bytes(b"")
    t0 = time.monotonic()
    stats = serve(tiny_build.bundle, watch, tmp_path / "out", once=True, settle=0, log=_quiet)
    assert (stats.results, stats.errors) == (0, 2)
    errors = {r["file"]: r for r in _records(tmp_path / "out")["errors"]}
    assert errors["cut.png"]["retries"] == TRUNCATION_RETRIES and errors["empty.jpg"]["retries"] == TRUNCATION_RETRIES
    assert time.monotonic() - t0 < 30


def test_rewrite_in_place_with_same_size_and_mtime_is_detected(tiny_build, tmp_path):
    """Same name, same size, same mtime, new content (a camera that rewrites a file and keeps its timestamp):
    found by inode/ctime, decided again, and recorded beside the first record."""
    from tlcompile.data.synthetic import generate

    watch = tmp_path / "camera"
    watch.mkdir()
    images, _ = generate(2, seed=11, size=96)
    path = watch / "frame.bmp"  # BMP: the same dimensions give the same file size
    Image.fromarray(images[0]).save(path)
    st = path.stat()
    out = tmp_path / "out"
    assert serve(tiny_build.bundle, watch, out, once=True, settle=0, log=_quiet).results == 1
    time.sleep(0.01)
    replacement = tmp_path / "b.bmp"
    Image.fromarray(images[1]).save(replacement)
    assert replacement.stat().st_size == st.st_size
    path.write_bytes(replacement.read_bytes())  # in place: same inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    stats = serve(tiny_build.bundle, watch, out, once=True, settle=0, log=_quiet)
    assert (stats.results, stats.already_done) == (1, 0)
    shas = {r["sha256"] for r in _records(out)["results"]}
    assert len(shas) == 2


def test_a_linked_errors_or_fhir_folder_is_refused_and_the_bundle_stays_whole(bundle_copy, tmp_path, fundus_images):
    """Whoever can write the camera's folder (serve's records go to WATCH/results by default) linked OUT/errors (or
    OUT/fhir) into the bundle: serve wrote an error record into golden/, and the next start refused the bundle."""
    import pytest

    from tlcompile.errors import TlcompileError
    from tlcompile.runtime.bundle import verify_bundle
    from tlcompile.runtime.fhir import FhirOutput

    watch, out = tmp_path / "camera", tmp_path / "camera" / "results"
    fundus_images(watch, 1)
    (watch / "not-an-image.jpg").write_bytes(b"hello")
    out.mkdir()
    before = sorted(p.name for p in (bundle_copy / "golden").iterdir())
    (out / "errors").symlink_to(bundle_copy / "golden")
    with pytest.raises(TlcompileError, match=r"errors' is a symbolic link \(to '.*golden'\), not a folder; error rec"):
        serve(bundle_copy, watch, None, once=True, settle=0, log=_quiet)
    (out / "errors").unlink()
    (out / "fhir").symlink_to(bundle_copy / "golden")
    with pytest.raises(TlcompileError, match=r"fhir' is a symbolic link .*; FHIR bundles are written only"):
        FhirOutput(out / "fhir", {}, in_records=True)
    (out / "fhir").unlink()
    (out / "fhir" / "outbox").parent.mkdir()
    (out / "fhir" / "outbox").symlink_to(bundle_copy / "golden")
    with pytest.raises(TlcompileError, match=r"outbox' is a symbolic link"):
        FhirOutput(out / "fhir", {}, url="http://127.0.0.1:9/fhir")
    assert sorted(p.name for p in (bundle_copy / "golden").iterdir()) == before
    assert verify_bundle(bundle_copy, pin=False).ok


def test_a_link_to_a_file_outside_the_watch_folder_is_not_read_and_an_unnamed_dicom_is(tiny_build, tmp_path):
    """A link to /etc/passwd in the camera's folder got an error record with its size, inode and sha256; a DICOM file
    named as storage media name them (IM000001) was refused for its missing extension."""
    import pytest

    pytest.importorskip("pydicom")
    from tests.runtime.dicom_files import write_dicom

    watch, out = tmp_path / "camera", tmp_path / "out"
    watch.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the camera's folder")
    (watch / "passwd.jpg").symlink_to(secret)
    write_dicom(watch / "IM000001", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    serve(tiny_build.bundle, watch, out, once=True, settle=0, log=_quiet)
    records = _records(out)
    (error,) = records["errors"]
    assert error["error"] == "passwd.jpg: a symbolic link to a file outside the watch folder; not read (copy the " \
        "photo in instead)"  # fmt: skip
    import hashlib

    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in json.dumps(error)
    (result,) = records["results"]
    assert result["file"] == "IM000001" and result["referral"] in ("refer", "no referral", "ungradable")


def test_a_link_put_in_place_of_errors_while_serve_runs_is_refused_at_the_next_write(tmp_path):
    """The sub-folders were checked at start only: a link made afterwards was written through."""
    import pytest

    from tlcompile.errors import TlcompileError
    from tlcompile.runtime.fhir import FhirOutput
    from tlcompile.runtime.serve import Ledger

    out = tmp_path / "out"
    out.mkdir()
    ledger = Ledger(out)  # checked now: a real folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "errors").rmdir()
    (out / "errors").symlink_to(elsewhere)
    record = {"file": "x.jpg", "sha256": "ab" * 32, "size": 1, "mtime_ns": 1, "ino": 1, "ctime_ns": 1}
    with pytest.raises(TlcompileError, match=r"errors' is a symbolic link"):
        ledger.write({**record, "error": "not an image"}, error=True)
    assert not list(elsewhere.iterdir())
    fhir = FhirOutput(out / "fhir", {"sha256": "cd" * 32}, in_records=True)
    (out / "fhir").rmdir()
    (out / "fhir").symlink_to(elsewhere)
    with pytest.raises(TlcompileError, match=r"fhir' is a symbolic link"):
        fhir.write({**record, "referral": "refer", "referable_dr_probability": 0.9, "threshold": 0.5})
    assert not list(elsewhere.iterdir())
    # predict's own --fhir folder may be a link: the user chose it
    linked = tmp_path / "linked"
    linked.symlink_to(elsewhere)
    FhirOutput(linked, {"sha256": "cd" * 32})
