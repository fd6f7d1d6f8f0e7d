"""Where predict, serve and bench write: never into the bundle they run, and every refusal is one line before any work
(an outside-in test found serve --out, predict --fhir and bench --out writing into the bundle, which then failed
every later verify, and tracebacks for an output path under a file or a malformed --fhir-url)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import cli_refusal
from tlcompile.errors import TlcompileError
from tlcompile.runtime.bench import check_results_target
from tlcompile.runtime.outputs import check_parent_writable, check_server_url, refuse_inside_bundle
from tlcompile.runtime.serve import serve


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_serve_never_writes_into_the_bundle(bundle_copy, tmp_path, fundus_images):
    before = _listing(bundle_copy)
    watch = tmp_path / "watch"
    fundus_images(watch, 1)
    for out in (bundle_copy, bundle_copy / "results"):
        with pytest.raises(TlcompileError, match="is inside the bundle"):
            serve(bundle_copy, watch, out, once=True, settle=0, log=lambda _: None)
    # Watching a folder of the bundle: the default records folder (WATCH/results) would be inside it.
    with pytest.raises(TlcompileError, match="results' is inside the bundle"):
        serve(bundle_copy, bundle_copy / "golden", None, once=True, settle=0, log=lambda _: None)
    assert _listing(bundle_copy) == before  # no lock, no records folder: verify still passes


def test_predict_fhir_and_bench_out_never_write_into_the_bundle(bundle_copy, tmp_path, fundus_images):
    before = _listing(bundle_copy)
    photo = str(fundus_images(tmp_path / "in", 1)[0])
    cli_refusal(["predict", str(bundle_copy), photo, "--fhir", str(bundle_copy / "fhir")], "is inside the bundle")
    cli_refusal(
        ["bench", str(bundle_copy), "--iterations", "1", "--out", str(bundle_copy / "b.json")], "inside the bundle"
    )
    with pytest.raises(TlcompileError, match="inside the bundle"):  # the bundle named by its bundle.json
        check_results_target(bundle_copy / "golden" / "b.json", [bundle_copy / "bundle.json"])
    assert _listing(bundle_copy) == before


def test_output_paths_under_a_file_are_one_line_before_anything_is_decided(tiny_build, tmp_path, fundus_images):
    photo = str(fundus_images(tmp_path / "in", 1)[0])
    notes = tmp_path / "notes.txt"
    notes.write_text("a grader's notes\n")
    bundle = str(tiny_build.bundle)
    cli_refusal(["predict", bundle, photo, "--csv", str(notes / "res.csv")], "is a file, not a folder")
    cli_refusal(["predict", bundle, photo, "--fhir", str(notes)], "is a file; give a folder for the FHIR bundles")
    cli_refusal(["bench", bundle, "--iterations", "1", "--out", str(notes / "b.json")], "is a file, not a folder")
    # An existing file that is not a bench results file (a photo here) is refused before measuring, and kept.
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    before = jpeg.read_bytes()
    cli_refusal(["bench", bundle, "--iterations", "1", "--out", str(jpeg)], "not a bench results file")
    assert jpeg.read_bytes() == before and notes.read_text() == "a grader's notes\n"
    # A results file of bench is appended to, as before.
    results = tmp_path / "bench.json"
    results.write_text(json.dumps({"runs": []}))
    check_results_target(results, [tiny_build.bundle])


def test_a_fhir_url_that_is_not_an_http_server_is_refused_at_start(tiny_build, tmp_path, fundus_images, monkeypatch):
    photo = str(fundus_images(tmp_path / "in", 1)[0])
    monkeypatch.chdir(tmp_path)  # predict's default --fhir folder is ./fhir
    for url in ("notaurl", "ftp://x/y", "http://", "file:///etc/passwd"):
        with pytest.raises(TlcompileError, match="not a server address"):
            check_server_url(url)
    # what urllib refuses only when the first bundle is sent (a traceback that stopped serve), or cannot work
    for url, message in (
        ("https://fhir.example.org/fhir r4", "has a space or a control character in it"),
        ("https://exa mple.org/fhir", "has a space or a control character in it"),
        ("http://h/fhir\x01", "'http://h/fhir\\x01' has a space or a control character"),
        ("http://h:99999/fhir", "is not a server address (Port out of range"),
        ("http://h:0/fhir", "port 0 is not a server's port"),
    ):
        with pytest.raises(TlcompileError, match=re.escape(message)):
            check_server_url(url)
    with pytest.raises(
        TlcompileError, match=r"^--fhir-url 'http://\.\.\.@127\.0\.0\.1': a user name or password"
    ) as err:
        check_server_url("http://user:secret@127.0.0.1:18080/fhir")
    assert "secret" not in str(err.value)
    for url in ("https://bob:secret@host:99999/x", "https://bob:secret@host/f hir", "ftp://bob:secret@h/x",
                "bob:secret@host/fhir", "https:/bob:secret@host/x", "https://bob:se/cret@host/x"):  # fmt: skip
        with pytest.raises(TlcompileError) as err:  # another mistake first: the password is still not shown
            check_server_url(url)
        assert "secret" not in str(err.value) and "cret" not in str(err.value) and "...@" in str(err.value)
    assert check_server_url("https://fhir.example.org/fhir") == "https://fhir.example.org/fhir"
    assert check_server_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert check_server_url("https://[::1]:8443/fhir%20r4") == "https://[::1]:8443/fhir%20r4"
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    cli_refusal(["predict", str(tiny_build.bundle), photo, "--fhir-url", "notaurl"], "'notaurl' is not a server")
    args = ["serve", str(tiny_build.bundle), "--watch", str(watch), "--out", str(out), "--once"]
    cli_refusal([*args, "--fhir-url", "notaurl"], "'notaurl' is not a server")
    assert not out.exists() and not (tmp_path / "fhir").exists()  # nothing was created before the refusal


def test_the_path_checks_themselves(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    refuse_inside_bundle("--out", tmp_path / "elsewhere", bundle)  # outside: fine
    refuse_inside_bundle("--out", bundle / "x", None)  # no bundle: nothing to refuse
    with pytest.raises(TlcompileError, match="inside the bundle"):
        refuse_inside_bundle("--out", bundle / "bundle.json", bundle / "bundle.json")
    check_parent_writable("--csv", tmp_path / "new" / "deeper" / "r.csv")  # missing folders are made at write time
    assert not (tmp_path / "new").exists()
