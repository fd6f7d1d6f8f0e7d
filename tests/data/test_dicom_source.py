"""The `dicom` data source: a folder of DICOM fundus photographs with a label CSV keyed by SOPInstanceUID or file
name; patients come from PatientID (pseudonymised), and no patient ID reaches the build's files or its log."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("pydicom")

from tests.runtime.dicom_files import PATIENT_ID, fundus_rgb, write_dicom  # noqa: E402


def _dicom_dataset(root, n_patients=30):
    from tlcompile.data.synthetic import generate

    folder = root / "dicom"
    folder.mkdir(parents=True)
    images, grades = generate(2 * n_patients, seed=5, size=64)
    rows = ["file,grade"]
    for i, (image, grade) in enumerate(zip(images, grades, strict=True)):
        uid = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
        path = write_dicom(
            folder / f"img{i:03d}.dcm",
            image,
            compression="jpeg" if i % 3 == 0 else None,
            patient_id=f"{PATIENT_ID}-{i // 2}",  # both eyes of a patient
            laterality="RL"[i % 2],
            sop_uid=uid,
        )
        rows.append(f"{uid if i % 2 else path.name},{int(grade)}")  # keyed by UID or by file name
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_dicom_source_lists_records_grouped_by_pseudonymised_patient(tmp_path):
    from tlcompile.data.sources import list_records, pseudonym
    from tlcompile.recipe import DataConfig

    root = _dicom_dataset(tmp_path, n_patients=4)
    listing = list_records(DataConfig(source="dicom", root=root))
    assert not listing.problems and len(listing.records) == 8
    assert {r.patient for r in listing.records} == {pseudonym(f"{PATIENT_ID}-{k}") for k in range(4)}
    assert all(PATIENT_ID not in r.patient for r in listing.records)
    assert "PatientID" in listing.patient_rule
    assert fundus_rgb  # the helper module is importable from here


def test_dicom_source_tiny_build_keeps_patient_ids_out_of_reports_and_logs(tmp_path):
    from rich.console import Console

    from tlcompile.build import build
    from tlcompile.recipe import validate_recipe_dict

    root = _dicom_dataset(tmp_path / "data")
    recipe = validate_recipe_dict(
        {
            "name": "tiny-dicom",
            "data": {"source": "dicom", "root": str(root), "image_size": 48, "split": {"val": 0.2, "test": 0.25}},
            "model": {"arch": "cbr_small"},
            "train": {"epochs": 1, "batch_size": 16},
            "export": {"formats": ["onnx"], "parity_images": 4},
            "bench": {"runtimes": ["onnxruntime"], "warmup": 1, "iterations": 2},
            "evaluate": {"bootstrap_resamples": 100},
            # No heatmaps (9 s of RISE at this size): they are named and captioned with the same pseudonymous ids
            # as splits.csv and the report, which the leak check below reads.
            "bundle": {"golden_samples": 2, "explain_images": 0},
        }
    )
    log = io.StringIO()
    out = tmp_path / "build"
    result = build(recipe, out, console=Console(file=log, width=200))
    import json

    summary = json.loads((out / "01_data" / "summary.json").read_text())
    assert summary["patients_in_two_splits"] == 0 and result.report["data"]["images"] == 60
    assert "patient-" in (out / "01_data" / "splits.csv").read_text()  # grouped by the pseudonym
    assert PATIENT_ID not in log.getvalue()
    leaks = []
    for path in out.rglob("*"):
        if path.is_file() and PATIENT_ID.encode() in path.read_bytes():
            leaks.append(str(path.relative_to(out)))
    assert not leaks, leaks
