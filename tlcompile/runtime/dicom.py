"""DICOM input: a fundus camera's Ophthalmic Photography object -> uint8 RGB + what the clinic record needs.

pydicom reads the file (``pip install 'tlcompile[dicom]'``); compressed pixel data is decoded by the plugins it
finds: pylibjpeg-libjpeg (JPEG baseline/extended/lossless), pylibjpeg-openjpeg (JPEG 2000) or Pillow. YBR_FULL and
YBR_FULL_422 are converted to RGB by pydicom itself. Nothing here parses DICOM by hand.

Only a single-frame colour photograph of modality OP (Ophthalmic Photography) is accepted: any other object gets a
:class:`DataError` that says what it is (another modality, no pixel data, several frames, a monochrome or
unconvertible photometric interpretation), so predict and serve record it as an error instead of deciding it.

Privacy: :class:`DicomInput.meta` carries the patient ID, laterality and acquisition time for the clinic record
(serve's JSON records, FHIR). Error messages name the file only, never a value from the header that identifies
the patient, and callers must not print ``meta``.
"""

from __future__ import annotations

import datetime as _dt
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.errors import DataError, MissingDependencyError
from tlcompile.runtime.terminal import printable

DICOM_EXTENSIONS = (".dcm", ".dicom")
# pydicom's own warnings on a damaged header are several lines that name no file; the outcome is that file's one-line
# error, or its photo decoded. Set once, at import, for pydicom's modules only (warnings.catch_warnings would not be
# safe across predict's worker threads).
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
OPHTHALMIC_PHOTOGRAPHY = "OP"
# Photometric interpretations pydicom hands back as RGB (the YBR ones it converts; JPEG 2000's ICT/RCT the decoder).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_INSTALL = "DICOM input needs pydicom and its JPEG decoders; install them with: pip install 'tlcompile[dicom]'"


@dataclass(frozen=True)
class DicomInput:
    rgb: np.ndarray  # uint8 HxWx3
    meta: dict[str, Any]  # patient_id, laterality, acquired_at, sop_instance_uid, ... (for the clinic record only)


# Where a DICOM file (PS3.10) says what it is: 'DICM' after its 128-byte preamble.
_MARKER_AT, _MARKER = 128, b"DICM"
# Extensions of the picture formats Pillow reads: a file named so is decoded as that, never probed for DICOM.
_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def is_dicom(path: str | Path, head: bytes | None = None) -> bool:
    """A DICOM file: named .dcm / .dicom, or, under any other name that is not a picture's (storage media name them
    IM000001 or by their UID, without an extension), 'DICM' at byte 128. ``head``: the file's first bytes when they
    were read already; else the first 132 are read here (a file that cannot be read is not DICOM here: its reader
    says why)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    if suffix in _PICTURE_SUFFIXES:
        return False
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(_MARKER_AT + len(_MARKER))
        except OSError:
            return False
    return head[_MARKER_AT : _MARKER_AT + len(_MARKER)] == _MARKER


def _pydicom(path: str | Path | None = None) -> Any:
    """pydicom, or an error: per file (DataError, so that file gets an error record) when ``path`` is given."""
    try:
        import pydicom
    except ImportError as err:
        raise (DataError(f"{path}: {_INSTALL}") if path is not None else MissingDependencyError(_INSTALL)) from err
    return pydicom


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)  # a backslash made pydicom split it: the value as the file has it
    text = str(value).strip() if value is not None else ""
    return text or None


# DICOM's DT (PS3.5 6.2): YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX], each part only after the one before it; DA:
# YYYYMMDD; TM: HH[MM[SS[.F{1,6}]]] (HH:MM:SS, of older versions of the standard, too).
_DT = re.compile(
    r"(?P<Y>\d{4})(?:(?P<m>\d{2})(?:(?P<d>\d{2})(?:(?P<H>\d{2})(?:(?P<M>\d{2})(?:(?P<S>\d{2})"
    r"(?P<f>\.\d{1,6})?)?)?)?)?)?(?P<z>[+-]\d{4})?"
)
_DA = re.compile(r"(?P<Y>\d{4})(?P<m>\d{2})(?P<d>\d{2})")
_TM = re.compile(r"(?P<H>\d{2})(?::?(?P<M>\d{2})(?::?(?P<S>\d{2})(?P<f>\.\d{1,6})?)?)?")
_ZONE = re.compile(r"[+-]\d{4}")


def _iso(parts: dict[str, str | None], zone: str | None) -> str:
    """ISO 8601 with the precision the header gave (a year, a month, a day, or a time: FHIR's dateTime precisions, a
    time to the second, its missing minutes and seconds as 00); ValueError for a day or time that does not exist."""
    year, month, day = parts["Y"], parts.get("m"), parts.get("d")
    if month is None:
        return str(year)
    if not 1 <= int(month) <= 12:
        raise ValueError(f"month {month}")
    if day is None:
        return f"{year}-{month}"
    date = _dt.date(int(year), int(month), int(day))  # type: ignore[arg-type]
    if parts.get("H") is None:
        return date.isoformat()
    fraction = parts.get("f") or ""
    clock = _dt.time(int(parts["H"]), int(parts.get("M") or 0), int(parts.get("S") or 0))  # type: ignore[arg-type]
    text = f"{date.isoformat()}T{clock.isoformat()}{fraction}"
    if zone:
        sign, hours, minutes = zone[0], int(zone[1:3]), int(zone[3:5])
        if hours > 14 or minutes > 59:
            raise ValueError(f"time zone {zone}")
        text += f"{sign}{hours:02d}:{minutes:02d}"
    return text


def _acquired_at(ds: Any) -> str | None:
    """When the photograph was taken, ISO 8601 with the precision the header gives: AcquisitionDateTime, else
    AcquisitionDate + AcquisitionTime, else ContentDate + ContentTime; the first of them that is a valid DICOM
    value (a camera that writes '2024-03-15T10:11:12' into a DT has not written a DICOM date: pydicom reads the year
    of it, and the record would say 1 January). A time zone comes from the DT itself or from TimezoneOffsetFromUTC;
    without one it is the camera's local time. None when no field holds a valid date: a malformed date is not worth
    refusing the photograph for."""
    header_zone = _text(ds, "TimezoneOffsetFromUTC")
    zone = header_zone if header_zone and _ZONE.fullmatch(header_zone) else None
    if (raw := _text(ds, "AcquisitionDateTime")) is not None and (match := _DT.fullmatch(raw)):
        try:
            return _iso(match.groupdict(), match["z"] or zone)
        except ValueError:
            pass
    for date_key, time_key in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
        if (date := _text(ds, date_key)) is None or not (day := _DA.fullmatch(date)):
            continue
        clock = _text(ds, time_key)
        at = _TM.fullmatch(clock) if clock else None
        try:
            return _iso({**day.groupdict(), **(at.groupdict() if at else {})}, zone)
        except ValueError:
            continue
    return None


def _issuer_item(ds: Any) -> Any:
    """The first item of the PatientID's IssuerOfPatientIDQualifiersSequence (PS3.3 C.7.1.1), or None."""
    try:
        return ds.get("IssuerOfPatientIDQualifiersSequence")[0]
    except (TypeError, IndexError, AttributeError, KeyError, ValueError):
        return None


def _issuer_uri(item: Any) -> str | None:
    """The register of the PatientID as a URI, from its qualifiers' UniversalEntityID: an ISO OID -> urn:oid:..., a
    UUID -> urn:uuid:..., a URI as it is; None when absent or of another type. FHIR checks it is a URI before it
    becomes an Identifier.system (:func:`tlcompile.runtime.fhir.report_bundle`)."""
    value = str(item.get("UniversalEntityID") or "").strip() if item is not None else ""
    kind = str(item.get("UniversalEntityIDType") or "").strip().upper() if item is not None else ""
    return {"ISO": f"urn:oid:{value}", "UUID": f"urn:uuid:{value.lower()}", "URI": value}.get(kind) if value else None


def _issuer_named(item: Any) -> str | None:
    """How the qualifiers name the ID's register, whatever its type ('DNS hospb.example.org', or only through
    AssigningFacilitySequence, a jurisdiction or agency code): a file that names one is never given the site's
    register (FHIR)."""
    if item is None:
        return None
    try:
        if value := str(item.get("UniversalEntityID") or "").strip():
            return f"{str(item.get('UniversalEntityIDType') or '').strip() or '?'} {value}"
        named = sorted(e.keyword or str(e.tag) for e in item if not e.is_empty)
    except (TypeError, AttributeError, KeyError, ValueError):
        return None
    return "qualifiers: " + ", ".join(named) if named else None


def header_meta(ds: Any) -> dict[str, Any]:
    """The fields the clinic record carries. ``patient_id`` identifies a person: records and FHIR only."""
    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    return {
        "patient_id": _text(ds, "PatientID"),
        "patient_id_issuer": _text(ds, "IssuerOfPatientID"),  # whose ID it is: the hospital or system that gave it
        "patient_id_system": _issuer_uri(issuer := _issuer_item(ds)),
        "patient_id_register": _issuer_named(issuer),
        "laterality": laterality.upper() if laterality else None,  # R, L (B both, U unpaired)
        "acquired_at": _acquired_at(ds),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "modality": _text(ds, "Modality"),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")) or None
        if getattr(ds, "file_meta", None) is not None
        else None,
    }


def read_header(path: str | Path) -> Any:
    """The dataset without its pixel data (for listing a training folder); DataError when it is not DICOM."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError as err:
        raise DataError(f"{path}: DICOM file not found") from err
    except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a DICOM file pydicom can read ({type(err).__name__})") from err


def _int(ds: Any, keyword: str, default: int, path: str | Path) -> int:
    """A whole-number header field (IS or US), or DataError naming it: one file's bad header is that file's error."""
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError) as err:
        shown = printable(str(value)[:40])
        raise DataError(
            f"{path}: DICOM {keyword} '{shown}' is not a whole number; not an image this reader decodes"
        ) from err


def read_dicom(path: str | Path, *, data: bytes | None = None, max_pixels: int | None = None) -> DicomInput:
    """Decode one DICOM fundus photograph to uint8 RGB with its header fields. Raises :class:`DataError` naming the
    file (and what it is instead) for anything that is not a single-frame colour OP image; ``max_pixels`` refuses a
    header that asks for more before anything is decompressed.

    Whatever a crafted or damaged file makes pydicom raise is that file's DataError too (predict and serve go on with
    the other photos): the message names the file and the error's type, never a header value, which may identify the
    patient."""
    try:
        return _read_dicom(path, data=data, max_pixels=max_pixels)
    except DataError:
        raise
    except RecursionError as err:
        raise DataError(f"{path}: DICOM header is nested too deeply to read (sequences within sequences)") from err
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, LookupError) as err:
        raise DataError(f"{path}: cannot read the DICOM header ({type(err).__name__} in a header field)") from err


def _read_dicom(path: str | Path, *, data: bytes | None, max_pixels: int | None) -> DicomInput:
    pydicom = _pydicom(path)
    source: Any = io.BytesIO(data) if data is not None else path
    try:
        ds = pydicom.dcmread(source)
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except pydicom.errors.InvalidDicomError as err:
        raise DataError(f"{path}: not a DICOM file (no DICM preamble; empty, wrong format or corrupt)") from err
    except EOFError as err:
        raise DataError(f"{path}: DICOM file is truncated (unexpected end of file in the header)") from err
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: cannot read the DICOM header ({type(err).__name__}: {err})") from err
    modality = _text(ds, "Modality")
    if modality != OPHTHALMIC_PHOTOGRAPHY:
        raise DataError(
            f"{path}: DICOM modality '{modality or '(none)'}' is not Ophthalmic Photography "
            f"({OPHTHALMIC_PHOTOGRAPHY}); not a fundus photograph"
        )
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{path}: DICOM object has no pixel data (a report or a header only); not a photograph")
    frames = _int(ds, "NumberOfFrames", 1, path)
    if frames != 1:
        raise DataError(f"{path}: DICOM image has {frames} frames; valid: a single-frame fundus photograph")
    photometric = _text(ds, "PhotometricInterpretation") or "(none)"
    samples = _int(ds, "SamplesPerPixel", 1, path)
    if samples != 3 or photometric not in _COLOUR:
        raise DataError(
            f"{path}: DICOM photometric interpretation {photometric} with {samples} sample(s) per pixel is not a "
            f"colour photograph this reader converts; valid: {', '.join(_COLOUR)} with 3 samples"
        )
    rows, cols = _int(ds, "Rows", 0, path), _int(ds, "Columns", 0, path)
    if max_pixels is not None and rows * cols > max_pixels:
        raise DataError(
            f"{path}: image is too large to decode safely ({cols}x{rows}; limit {max_pixels / 1e6:.0f} Mpx); "
            "not a fundus photograph"
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")
    syntax_name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
    try:
        arr = ds.pixel_array  # YBR_FULL / YBR_FULL_422 come back as RGB
    except NotImplementedError as err:
        raise DataError(f"{path}: no decoder for {syntax_name} ({_INSTALL})") from err
    except (EOFError, ValueError, RuntimeError, OSError, KeyError, TypeError, AttributeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        cut = re.search(r"less than expected|shorter|end of|truncat", message, re.IGNORECASE)
        what = "is truncated" if cut else "cannot be decoded"
        raise DataError(f"{path}: DICOM pixel data {what} ({syntax_name}: {message})") from err
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"{path}: decoded DICOM pixel data has shape {arr.shape}; valid: rows x columns x 3")
    if arr.dtype != np.uint8:
        bits = _int(ds, "BitsStored", 8, path)
        peak = float((1 << bits) - 1) if 0 < bits <= 16 else float(arr.max() or 1)
        arr = np.clip(arr.astype(np.float64) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    return DicomInput(rgb=np.ascontiguousarray(arr), meta=header_meta(ds))
