"""FHIR out: validated R4B bundles per decided image, written exactly once, and POSTed through an outbox that loses
nothing when the server fails."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fhir.resources")
pytest.importorskip("pydicom")

from tests.runtime.dicom_files import PATIENT_ID, write_test_set  # noqa: E402
from tlcompile.runtime.fhir import FhirOutput, model_identity, report_bundle  # noqa: E402

MODEL = {"name": "tiny", "sha256": "cd" * 32, "version": "fp32@openvino", "built_by": "tlcompile 0.1.0"}


def _record(**extra):
    return {
        "file": "eye.dcm",
        "sha256": "ab" * 32,
        "referral": "refer",
        "referable_dr_probability": 0.83,
        "threshold": 0.41,
        "grade": 3,
        "grade_name": "severe NPDR",
        "ungradable": False,
        "processed_at": "2024-03-11T10:00:00.000+00:00",
        "dicom": {"patient_id": PATIENT_ID, "laterality": "L", "acquired_at": "2024-03-11T09:30:15"},
        **extra,
    }


def test_report_bundle_validates_and_carries_codes_model_and_patient():
    from fhir.resources.R4B.bundle import Bundle

    bundle = report_bundle(_record(), MODEL)
    Bundle.model_validate(bundle)  # round trip: what was written validates again
    by_type = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
        assert entry["request"]["method"] == "PUT"  # idempotent: a retried POST replaces, never duplicates
    report = by_type["DiagnosticReport"][0]
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "104212-6",
        "display": "Views screening for diabetic retinopathy of Eyes",
    }
    assert report["subject"]["identifier"]["value"] == PATIENT_ID and report["status"] == "preliminary"
    assert len(report["result"]) == 4 == len(by_type["Observation"])  # referral, P, grade, gradability
    grade = next(o for o in by_type["Observation"] if o["code"]["coding"][0].get("code") == "71490-7")  # left eye
    assert grade["valueCodeableConcept"]["coding"][0]["code"] == "LA18646-2"  # severe NPDR
    assert grade["bodySite"]["coding"][0]["code"] == "8966001"
    assert grade["effectiveDateTime"].startswith("2024-03-11T09:30:15")  # with this box's timezone added
    threshold = next(o for o in by_type["Observation"] if "component" in o)["component"][0]["valueQuantity"]
    assert threshold == {"value": 0.41, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}
    # the DICOM study, as a logical reference (the README says the Study Instance UID goes to the record)
    study = report_bundle(_record(dicom={"study_instance_uid": "1.2.3.4"}), MODEL)["entry"][0]["resource"]
    assert study["imagingStudy"] == [
        {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}}
    ]
    assert "imagingStudy" not in report
    # the register the patient ID is from (DICOM IssuerOfPatientID), when the header names it
    issued = report_bundle(_record(dicom={"patient_id": PATIENT_ID, "patient_id_issuer": "EYE-CLINIC-MRN"}), MODEL)
    subject = issued["entry"][0]["resource"]["subject"]
    assert subject["identifier"] == {"value": PATIENT_ID, "assigner": {"display": "EYE-CLINIC-MRN"}}
    # ... and its system (a URI), without which a server cannot match the ID to a Patient: the file's own (DICOM
    # IssuerOfPatientIDQualifiersSequence), else the site's (--patient-id-system); a malformed header value is left out
    site = "https://eye-clinic.example.org/mrn"
    for dicom, system in (
        ({"patient_id_system": "urn:oid:1.2.826.0.1.3680043.2"}, "urn:oid:1.2.826.0.1.3680043.2"),
        ({}, site),
        ({"patient_id_system": "urn:oid:not an oid", "patient_id_register": "ISO not an oid"}, None),
        ({"patient_id_register": "DNS hospb.example.org"}, None),  # the file names a register, not as a URI
        # another register's ID (found in review: the site's system would make a server match another patient)
        ({"patient_id_issuer": "HOSP-B"}, None),
    ):
        record = _record(dicom={"patient_id": PATIENT_ID, **dicom})
        made = report_bundle(record, MODEL, patient_id_system=site)
        Bundle.model_validate(made)
        identifier = made["entry"][0]["resource"]["subject"]["identifier"]
        assert identifier.get("system") == system and identifier["value"] == PATIENT_ID
    device = by_type["Device"][0]
    assert device["identifier"][0]["value"] == MODEL["sha256"] and device["deviceName"][0]["name"] == "tiny"
    # Same image, same model: same ids (exactly once); no grade on a referable-task bundle.
    again = report_bundle(_record(grade=None, grade_name=None), MODEL)
    assert again["id"] == bundle["id"] and len(again["entry"]) == 5


class _FlakyFhirServer:
    """A FHIR endpoint on 127.0.0.1 that answers ``status`` (503) with ``answer`` to the first ``fail_first`` POSTs,
    then 200."""

    def __init__(self, fail_first: int, status: int = 503, answer: bytes = b"") -> None:
        self.fail_first, self.attempts, self.received = fail_first, 0, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.attempts += 1
                if outer.attempts <= outer.fail_first:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                outer.received.append(json.loads(body)["id"])
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.end_headers()
                self.wfile.write(b'{"resourceType": "Bundle", "type": "transaction-response"}')

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, every server of every test
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_serve_fhir_url_delivers_each_record_exactly_once_after_failures(tiny_build, tmp_path, quick_retries):
    from tlcompile.runtime.serve import serve

    watch = tmp_path / "camera"
    write_test_set(watch)
    out = tmp_path / "out"
    lines: list[str] = []

    def fhir(url):
        return lambda verified, out_dir: FhirOutput(
            out_dir / "fhir", model_identity(verified), url=url, log=lines.append, backoff=0.02, attempts=6
        )

    with _FlakyFhirServer(fail_first=4) as server:
        stats = serve(tiny_build.bundle, watch, out, once=True, settle=0, log=lines.append, outputs=[fhir(server.url)])
        assert stats.results == 3 and stats.errors == 4
        assert server.attempts >= 4 + 3 and len(server.received) == 3 == len(set(server.received))
        assert any("failed (HTTP 503)" in line for line in lines)
        assert PATIENT_ID not in "\n".join(lines)
        sent = sorted((out / "fhir" / "sent").glob("*.json"))
        assert len(sent) == 3 and not list((out / "fhir" / "outbox").glob("*.json"))
        assert {p.stem for p in sent} == set(server.received)
        record = json.loads((out / "jpeg_baseline.dcm.json").read_text())
        assert record["fhir"].startswith("fhir/outbox/") and (out / record["fhir"].replace("outbox", "sent")).is_file()
        # A restart finds every image done: nothing is written or sent again.
        serve(tiny_build.bundle, watch, out, once=True, settle=0, log=lines.append, outputs=[fhir(server.url)])
        assert len(server.received) == 3


def test_outbox_keeps_what_the_server_refused_and_sends_it_next_run(tiny_build, tmp_path, quick_retries):
    from tlcompile.runtime.serve import serve

    watch = tmp_path / "camera"
    write_test_set(watch)
    out = tmp_path / "out"
    lines: list[str] = []
    with _FlakyFhirServer(fail_first=10_000) as down:  # the record system is down all run
        serve(
            tiny_build.bundle,
            watch,
            out,
            once=True,
            settle=0,
            log=lines.append,
            outputs=[
                lambda v, o: FhirOutput(
                    o / "fhir", model_identity(v), url=down.url, log=lines.append, backoff=0.01, attempts=2
                )
            ],
        )
    assert len(list((out / "fhir" / "outbox").glob("*.json"))) == 3
    assert any("wait in" in line for line in lines)
    with _FlakyFhirServer(fail_first=1) as up:
        out_fhir = FhirOutput(out / "fhir", MODEL, url=up.url, log=lines.append, backoff=0.01)
        assert out_fhir.flush(final=True) == 0 and len(up.received) == 3 == len(set(up.received))


def test_a_bundle_the_server_refuses_is_not_sent_again_in_the_run_and_the_log_says_why(tmp_path):
    """A 422 with an OperationOutcome was retried five times in ~11 s and the server's reason thrown away."""
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
               "diagnostics": "Unknown code 'refer'\nin Observation.valueCodeableConcept"}]}  # fmt: skip
    lines: list[str] = []
    with _FlakyFhirServer(fail_first=10_000, status=422, answer=json.dumps(outcome).encode()) as server:
        out = FhirOutput(tmp_path / "fhir", MODEL, url=server.url, log=lines.append, backoff=0.01, attempts=5)
        out.write(_record())
        assert out.flush(final=True) == 1 and server.attempts == 1  # kept in the outbox for the next run
    (line,) = lines[:1]
    assert "refused by the server (HTTP 422: Unknown code 'refer' in Observation.valueCodeableConcept)" in line
    assert "not retried in this run" in line and PATIENT_ID not in "\n".join(lines)
    with _FlakyFhirServer(fail_first=2, status=429) as busy:  # too many requests: retried
        out = FhirOutput(tmp_path / "fhir2", MODEL, url=busy.url, log=lines.append, backoff=0.01, attempts=5)
        out.write(_record())
        assert out.flush(final=True) == 0 and busy.attempts == 3


@pytest.mark.parametrize(
    ("status", "headers", "body", "said"),
    [
        # urllib repeated the POST as a GET at the new address, got 200, and the bundle went to sent/ unsent
        (301, {"Location": "/fhir2"}, b"", "HTTP 301: redirected to /fhir2; give the server's own address"),
        # a proxy's or login page's 200 stores nothing
        (
            200,
            {"Content-Type": "text/html"},
            b"<html>Please log in</html>",
            "not a FHIR answer: HTTP 2xx with text/html",
        ),
    ],
)
def test_a_redirect_or_an_answer_that_is_not_fhir_keeps_the_bundle_in_the_outbox(tmp_path, status, headers, body, said):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - a followed redirect arrives here as a GET: answered like a stored bundle
            answer = b'{"resourceType": "Bundle", "type": "transaction-response"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        lines: list[str] = []
        url = f"http://127.0.0.1:{httpd.server_address[1]}/fhir"
        out = FhirOutput(tmp_path / "fhir", MODEL, url=url, log=lines.append, backoff=0.01, attempts=3)
        out.write(_record())
        assert out.flush(final=True) == 1  # still in the outbox: nothing was stored
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not list((tmp_path / "fhir" / "sent").glob("*.json"))
    assert said in lines[0] and "not retried in this run" in lines[0]


def test_predict_fhir_writes_each_bundle_once_without_torch(bundle_copy, tmp_path, run_cli):
    camera = tmp_path / "camera"
    write_test_set(camera)
    # a copy of one photo under another name has the same bundle (its ids come from the image): counted once
    shutil.copy(camera / "uncompressed.dcm", camera / "uncompressed-copy.dcm")
    fhir_dir = tmp_path / "fhir"
    for said in ("wrote 3 FHIR bundles to", "wrote 0 FHIR bundles to"):  # the second finds every bundle: no duplicates
        cli = run_cli("predict", str(bundle_copy), str(camera), "--fhir", str(fhir_dir), block_train_modules=True)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr  # the four broken DICOM files
        assert said in cli.stdout and cli.stdout.endswith("ATTEMPTED:\n")
        assert ("(3 already there)" in cli.stdout) == said.startswith("wrote 0")
        assert PATIENT_ID not in cli.stdout + cli.stderr
    files = sorted(fhir_dir.glob("*.json"))
    assert len(files) == 3
    from fhir.resources.R4B.bundle import Bundle

    for path in files:
        bundle = Bundle.model_validate_json(path.read_text())
        report = bundle.entry[0].resource
        assert report.subject.identifier.value == PATIENT_ID and report.subject.identifier.system is None
    # the site's register for the IDs: into the Patient identifier's system
    site_dir = tmp_path / "fhir-site"
    site = "urn:oid:1.2.826.0.1.3680043.2.1"
    cli = run_cli(
        "predict",
        str(bundle_copy),
        str(camera),
        "--fhir",
        str(site_dir),
        "--patient-id-system",
        site,
        block_train_modules=True,
    )
    assert "wrote 3 FHIR bundles to" in cli.stdout, cli.stderr
    for path in site_dir.glob("*.json"):
        assert Bundle.model_validate_json(path.read_text()).entry[0].resource.subject.identifier.system == site
    # refused up front, in one line: a value that is not a URI, and the option without FHIR output
    for extra, said in (
        (["--fhir", str(tmp_path / "x"), "--patient-id-system", "MRN"], "--patient-id-system 'MRN' is not an absolute"),
        (["--patient-id-system", site], "goes into FHIR bundles only; valid: with --fhir or --fhir-url"),
    ):
        cli = run_cli("predict", str(bundle_copy), str(camera), *extra, block_train_modules=True)
        assert cli.returncode == 2 and cli.stderr.startswith("error: ") and said in cli.stderr, cli.stderr
        assert cli.stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_a_server_that_does_not_answer_costs_a_running_serve_one_post_a_pass(tmp_path, monkeypatch):
    """A server that swallowed connections held serve (one thread: no screening meanwhile) for a timeout per bundle."""
    out = FhirOutput(tmp_path / "fhir", MODEL, url="http://127.0.0.1:9/fhir", log=lambda line: None)
    posts: list[str] = []
    monkeypatch.setattr(out, "_post", lambda path: posts.append(path.name) or "timed out")
    for sha in ("ab", "cd", "ef"):
        out.write(_record(sha256=sha * 32))
    assert out.flush() == 3 and len(posts) == 1  # the other two wait for the next pass
    assert out.flush(final=True) == 3 and len(posts) > 3  # predict's last flush still tries every bundle


def test_a_running_serve_sends_again_an_hour_after_the_tries_ran_out_or_the_server_refused(tmp_path, monkeypatch):
    """A serve left running for weeks held every bundle the server had refused (an expired token) or that had used
    its tries (the server down a day) until it was restarted."""
    from tlcompile.runtime import fhir

    clock = [1000.0]
    monkeypatch.setattr(fhir.time, "monotonic", lambda: clock[0])
    answers = iter(["HTTP 401: token expired", "HTTP 503", None])
    out = FhirOutput(tmp_path / "fhir", MODEL, url="http://127.0.0.1:9/fhir", log=lambda line: None, attempts=1)
    monkeypatch.setattr(out, "_post", lambda path: next(answers))
    out.write(_record())
    assert out.flush() == 1  # refused
    clock[0] += fhir.RETRY_ROUND_S - 1
    assert out.flush() == 1 and out.sent == 0  # not yet
    clock[0] += 2
    assert out.flush() == 1  # an hour on: tried again (503; its one try used)
    assert out.flush(final=True) == 1  # predict's final flush does not start another round
    clock[0] += fhir.RETRY_ROUND_S + 1
    assert out.flush() == 0 and out.sent == 1
