"""``tlcompile serve``: one record per image, bad files recorded without stopping, nothing lost or redone on restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlcompile.errors import TlcompileError
from tlcompile.runtime.bundle import load_bundle
from tlcompile.runtime.predict import predict_image
from tlcompile.runtime.serve import _lock, serve


def _records(out: Path) -> dict[str, list[dict]]:
    return {
        kind: [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        for kind, folder in (("results", out), ("errors", out / "errors"))
    }


def _snapshot(out: Path) -> dict[Path, tuple[bytes, int, int]]:
    return {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.json")}


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def test_serve_once_twenty_images_two_corrupt(tiny_build, tmp_path, fundus_images, corrupt_images, quick_retries):
    watch = tmp_path / "camera"
    good = fundus_images(watch, 18)
    bad = corrupt_images(watch)
    (watch / ".DS_Store").write_bytes(b"hidden")
    (watch / "img_99.png.part").write_bytes(b"still being written")
    log: list[str] = []

    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=log.append)
    out = watch / "results"
    records = _records(out)
    assert (stats.results, stats.errors, stats.already_done) == (18, 2, 0)
    assert sorted(r["file"] for r in records["results"]) == sorted(p.name for p in good)
    assert sorted(r["file"] for r in records["errors"]) == sorted(p.name for p in bad)
    for r in records["errors"]:
        assert r["status"] == "error" and r["error"].startswith(f"{watch / r['file']}: ") and r["sha256"]
    # Each result is what predict says for that file, with the identity that makes a restart safe.
    bundle = load_bundle(tiny_build.bundle)
    session = bundle.open_session()
    for r in records["results"]:
        direct = predict_image(bundle, session, watch / r["file"])
        assert r["status"] == "ok" and r["referral"] == direct.referral
        assert r["referable_dr_probability"] == pytest.approx(direct.referable_dr_probability, abs=1e-6)
        assert r["size"] == (watch / r["file"]).stat().st_size and r["bundle"]["artifact"] == "fp32"
    # Which candidate runs and why (no device.json: the build's choice), the start line, one per image: the partial and
    # hidden files were left alone.
    decided = [line for line in log if "looks cut off" not in line]
    assert (
        len(decided) == 2 + 20 and log[0].startswith("running the build's choice") and "golden samples pass" in log[1]
    )
    # The truncated PNG looks like a frame still being written: retried (bounded), then recorded under its own name.
    assert sum(line.startswith("bad_truncated.png: looks cut off") for line in log) == 3
    assert json.loads((out / "errors" / "bad_truncated.png.json").read_text())["retries"] == 3
    assert "retries" not in json.loads((out / "errors" / "bad_garbage.jpg.json").read_text())  # garbage: no retry

    before = _snapshot(out)
    again = serve(tiny_build.bundle, watch, once=True, settle=0, log=log.append)
    assert (again.results, again.errors, again.already_done) == (0, 0, 20)
    assert _snapshot(out) == before


def test_kill_and_restart_loses_nothing_and_redoes_nothing(tiny_build, tmp_path, fundus_images, corrupt_images):
    """Batch A is decided; batch B arrives and the service is SIGKILLed before it settles; a stray temporary record
    (a write the kill interrupted) is left behind. The restarted service decides exactly batch B."""
    staging, watch, out = tmp_path / "staging", tmp_path / "camera", tmp_path / "records"
    watch.mkdir()
    good, (truncated, garbage) = fundus_images(staging, 18), corrupt_images(staging)
    # The cut-off PNG goes in batch B: it is retried (3 times, each after the file settles again), and under batch A's
    # settle those retries alone took 3 x its seconds. Batch A's 1.5 s settle leaves the kill (milliseconds after
    # batch B's renames, asserted below) far inside it.
    batch_a, batch_b = good[:9] + [garbage], good[9:] + [truncated]
    for path in batch_a:
        os.replace(path, watch / path.name)  # a rename: the camera's file appears whole
    command = [
        sys.executable,
        "-m",
        "tlcompile.cli",
        "serve",
        str(tiny_build.bundle),
        "--watch",
        str(watch),
        "--out",
        str(out),
        "--interval",
        "0.05",
    ]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([*command, "--settle", "1.5"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(list(out.rglob("*.json"))) == 10, 90, "batch A's 10 records")
        for path in batch_b:
            os.replace(path, watch / path.name)
        moved = time.monotonic()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    assert time.monotonic() - moved < 1.5, (
        "the kill came after batch B could settle: the test proves less than it claims"
    )
    assert first.returncode == -signal.SIGKILL
    time.sleep(0.3)
    assert len(list(out.rglob("*.json"))) == 10  # batch B was not decided before the kill
    (out / f".{batch_b[0].name}.json.x1y2z3.tmp").write_text('{"file": "half a record')
    before = _snapshot(out)

    with open(tmp_path / "second.log", "w") as log:
        second = subprocess.Popen([*command, "--settle", "0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: len(list(out.rglob("*.json"))) == 20, 90, "all 20 records")
        time.sleep(0.3)
        second.send_signal(signal.SIGTERM)  # a clean stop: exit 0 with the summary
        second.wait(20)
    finally:
        second.kill()
    printed = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, printed
    assert "9 results and 1 error records written; 10 images already done" in printed

    records = _records(out)
    assert len(records["results"]) == 18 and len(records["errors"]) == 2
    assert sorted(r["file"] for r in records["results"] + records["errors"]) == sorted(
        p.name for p in watch.iterdir() if p.is_file()
    )
    for path, (data, inode, mtime_ns) in before.items():  # batch A's records: not rewritten, not even touched
        assert (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == (data, inode, mtime_ns)
    by_file = {r["file"]: r for r in records["results"] + records["errors"]}
    assert {by_file[p.name]["service_pid"] for p in batch_a} == {first.pid}
    assert {by_file[p.name]["service_pid"] for p in batch_b} == {second.pid}
    assert not list(out.glob(".*.tmp"))


def test_same_name_new_content_gets_its_own_record(tiny_build, tmp_path, fundus_images):
    watch = tmp_path / "camera"
    first = fundus_images(watch, 2, seed=1)
    serve(tiny_build.bundle, watch, once=True, settle=0, log=lambda _: None)
    out = watch / "results"

    # Copied again (new mtime, same bytes): already done, not redone.
    os.utime(first[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=lambda _: None)
    assert (stats.results, stats.already_done) == (0, 2)

    # A camera counter reset: a different image under a used name. Both records are kept.
    replacement = fundus_images(tmp_path / "other", 1, seed=2)[0]
    os.replace(replacement, first[1])
    (watch / "readme.txt").write_text("not a photo")
    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=lambda _: None)
    assert (stats.results, stats.errors, stats.already_done) == (1, 1, 1)
    records = [json.loads(p.read_text()) for p in out.glob(f"{first[1].name}*.json")]
    assert len(records) == 2 and len({r["sha256"] for r in records}) == 2
    assert "'.txt' is not an image type" in json.loads((out / "errors" / "readme.txt.json").read_text())["error"]


def test_serve_refuses_bad_setups(tiny_build, tmp_path):
    watch = tmp_path / "camera"
    with pytest.raises(TlcompileError, match="is not a folder"):
        serve(tiny_build.bundle, watch, once=True)
    watch.mkdir()
    with pytest.raises(TlcompileError, match="is the watch folder"):
        serve(tiny_build.bundle, watch, watch, once=True)
    with pytest.raises(TlcompileError, match="--interval 0.0 s is out of range"):
        serve(tiny_build.bundle, watch, once=True, interval=0.0)
    out = tmp_path / "records"
    out.mkdir()
    held = _lock(out)  # another service is running into the same folder
    try:
        with pytest.raises(TlcompileError, match="another tlcompile serve is already writing"):
            serve(tiny_build.bundle, watch, out, once=True)
    finally:
        held.close()


def test_a_photo_written_in_two_bursts_gets_one_record_with_the_whole_files_hash(
    tiny_build, tmp_path, fundus_images, monkeypatch
):
    """A camera that paused longer than --settle, then wrote the rest while serve read the file: the hash was of the
    half file, the pixels of the whole, and the finished file got a second record (and a second FHIR bundle). Now a
    file changed while it was read is read again once it settles."""
    from tlcompile.runtime import serve as serve_module

    watch = tmp_path / "camera"
    photo = fundus_images(watch, 1, seed=3)[0]
    whole = photo.read_bytes()
    photo.write_bytes(whole[: len(whole) // 2])  # the first burst
    real = serve_module.prepare_photo
    calls = []

    def camera_finishes_meanwhile(bundle, path):
        calls.append(path.name)
        if len(calls) == 1:
            path.write_bytes(whole)  # the second burst, while serve reads
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # (a coarse clock: the time moves anyway)
        return real(bundle, path)

    monkeypatch.setattr(serve_module, "prepare_photo", camera_finishes_meanwhile)
    lines: list[str] = []
    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=lines.append)
    records = _records(watch / "results")
    assert stats.results == 1 and len(records["results"]) == 1 and not records["errors"], lines
    import hashlib

    assert records["results"][0]["sha256"] == hashlib.sha256(whole).hexdigest()
    assert records["results"][0]["size"] == len(whole) and len(calls) == 2
    assert any("changed while it was read" in line for line in lines), lines


def test_a_sub_folder_of_the_watch_folder_is_named_once_not_passed_over_silently(tiny_build, tmp_path, fundus_images):
    watch = tmp_path / "camera"
    fundus_images(watch, 1, seed=4)
    fundus_images(watch / "2026-12-03", 1, seed=5)  # a camera filing by day
    lines: list[str] = []
    for _ in range(2):
        stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=lines.append)
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 2 and all(
        n.startswith("note: 2026-12-03/ is a folder; serve decides the files") for n in notes
    )
    assert not any("results/" in n for n in notes)  # its own output folder is not a folder of photos
    assert stats.results == 0 and stats.already_done == 1
