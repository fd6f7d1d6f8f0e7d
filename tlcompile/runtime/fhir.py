"""FHIR output: one transaction Bundle per decided image (DiagnosticReport + Observations + the model as a Device).

FHIR version **R4B (4.3.0)**, built and validated with ``fhir.resources``' ``R4B`` models (``pip install
'tlcompile[fhir]'``; fhir.resources 7+ defaults to R5, so the R4B package is named explicitly). Every resource is
constructed through its pydantic model, which validates types, cardinalities, code values and dateTime formats;
nothing is written that did not validate.

Codes (see README "FHIR out" for how well each fits):

- DiagnosticReport.code: LOINC 104212-6 "Views screening for diabetic retinopathy of Eyes".
- grade (5-grade bundles): LOINC 71491-5 / 71490-7 "Right/Left eye Diabetic retinopathy severity level by
  Ophthalmoscopy" with answers LA18643-9 .. LA18648-8 (answer list LL2117-1) -- a best match: the method here is a
  photograph read by a model, not ophthalmoscopy. Without a laterality only the local code is given.
- referral: SNOMED CT 3457005 "Patient referral", valued with local codes (refer / no-referral / ungradable).
- P(referable DR), the decision threshold and gradability have no standard code: local codes under
  :data:`LOCAL_SYSTEM`, with text.
- laterality: SNOMED CT 18944008 "Right eye structure" / 8966001 "Left eye structure" as bodySite.

Status is ``preliminary``: an automated screening result a clinician has not reviewed.

Writes are exactly-once like serve's records: a bundle's file name and every resource id derive from the image's
sha256 and the model's manifest sha256 (uuid5), the file is written atomically, and an existing one is never
written again. With a URL the file goes to ``outbox/`` and moves to ``sent/`` once the server answered 2xx; a
failed POST leaves it in the outbox, retried with backoff (also by the next run), so nothing is lost; each entry is
a PUT of a fixed id, so a retry after a lost answer replaces rather than duplicates.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlcompile.errors import MissingDependencyError, TlcompileError
from tlcompile.io import atomic_write_text, sha256_file
from tlcompile.runtime.outputs import check_identifier_system, check_server_url, refuse_linked_folder
from tlcompile.runtime.terminal import printable

FHIR_VERSION = "4.3.0"  # R4B
LOCAL_SYSTEM = "urn:tlcompile:fhir:codes"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
_NAMESPACE = uuid.UUID("6f0b6c1e-2f3e-5d53-9b1a-7c1c4d9e0a18")  # uuid5 namespace of tlcompile's FHIR ids
OUTBOX, SENT = "outbox", "sent"
_EYE = {"R": ("18944008", "Right eye structure", "71491-5"), "L": ("8966001", "Left eye structure", "71490-7")}
# LOINC answer list LL2117-1 (diabetic retinopathy severity), by international DR grade 0-4.
_SEVERITY = [
    ("LA18643-9", "No apparent retinopathy"),
    ("LA18644-7", "Mild non-proliferative retinopathy"),
    ("LA18645-4", "Moderate non-proliferative retinopathy"),
    ("LA18646-2", "Severe non-proliferative retinopathy"),
    ("LA18648-8", "Proliferative retinopathy"),
]
_REFERRAL_CODES = {"refer": "refer", "no referral": "no-referral", "ungradable": "ungradable"}


def _r4b() -> Any:
    try:
        from fhir.resources.R4B import bundle
    except ImportError as err:
        raise MissingDependencyError(
            "FHIR output needs fhir.resources; install it with: pip install 'tlcompile[fhir]'"
        ) from err
    return bundle


def model_identity(verified: Any) -> dict[str, str]:
    """The model a bundle runs, as the FHIR Device names it: bundle name, manifest sha256, candidate and builder."""
    b = verified.bundle
    return {
        "name": b.name,
        "sha256": verified.manifest_sha256,
        "version": b.candidate_id,
        "built_by": str(b.meta.get("built_by") or "tlcompile"),
        "runtime": b.runtime,
    }


def _fhir_datetime(text: str | None) -> str | None:
    """FHIR wants a timezone on every dateTime with a time: a DICOM time without one is taken as this box's local
    time (the camera and the box sit in the same clinic)."""
    if not text:
        return None
    if re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", text):  # a year, a month or a day: FHIR dateTime's own precisions
        return text
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if "T" not in text:
        return moment.date().isoformat()
    return (moment if moment.tzinfo else moment.astimezone()).isoformat()


def _server_said(err: Any) -> str:
    """': ' and the first diagnostics of the OperationOutcome (or the first line of text) a server answered an error
    with, one line of at most 300 characters; '' when it said nothing readable."""
    try:
        body = err.read(65536).decode("utf-8", "replace")
    except (OSError, ValueError, AttributeError):
        return ""
    text = body.strip()
    try:
        outcome = json.loads(body)
        issues = outcome.get("issue") if isinstance(outcome, dict) else None
        if isinstance(issues, list) and issues and isinstance(issues[0], dict):
            first = issues[0]
            text = str(first.get("diagnostics") or (first.get("details") or {}).get("text") or first.get("code") or "")
    except (ValueError, AttributeError, RecursionError):
        pass
    text = printable(" ".join(text.split())[:300])
    return f": {text}" if text else ""


def _refused(why: str) -> bool:
    """A 4xx answer other than 408 (timeout) and 429 (too many requests), a redirect, or a 2xx that is not a FHIR
    transaction-response (a login page): the same bundle would get the same answer at once."""
    code = why.split(":")[0]
    return (code.startswith(("HTTP 4", "HTTP 3")) and code not in ("HTTP 408", "HTTP 429")) or code == _NOT_FHIR


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx reaches _post as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)
#: A running serve sends a bundle whose tries ran out (or that the server refused) again after this many seconds: a
#: server down for a day, or a token renewed, gets the outbox delivered without a restart.
RETRY_ROUND_S = 3600.0
_NOT_FHIR = "not a FHIR answer"


def _not_a_transaction_response(body: bytes, content_type: str) -> str | None:
    """None when a 2xx answer is a FHIR Bundle (the transaction-response a server gives for a transaction), else why
    the bundle cannot count as stored: a proxy's or login page's 200 stores nothing."""
    if not body.strip():  # 'Prefer: return=minimal': stored, nothing returned
        return None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and answer.get("resourceType") == "Bundle":
        return None
    shown = printable(content_type.split(";")[0].strip() or "no Content-Type")
    return f"{_NOT_FHIR}: HTTP 2xx with {shown}, not a FHIR Bundle (a proxy or login page?); kept to send again"


def _local(code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": LOCAL_SYSTEM, "code": code, "display": display}], "text": display}


def bundle_key(record: dict[str, Any], model: dict[str, str]) -> str:
    """uuid5 of (image sha256, model sha256): the same image decided by the same model has the same FHIR ids."""
    return str(uuid.uuid5(_NAMESPACE, f"{record['sha256']}|{model['sha256']}"))


def _system_uri(value: Any) -> str | None:
    """A file's own register URI when it is one (a malformed header value is left out, not passed on)."""
    try:
        return check_identifier_system(str(value)) if value else None
    except TlcompileError:
        return None


def report_bundle(
    record: dict[str, Any], model: dict[str, str], *, patient_id_system: str | None = None
) -> dict[str, Any]:
    """The validated FHIR R4B transaction Bundle (as JSON types) of one decided image. ``record``: predict's result
    fields plus ``sha256`` of the image (and ``dicom``, ``processed_at`` when known). ``patient_id_system``: the
    register the DICOM PatientIDs come from (the site's, --patient-id-system), where a file's own header names none."""
    fhir_bundle = _r4b()
    key = bundle_key(record, model)
    ids = {name: str(uuid.uuid5(uuid.UUID(key), name)) for name in ("report", "device", "referral", "p", "grade", "q")}
    ids["device"] = str(uuid.uuid5(_NAMESPACE, f"device|{model['sha256']}"))
    ref = {name: {"reference": f"urn:uuid:{value}"} for name, value in ids.items()}
    dicom = record.get("dicom") or {}
    eye = _EYE.get(str(dicom.get("laterality") or "").upper())
    common: dict[str, Any] = {"status": "preliminary", "device": ref["device"]}
    if dicom.get("patient_id"):
        identifier: dict[str, Any] = {"value": dicom["patient_id"]}
        # without a system a FHIR server cannot match the ID to its Patient (the same number in two registers)
        # the site's register only where the file names no issuer of its own in any form: an ID from another
        # hospital's register (IssuerOfPatientID HOSP-B, a qualifier that is no URI) under the site's system could
        # match another patient
        named = dicom.get("patient_id_issuer") or dicom.get("patient_id_register")
        site = patient_id_system if not named else None
        if system := _system_uri(dicom.get("patient_id_system")) or site:
            identifier["system"] = system
        if dicom.get("patient_id_issuer"):  # DICOM's IssuerOfPatientID: which register the ID is from
            identifier["assigner"] = {"display": str(dicom["patient_id_issuer"])}
        common["subject"] = {"identifier": identifier, "type": "Patient"}
    if (effective := _fhir_datetime(dicom.get("acquired_at"))) is not None:
        common["effectiveDateTime"] = effective
    issued = _fhir_datetime(record.get("processed_at")) or _dt.datetime.now(_dt.timezone.utc).isoformat()
    common["issued"] = issued
    if eye is not None:
        common["bodySite"] = {"coding": [{"system": SNOMED, "code": eye[0], "display": eye[1]}], "text": eye[1]}
    referral = str(record.get("referral"))
    observations: dict[str, dict[str, Any]] = {
        "referral": {
            **common,
            "code": {
                "coding": [{"system": SNOMED, "code": "3457005", "display": "Patient referral"}],
                "text": "Referral for diabetic retinopathy (automated screening)",
            },
            "valueCodeableConcept": _local(_REFERRAL_CODES.get(referral, referral), referral),
        },
        "q": {
            **common,
            "code": _local("image-gradable", "Fundus image gradable by the model (a field of view was found)"),
            "valueBoolean": not bool(record.get("ungradable")),
            **({"note": [{"text": record["ungradable_reason"]}]} if record.get("ungradable_reason") else {}),
        },
    }
    if record.get("referable_dr_probability") is not None:
        observations["p"] = {
            **common,
            "code": _local("referable-dr-probability", "Probability of referable diabetic retinopathy (grade >= 2)"),
            "valueQuantity": {
                "value": round(float(record["referable_dr_probability"]), 6),
                "unit": "1",
                "system": UCUM,
                "code": "1",
            },
            "component": [
                {
                    "code": _local("decision-threshold", "Referral threshold the model was locked at"),
                    "valueQuantity": {
                        "value": round(float(record["threshold"]), 6),
                        "unit": "1",
                        "system": UCUM,
                        "code": "1",
                    },
                }
            ],
        }
    if record.get("grade") is not None:
        grade = int(record["grade"])
        answer, display = _SEVERITY[grade]
        coding = [{"system": LOCAL_SYSTEM, "code": "dr-grade", "display": "Diabetic retinopathy grade (ICDR, 0-4)"}]
        if eye is not None:
            coding.insert(0, {"system": LOINC, "code": eye[2]})
        observations["grade"] = {
            **common,
            "code": {"coding": coding, "text": "Diabetic retinopathy severity (automated, from a fundus photograph)"},
            "valueCodeableConcept": {
                "coding": [{"system": LOINC, "code": answer, "display": display}],
                "text": str(record.get("grade_name") or display),
            },
        }
    identifiers = [{"system": "urn:tlcompile:image-sha256", "value": record["sha256"]}]
    if dicom.get("sop_instance_uid"):
        identifiers.append({"system": "urn:dicom:uid", "value": f"urn:oid:{dicom['sop_instance_uid']}"})
    conclusion = referral + (
        f" (P(referable DR) {record['referable_dr_probability']:.3f}, threshold {record['threshold']:.4f})"
        if record.get("referable_dr_probability") is not None
        else f" ({record['ungradable_reason']})"
        if record.get("ungradable_reason")
        else ""
    )
    report = {
        "resourceType": "DiagnosticReport",
        "id": ids["report"],
        "identifier": identifiers,
        "status": "preliminary",
        "code": {
            "coding": [
                {"system": LOINC, "code": "104212-6", "display": "Views screening for diabetic retinopathy of Eyes"}
            ],
            "text": "Diabetic retinopathy screening (automated)",
        },
        **{k: common[k] for k in ("subject", "effectiveDateTime", "issued") if k in common},
        # the DICOM study the photograph belongs to, as a logical reference (no ImagingStudy resource is sent)
        **(
            {
                "imagingStudy": [
                    {
                        "type": "ImagingStudy",
                        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{dicom['study_instance_uid']}"},
                    }
                ]
            }
            if dicom.get("study_instance_uid")
            else {}
        ),
        "result": [ref[name] for name in observations],
        "conclusion": conclusion,
        "conclusionCode": [_local(_REFERRAL_CODES.get(referral, referral), referral)],
    }
    device = {
        "resourceType": "Device",
        "id": ids["device"],
        "identifier": [{"system": "urn:tlcompile:bundle-manifest-sha256", "value": model["sha256"]}],
        "deviceName": [{"name": model["name"], "type": "model-name"}],
        "version": [
            {"type": {"text": "candidate"}, "value": model["version"]},
            {"type": {"text": "software"}, "value": model["built_by"]},
        ],
        "type": {"text": f"Diabetic retinopathy screening model ({model.get('runtime', '')})".replace(" ()", "")},
    }
    entries = [(ids["report"], report), (ids["device"], device)]
    entries += [
        (ids[name], {"resourceType": "Observation", "id": ids[name], **obs}) for name, obs in observations.items()
    ]
    raw = {
        "resourceType": "Bundle",
        "id": key,
        "meta": {"tag": [{"system": "urn:tlcompile:fhir-version", "code": FHIR_VERSION, "display": "FHIR R4B"}]},
        "type": "transaction",
        "identifier": {"system": "urn:tlcompile:fhir-bundle", "value": f"urn:uuid:{key}"},
        "timestamp": issued,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{rid}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"},
            }
            for rid, resource in entries
        ],
    }
    try:
        validated = fhir_bundle.Bundle.model_validate(raw)
    except ValueError as err:  # pydantic's ValidationError: a bug here, never the user's
        raise TlcompileError(f"the FHIR bundle of {record.get('file')} does not validate as R4B: {err}") from err
    return json.loads(validated.model_dump_json(exclude_none=True))


class FhirOutput:
    """Writes each decided record's FHIR bundle into ``folder`` (exactly once) and, with ``url``, POSTs it through the
    outbox. serve calls :meth:`write` before the record itself is written, so a crash between the two redoes the image
    and finds its bundle already there; :meth:`flush` drains the outbox."""

    def __init__(
        self,
        folder: str | Path,
        model: dict[str, str],
        *,
        url: str | None = None,
        log: Callable[[str], None] = print,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        in_records: bool = False,
        patient_id_system: str | None = None,
    ) -> None:
        _r4b()  # fail at start, not on the first image
        if url is not None:
            check_server_url(url)
        self.folder, self.model, self.url, self.log = Path(folder), model, url, log
        self.patient_id_system = patient_id_system
        self.attempts, self.backoff, self.max_backoff, self.timeout, self.sleep = (
            attempts,
            backoff,
            max_backoff,
            timeout,
            sleep,
        )
        # the outbox and sent/ (and serve's OUT/fhir, ``in_records``) are tlcompile's own folders: never a link
        for sub in ([self.folder] if in_records else []) + ([self.folder / OUTBOX, self.folder / SENT] if url else []):
            refuse_linked_folder(sub, "FHIR bundles")
        self.target = self.folder / OUTBOX if url else self.folder
        self._own_target = bool(url) or in_records
        try:
            self.target.mkdir(parents=True, exist_ok=True)
            if url:
                (self.folder / SENT).mkdir(exist_ok=True)
        except OSError as err:
            raise TlcompileError(f"--fhir folder '{self.folder}': cannot create it ({err.strerror or err})") from err
        self.written = 0  # bundles this output wrote (not those an earlier run had)
        self._failures: dict[str, tuple[int, float]] = {}  # outbox file name -> (failed tries, next try, monotonic)
        self.sent = 0

    def _existing(self, name: str) -> Path | None:
        for folder in (self.folder, self.folder / OUTBOX, self.folder / SENT):
            if (folder / name).is_file():
                return folder / name
        return None

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the bundle of one record (error records have none); returns what to add to the record."""
        if record.get("error") or record.get("referral") is None:
            return {}
        record = dict(record)
        if not record.get("sha256"):
            record["sha256"] = sha256_file(record.get("path") or record["file"])
        name = f"{bundle_key(record, self.model)}.json"
        existing = self._existing(name)
        if existing is None:
            self.written += 1
            existing = self.target / name
            if self._own_target:  # again: a link put there while serve runs (predict's --fhir itself is the user's)
                refuse_linked_folder(self.target, "FHIR bundles")
            try:
                atomic_write_text(
                    existing,
                    json.dumps(report_bundle(record, self.model, patient_id_system=self.patient_id_system), indent=1),
                )
                existing.chmod(0o644)
            except OSError as err:
                raise TlcompileError(
                    f"cannot write the FHIR bundle of {Path(str(record['file'])).name} into {self.target} "
                    f"({err.strerror or err}); stopped so that no result goes unrecorded"
                ) from err
        return {"fhir": os.path.relpath(existing, self.folder.parent)}

    def pending(self) -> list[Path]:
        return sorted((self.folder / OUTBOX).glob("*.json")) if self.url else []

    def _post(self, path: Path) -> str | None:
        """POST one bundle; None when the server took it (2xx), else why not (with what the server said, for a
        refusal: a FHIR server explains a 4xx in an OperationOutcome)."""
        request = urllib.request.Request(
            self.url,
            data=path.read_bytes(),
            method="POST",
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        )
        try:
            with _OPENER.open(request, timeout=self.timeout) as answer:
                body = answer.read(64 << 20)
                if not 200 <= answer.status < 300:
                    return f"HTTP {answer.status}"
                return _not_a_transaction_response(body, answer.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:  # urllib would repeat a POST as a GET there, and a 200 to that sent nothing
                where = printable(str(err.headers.get("Location", "?")))
                return f"HTTP {err.code}: redirected to {where}; give the server's own address as --fhir-url"
            return f"HTTP {err.code}" + _server_said(err)
        except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: http.client.InvalidURL
            return str(getattr(err, "reason", err))

    def flush(self, *, final: bool = False) -> int:
        """Send what the outbox holds and is due; ``final``: keep retrying (with backoff) until each bundle is sent or
        has had ``attempts`` tries in this run. Returns how many are still waiting (kept, sent by a later run)."""
        if not self.url:
            return 0
        while True:
            now = time.monotonic()
            waits = []
            for path in self.pending():
                tries, due = self._failures.get(path.name, (0, 0.0))
                if tries >= self.attempts:
                    if final or due > now:  # predict's one flush: the next run; serve: a new round an hour later
                        continue
                    tries = 0
                if due > now:
                    waits.append(due - now)
                    continue
                why = self._post(path)
                if why is None:
                    refuse_linked_folder(self.folder / SENT, "FHIR bundles")  # again: a link made while serve runs
                    os.replace(path, self.folder / SENT / path.name)
                    self._failures.pop(path.name, None)
                    self.sent += 1
                    continue
                tries += 1
                later = time.monotonic() + RETRY_ROUND_S
                if _refused(why):  # the same bundle would be refused again at once
                    self._failures[path.name] = (self.attempts, later)
                    when = "not retried in this run" if final else f"tried again in {RETRY_ROUND_S / 60:.0f} min"
                    self.log(f"FHIR POST of {path.name} refused by the server ({why}); {when}, kept in {OUTBOX}/")
                    continue
                delay = min(self.max_backoff, self.backoff * 2 ** (tries - 1))
                self._failures[path.name] = (tries, time.monotonic() + delay if tries < self.attempts else later)
                self.log(f"FHIR POST of {path.name} failed ({why}); try {tries} of {self.attempts}")
                if tries < self.attempts:
                    waits.append(delay)
                if not final and not why.startswith(("HTTP ", _NOT_FHIR)):
                    break  # no answer at all (down, unreachable): serve's other bundles wait for its next pass, so
                    # that a server that swallows connections does not hold the screening for a timeout per bundle
            if not final or not waits:
                break
            self.sleep(min(waits))
        left = len(self.pending())
        if final and left:
            self.log(f"{left} FHIR bundles wait in {self.folder / OUTBOX}; they are sent on the next run")
        return left
