"""DICOM test files written with pydicom (never by hand): Ophthalmic Photography fundus images, uncompressed or with
an encapsulated Pillow-made JPEG baseline / JPEG 2000 codestream, and the broken kinds a camera folder can hold."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PATIENT_ID = "PAT-7731-SECRET"  # tests assert this never reaches a log, a terminal or a build report
OP_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage


def write_dicom(
    path: Path,
    rgb: np.ndarray | None,
    *,
    compression: str | None = None,  # None | "jpeg" | "jpeg2000"
    modality: str = "OP",
    patient_id: str = PATIENT_ID,
    laterality: str = "R",
    acquired: str = "20240311093015",
    frames: int = 1,
    sop_uid: str | None = None,
) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OP_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    syntax = {None: ExplicitVRLittleEndian, "jpeg": JPEGBaseline8Bit, "jpeg2000": JPEG2000Lossless}[compression]
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = OP_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.ImageLaterality = laterality
    ds.AcquisitionDateTime = acquired
    if rgb is not None:
        h, w = rgb.shape[:2]
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel = 3
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if compression is None:
            ds.PhotometricInterpretation = "RGB"
            ds.PixelData = np.ascontiguousarray(np.stack([rgb] * frames) if frames > 1 else rgb).tobytes()
        else:
            buffer = io.BytesIO()
            if compression == "jpeg":
                Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)  # YCbCr 4:2:0 inside
                ds.PhotometricInterpretation = "YBR_FULL_422"
                ds.LossyImageCompression = "01"
            else:
                Image.fromarray(rgb).save(buffer, format="JPEG2000", irreversible=False)
                ds.PhotometricInterpretation = "YBR_RCT"
            ds.PixelData = encapsulate([buffer.getvalue()] * frames)
            ds["PixelData"].is_undefined_length = True
            ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def fundus_rgb(seed: int = 3, size: int = 96, n: int = 1) -> list[np.ndarray]:
    from tlcompile.data.synthetic import generate

    images, _ = generate(n, seed=seed, size=size)
    return [np.asarray(im, dtype=np.uint8) for im in images]


def write_test_set(folder: Path) -> dict[str, Path]:
    """Every kind the DICOM tests need, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = fundus_rgb()[0]
    files = {
        "uncompressed": write_dicom(folder / "uncompressed.dcm", rgb),
        "jpeg": write_dicom(folder / "jpeg_baseline.dcm", rgb, compression="jpeg"),
        "jpeg2000": write_dicom(folder / "jpeg2000.dcm", rgb, compression="jpeg2000"),
        "bad_modality": write_dicom(folder / "ct_modality.dcm", rgb, modality="CT"),
        "no_pixels": write_dicom(folder / "no_pixel_data.dcm", None),
        "multi_frame": write_dicom(folder / "multi_frame.dcm", rgb, frames=2),
    }
    whole = files["uncompressed"].read_bytes()
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(whole[: len(whole) // 2])
    files["truncated"] = truncated
    return files
