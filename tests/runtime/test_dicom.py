"""DICOM input: what predict and serve do with each kind of DICOM file a camera folder can hold; the patient ID
reaches the record, never the terminal or the log."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("pydicom")

from tests.runtime.dicom_files import PATIENT_ID, write_test_set  # noqa: E402
from tlcompile.errors import DataError  # noqa: E402
from tlcompile.runtime.preprocess import read_image, read_input  # noqa: E402

ERRORS = {
    "bad_modality": "modality 'CT' is not Ophthalmic Photography (OP)",
    "no_pixels": "has no pixel data",
    "multi_frame": "has 2 frames",
    "truncated": "truncated",
}


def _has_decoder(kind: str) -> bool:
    mod = {"jpeg": "libjpeg", "jpeg2000": "openjpeg"}.get(kind)
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def test_each_dicom_kind_decodes_or_says_why(tmp_path):
    files = write_test_set(tmp_path)
    reference, meta = read_input(files["uncompressed"])
    assert reference.shape == (96, 96, 3) and reference.dtype == np.uint8
    assert meta["patient_id"] == PATIENT_ID and meta["laterality"] == "R"
    assert meta["acquired_at"] == "2024-03-11T09:30:15" and meta["modality"] == "OP"
    for kind in ("jpeg", "jpeg2000"):
        if not _has_decoder(kind):
            continue
        rgb, meta = read_input(files[kind])
        # JPEG baseline (YBR_FULL_422, converted to RGB by pydicom) is lossy; JPEG 2000 lossless is exact.
        diff = np.abs(rgb.astype(int) - reference.astype(int)).mean()
        assert diff < (4 if kind == "jpeg" else 0.01), (kind, diff)
        assert meta["patient_id"] == PATIENT_ID
    assert read_image(files["uncompressed"])[1] == (96, 96)  # the training path reads DICOM too
    for kind, message in ERRORS.items():
        with pytest.raises(DataError) as err:
            read_input(files[kind])
        text = str(err.value)
        assert text.startswith(f"{files[kind]}: ") and message in text, text
        assert PATIENT_ID not in text


def test_predict_dicom_folder_without_torch(bundle_copy, tmp_path, run_cli):
    """predict takes .dcm files from a folder on a box without torch: a decision for each photograph, an error row
    for each other DICOM object, and the patient ID nowhere on the terminal."""
    files = write_test_set(tmp_path / "camera")
    out_csv = tmp_path / "out.csv"
    camera = str(tmp_path / "camera")
    cli = run_cli("predict", str(bundle_copy), camera, "--csv", str(out_csv), block_train_modules=True)
    assert cli.returncode == 1, cli.stdout + cli.stderr  # the four broken files
    assert "Traceback" not in cli.stderr and cli.stdout.endswith("ATTEMPTED:\n")
    assert PATIENT_ID not in cli.stdout + cli.stderr
    rows = {row["file"]: row for row in csv.DictReader(out_csv.open())}
    assert set(rows) == {str(p) for p in files.values()}
    for kind in ("uncompressed", "jpeg", "jpeg2000"):
        if _has_decoder(kind):
            assert rows[str(files[kind])]["referral"] in ("refer", "no referral", "ungradable"), rows[str(files[kind])]
            assert rows[str(files[kind])]["error"] == ""
    for kind, message in ERRORS.items():
        assert message in rows[str(files[kind])]["error"]
    assert PATIENT_ID not in out_csv.read_text()  # the CSV keeps its columns; the patient goes to records and FHIR


def test_serve_records_carry_the_dicom_fields_but_the_log_does_not(tiny_build, tmp_path, quick_retries):
    from tlcompile.runtime.serve import serve

    watch = tmp_path / "camera"
    files = write_test_set(watch)
    lines: list[str] = []
    stats = serve(tiny_build.bundle, watch, tmp_path / "out", once=True, settle=0, log=lines.append)
    assert stats.results == 3 and stats.errors == 4, (stats, lines)
    assert PATIENT_ID not in "\n".join(lines)
    record = json.loads((tmp_path / "out" / "jpeg_baseline.dcm.json").read_text())
    assert record["dicom"]["patient_id"] == PATIENT_ID and record["dicom"]["laterality"] == "R"
    assert record["dicom"]["acquired_at"] == "2024-03-11T09:30:15"
    for kind, message in ERRORS.items():
        error = json.loads((tmp_path / "out" / "errors" / f"{files[kind].name}.json").read_text())
        assert error["status"] == "error" and message in error["error"]


def _rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom's, on the value this test writes
def test_a_header_field_that_is_not_a_number_is_that_files_error_not_the_runs(tmp_path):
    """NumberOfFrames 'ab' raised int()'s ValueError out of predict, and the other photos' results were lost."""
    from tests.runtime.dicom_files import write_dicom

    path = write_dicom(tmp_path / "frames.dcm", _rgb(), frames=1)
    # NumberOfFrames (0028,0008) IS "1 " inserted before Rows (0028,0010), then its value made "ab" byte by byte
    # (pydicom refuses to write it)
    raw = path.read_bytes()
    rows = raw.index(b"\x28\x00\x10\x00US")
    path.write_bytes(raw[:rows] + b"\x28\x00\x08\x00IS\x02\x00ab" + raw[rows:])
    with pytest.raises(DataError, match=r"frames\.dcm: DICOM NumberOfFrames 'ab' is not a whole number"):
        read_input(path)


def test_a_header_nested_too_deeply_for_pydicom_is_that_files_error(tmp_path):
    """Sequences within sequences, deeper than Python's recursion limit: RecursionError escaped predict."""
    from tests.runtime.dicom_files import write_dicom

    path = write_dicom(tmp_path / "deep.dcm", _rgb())
    # an undefined-length SQ (ScheduledProtocolCodeSequence, 0040,0008) opening an item with another inside, 5000 deep
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    sq = b"\x40\x00\x08\x00SQ\x00\x00\xff\xff\xff\xff"
    path.write_bytes(path.read_bytes() + (sq + item) * 5000)
    with pytest.raises(DataError, match=r"deep\.dcm: (DICOM header is nested too deeply|cannot read the DICOM)"):
        read_input(path)


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"AcquisitionDateTime": "20240311093015"}, "2024-03-11T09:30:15"),
        ({"AcquisitionDateTime": "2024"}, "2024"),  # a year stays a year, not 1 January at midnight
        ({"AcquisitionDateTime": "202403"}, "2024-03"),
        ({"AcquisitionDateTime": "20240311"}, "2024-03-11"),
        ({"AcquisitionDateTime": "20240311093015.25+0100"}, "2024-03-11T09:30:15.25+01:00"),
        ({"AcquisitionDateTime": "202403110930", "TimezoneOffsetFromUTC": "-0500"}, "2024-03-11T09:30:00-05:00"),
        # not DICOM's DT: pydicom read the year of it, and the record said 2024-01-01T00:00:00
        (
            {"AcquisitionDateTime": "2024-03-11T09:30:15", "ContentDate": "20240311", "ContentTime": "0930"},
            "2024-03-11T09:30:00",
        ),
        ({"AcquisitionDateTime": "2024-03-11T09:30:15"}, None),
        ({"AcquisitionDate": "20240231", "ContentDate": "20240301"}, "2024-03-01"),  # no 31 February
        ({"AcquisitionDate": "20240311", "AcquisitionTime": "09:30:15"}, "2024-03-11T09:30:15"),  # older TM form
        ({"AcquisitionDate": "20240311", "AcquisitionTime": "late"}, "2024-03-11"),
    ],
)
def test_the_acquisition_time_keeps_the_headers_precision_and_skips_what_is_not_a_dicom_date(fields, expected):
    import warnings

    from pydicom.dataset import Dataset

    from tlcompile.runtime.dicom import _acquired_at
    from tlcompile.runtime.fhir import _fhir_datetime

    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid values it is given here
        for key, value in fields.items():
            setattr(ds, key, value)
        assert _acquired_at(ds) == expected
    if expected is not None and "T" not in expected:
        assert _fhir_datetime(expected) == expected  # FHIR's dateTime has a year, a month and a day as precisions


def test_a_dicom_file_without_an_extension_is_read_by_its_marker_and_a_folder_says_what_it_left_out(tmp_path):
    """Storage media name DICOM files IM000001 or by their UID: they got 'not an image Pillow can read', and a folder
    of them 'no image files'; a mixed folder passed them over without a word."""
    from tests.runtime.dicom_files import write_dicom
    from tlcompile.runtime.dicom import is_dicom
    from tlcompile.runtime.predict import expand_inputs

    folder = tmp_path / "DICOM"
    folder.mkdir()
    named = write_dicom(folder / "IM000001", _rgb())
    uid = write_dicom(folder / "1.2.840.113619.2.55", _rgb())
    rgb, meta = read_input(named)
    assert rgb.shape == (32, 32, 3) and meta["patient_id"] == PATIENT_ID
    assert is_dicom(uid) and is_dicom(named, named.read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    (folder / "photo.webp").write_bytes(b"RIFF")
    (folder / "2024-03-11").mkdir()
    fake = folder / "x.jpg"
    fake.write_bytes(named.read_bytes())  # a picture's name is never probed: decoded (and refused) as a JPEG
    assert not is_dicom(fake)
    skipped: list[str] = []
    assert expand_inputs([folder], skipped) == sorted([uid, named, fake])
    assert skipped == [
        f"note: not decided in {folder}: 2 files that are not an image (notes.txt, photo.webp; extensions: "
        ".png, .jpg, .jpeg, .tif, .tiff, .bmp, .dcm, .dicom) and 1 sub-folder (not searched: name them to decide "
        "theirs)"
    ]


@pytest.mark.parametrize(
    "qualifier, expected",
    [
        (
            {"UniversalEntityID": "1.2.826.0.1.3680043.2", "UniversalEntityIDType": "ISO"},
            "urn:oid:1.2.826.0.1.3680043.2",
        ),
        (
            {"UniversalEntityID": "6E8A5F7C-1B2D-4C3E-8F9A-0B1C2D3E4F5A", "UniversalEntityIDType": "UUID"},
            "urn:uuid:6e8a5f7c-1b2d-4c3e-8f9a-0b1c2d3e4f5a",
        ),
        (
            {"UniversalEntityID": "https://eye.example.org/mrn", "UniversalEntityIDType": "URI"},
            "https://eye.example.org/mrn",
        ),
        ({"UniversalEntityID": "EYE-CLINIC", "UniversalEntityIDType": "DNS"}, None),  # no URI of that type
        ({"UniversalEntityIDType": "ISO"}, None),
        (None, None),
    ],
)
def test_the_register_of_the_patient_id_is_read_as_a_uri(qualifier, expected):
    """IssuerOfPatientIDQualifiersSequence names the register of the PatientID (PS3.3 C.7.1.1): the FHIR identifier's
    system, which a server needs to match the ID to its Patient."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from tlcompile.runtime.dicom import header_meta

    ds = Dataset()
    ds.PatientID = "PAT-1"
    if qualifier is not None:
        item = Dataset()
        for key, value in qualifier.items():
            setattr(item, key, value)
        ds.IssuerOfPatientIDQualifiersSequence = Sequence([item])
    assert header_meta(ds)["patient_id_system"] == expected


def test_a_patient_id_with_a_backslash_is_the_text_the_file_has():
    """PatientID 'MRN 12\\3' (a backslash: invalid in LO) reached FHIR as "['MRN 12', '3']" (found outside-in)."""
    import warnings

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from tlcompile.runtime.dicom import header_meta

    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientID = "MRN 12\\3"
    item = Dataset()
    item.UniversalEntityID, item.UniversalEntityIDType = "hospb.example.org", "DNS"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([item])
    meta = header_meta(ds)
    assert meta["patient_id"] == "MRN 12\\3"
    # named, though not as a URI: no system, and no site system either (FHIR)
    assert meta["patient_id_system"] is None and meta["patient_id_register"] == "DNS hospb.example.org"


def test_an_issuer_named_by_its_facility_only_is_named_all_the_same():
    """Review: a qualifier naming the issuer through AssigningFacilitySequence (no UniversalEntityID) let the site's
    register be given to another hospital's ID."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from tlcompile.runtime.dicom import header_meta

    facility = Dataset()
    facility.LocalNamespaceEntityID = "HOSP-B"
    item = Dataset()
    item.AssigningFacilitySequence = Sequence([facility])
    ds = Dataset()
    ds.PatientID = "12345"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([item])
    meta = header_meta(ds)
    assert meta["patient_id_system"] is None and meta["patient_id_register"] == "qualifiers: AssigningFacilitySequence"
