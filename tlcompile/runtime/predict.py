"""``tlcompile predict``: referral decision, grade and probability per image through a bundle (never imports torch).

Every image goes through the bundle's own preprocessing spec and :func:`prepare_image`, the function the model
was trained and validated with. An image where no field of view is found is flagged ungradable and gets no
referral decision: the model was never validated on such frames, and a clinic should retake or refer them. The
same holds for a field too small to grade (a thumbnail: :func:`tlcompile.runtime.screen.too_small_reason`,
"resolution too low" and the advice to send the full-resolution photo), a field that is not fundus-like (an ordinary
photo: :func:`tlcompile.runtime.screen.not_fundus_reason`; ``ungradable_reason`` says why) and a photo that fails the
bundle's image-quality gate (out of focus, too dark, over-exposed ...: :mod:`tlcompile.runtime.quality`; the reasons
and "retake"). A decoded image that looks damaged (a large flat block, how a decoder fills lost data) is an error,
like a file that does not decode.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.errors import DataError, TlcompileError
from tlcompile.io import atomic_write_text
from tlcompile.runtime import dicom
from tlcompile.runtime.bundle import UNGRADABLE, Bundle
from tlcompile.runtime.inference import InferenceSession
from tlcompile.runtime.outputs import check_parent_writable, refuse_inside_bundle
from tlcompile.runtime.pipeline import check_workers, ordered
from tlcompile.runtime.preprocess import IMAGE_EXTENSIONS, prepare_with_field, read_input, to_input
from tlcompile.runtime.screen import damage_reason, not_fundus_reason, too_small_reason
from tlcompile.runtime.terminal import printable

CSV_COLUMNS = (
    "file",
    "referral",
    "referable_dr",
    "referable_dr_probability",
    "threshold",
    "grade",
    "grade_name",
    "grade_probability",
    "ungradable",
    "fov_found",
    "error",
    "ungradable_reason",
    "quality_score",
    "quality_reasons",
    "explanation",
)
# Headers an earlier tlcompile wrote: such a results CSV is still recognised as ours (and may be replaced).
EARLIER_CSV_COLUMNS = (CSV_COLUMNS[: CSV_COLUMNS.index("quality_score")],)


@dataclass
class ImageResult:
    """One image's outcome; ``error`` is set (and nothing else) when the file could not be read."""

    file: str
    referral: str | None = None  # refer | no referral | ungradable; None on error
    referable_dr: bool | None = None
    referable_dr_probability: float | None = None
    threshold: float | None = None
    grade: int | None = None
    grade_name: str | None = None
    grade_probability: float | None = None
    ungradable: bool | None = None
    fov_found: bool | None = None
    error: str | None = None
    latency_ms: float | None = None  # preprocessing + inference on this box
    # why no decision: no field of view, resolution too low, not a fundus photograph, poor quality
    ungradable_reason: str | None = None
    # The bundle's image-quality gate (runtime/quality.py): its score (0-1, >= 0.5 passes) and the failed measures
    # ('focus;brightness'; 'field': no field of view; 'resolution' first: the field is too small for the measures to
    # mean much, see screen.too_small_reason); None for a bundle without a gate.
    quality_score: float | None = None
    quality_reasons: str | None = None
    explanation: str | None = None  # --explain: the heatmap PNG's file name (none for ungradable images)
    # A DICOM input's header fields (patient_id, laterality, acquired_at, ...): for the clinic record (serve's JSON,
    # FHIR), never printed. Absent from to_dict() for other files.
    dicom: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["dicom"] is None:
            del d["dicom"]
        return d


@dataclass
class PreparedImage:
    """One photo read, checked and preprocessed, waiting for the model: ``x`` is its network input, None when it is
    ungradable (``result`` then holds the whole outcome)."""

    result: ImageResult
    x: np.ndarray | None
    seconds: float  # spent preparing it (decode, checks, preprocessing)


def prepare_photo(bundle: Bundle, path: Path) -> PreparedImage:
    """Everything before the model: decode, damage and fundus checks, the bundle's preprocessing. Safe to run in
    several threads at once. Raises :class:`DataError` (naming the file) when it cannot be decoded."""
    t0 = time.perf_counter()
    spec = bundle.preprocessing
    rgb, source = read_input(path, draft_size=spec.size * 2)  # the input hook: image or DICOM -> RGB + metadata
    damaged = damage_reason(rgb)
    if damaged:
        raise DataError(f"{path}: {damaged}")
    prepared, found = prepare_with_field(rgb, spec)  # the field it cropped to (also looked for without cropping)
    small = too_small_reason(found, spec.size, rgb.shape)
    if found is None:
        reason = "no field of view found: retake or refer"
    else:
        reason = small or not_fundus_reason(rgb, found)
    fov_found = reason is None
    result = ImageResult(
        file=str(path),
        threshold=bundle.threshold,
        fov_found=fov_found,
        ungradable=not fov_found,
        ungradable_reason=reason,
        dicom=source,
    )
    gate = bundle.quality_gate
    if gate is not None:
        quality = gate.assess(rgb, found)
        codes = ("resolution", *quality.reasons) if small else quality.reasons  # what the gate measured, upsampled
        result.quality_score, result.quality_reasons = quality.score, ";".join(codes)
        if fov_found and not quality.gradable:
            fov_found = False
            result.ungradable, result.ungradable_reason = True, quality.sentence(gate.limits)
        elif found is not None and reason and not small and not quality.gradable:
            # A strongly over-exposed or half-occluded fundus photo can also fail the fundus check (washed-out colour,
            # a surround that is not dark): the gate's reasons say what a retake should fix.
            result.ungradable_reason = f"{reason} (image quality: {quality.words()})"
    x = to_input(prepared, spec) if fov_found else None
    if x is None:
        result.referral = UNGRADABLE
    return PreparedImage(result=result, x=x, seconds=time.perf_counter() - t0)


def decide(bundle: Bundle, session: InferenceSession, prepared: PreparedImage) -> ImageResult:
    """The model's reading of a prepared photo (one thread at a time: a session's request is not shared)."""
    t0 = time.perf_counter()
    result = prepared.result
    if prepared.x is not None:
        reading = bundle.interpret(session.run(prepared.x))[0]
        for key, value in reading.to_dict().items():
            setattr(result, key, value)
    result.latency_ms = round((prepared.seconds + time.perf_counter() - t0) * 1e3, 3)
    return result


def predict_image(bundle: Bundle, session: InferenceSession, path: Path) -> ImageResult:
    """Decide one image. Raises :class:`DataError` (naming the file) when it cannot be decoded."""
    return decide(bundle, session, prepare_photo(bundle, path))


def _prepare_or_error(bundle: Bundle, path: Path) -> PreparedImage | DataError:
    try:
        return prepare_photo(bundle, path)
    except DataError as err:
        return err


def predict_paths(
    bundle: Bundle,
    session: InferenceSession,
    paths: Iterable[Path],
    *,
    workers: int | None = 1,
    explain: Callable[[Path, PreparedImage], str | None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[ImageResult]:
    """Decide every image, in the order given; an unreadable file gets a result with ``error`` set and the others go
    on. ``workers`` (None: one per core, see :func:`tlcompile.runtime.pipeline.default_workers`) threads decode and
    preprocess ahead while this thread runs the model. ``explain(path, prepared)`` (``--explain``) runs after each
    decision and returns the heatmap's file name for the ``explanation`` column; a heatmap that cannot be written (a
    full disk, a file that appeared in its place) costs that heatmap, never the decision: its ``explanation`` stays
    empty, ``warn`` (default: stderr) gets one line naming the image, and the others go on."""
    say = warn or (lambda line: print(line, file=sys.stderr))
    results = []
    for path, prepared in ordered(lambda p: _prepare_or_error(bundle, p), paths, check_workers(workers)):
        if isinstance(prepared, DataError):
            results.append(ImageResult(file=str(path), error=str(prepared)))
        else:
            results.append(decide(bundle, session, prepared))
            if explain is not None:
                try:
                    results[-1].explanation = explain(path, prepared)
                except (TlcompileError, OSError) as err:  # the heatmap's own failures; a bug keeps its traceback
                    message = str(err).splitlines()[0] if str(err) else type(err).__name__
                    say(f"warning: {path}: no heatmap ({message}); its decision stands")
    return results


def expand_inputs(items: Iterable[str | Path], skipped: list[str] | None = None) -> list[Path]:
    """Files as given; a folder gives its image files (by extension, or DICOM files by their DICM marker whatever
    their name; sorted, not recursive). A file named twice (twice over, or also through its folder or a link) is
    decided once, where it first appears. ``skipped``, when given, gets one line per folder that held files or
    sub-folders it left out (nothing in a folder is passed over without a word)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found, others, folders = [], [], []
            for p in sorted(path.iterdir()):
                if p.name.startswith("."):  # hidden: a system's own files (.DS_Store, ._IMG_0001.jpg), not photos
                    continue
                if p.is_dir():
                    folders.append(p.name)
                elif p.is_file() and (p.suffix.lower() in IMAGE_EXTENSIONS or dicom.is_dicom(p)):
                    found.append(p)
                elif p.exists() and not p.is_file():
                    others.append(f"{p.name}: not a regular file")  # a pipe, socket or device
                else:
                    others.append(p.name)
            if not found:
                raise DataError(
                    f"{path}: no image files in this folder (extensions: {', '.join(IMAGE_EXTENSIONS)}, or DICOM "
                    "files by their DICM marker)"
                )
            if skipped is not None and (others or folders):
                skipped.append(_skipped_line(path, others, folders))
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise DataError(f"{path}: not a regular file (a pipe, socket or device); give image files or folders")
        else:
            raise DataError(f"{path}: no such file or folder; give image files or folders of images")
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if (real := path.resolve()) not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def _skipped_line(folder: Path, files: list[str], folders: list[str]) -> str:
    parts = []
    if files:
        names = ", ".join(printable(n) for n in files[:3]) + (", ..." if len(files) > 3 else "")
        parts.append(f"{len(files)} file{'s' * (len(files) != 1)} that {'are' if len(files) != 1 else 'is'} not an "
                     f"image ({names}; extensions: {', '.join(IMAGE_EXTENSIONS)})")  # fmt: skip
    if folders:
        parts.append(f"{len(folders)} sub-folder{'s' * (len(folders) != 1)} (not searched: name them to decide theirs)")
    return f"note: not decided in {printable(str(folder))}: {' and '.join(parts)}"


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): a file name such as
# "=HYPERLINK(...).png" must arrive as text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a string starting with =, +, -, @, tab or CR gets a leading ';
    bytes of a file name that are not UTF-8 and characters that are not printable (ESC, line breaks, bidirectional
    overrides; from a file name or a DICOM header) are escaped as in serve's log (a name that is not UTF-8 stopped the
    write, and every result of the run was lost)."""
    if isinstance(value, str):
        if value.startswith(_FORMULA_START):
            value = "'" + value
        return printable(value)
    return value


def results_csv(results: Iterable[ImageResult]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = {k: ("" if v is None else v) for k, v in r.to_dict().items()}
        if r.referable_dr_probability is not None:
            row["referable_dr_probability"] = f"{r.referable_dr_probability:.6f}"
        if r.grade_probability is not None:
            row["grade_probability"] = f"{r.grade_probability:.6f}"
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def check_csv_target(path: str | Path, *, inputs: Iterable[Path] = (), bundle_root: Path | None = None) -> Path:
    """Refuse a --csv path that would replace a file that is not ours: an input image, anything inside the bundle,
    or an existing file that is not a results CSV this command wrote (its first line is our header). Call it before
    deciding anything, so a mistake costs nothing."""
    path = Path(path)
    if path.is_dir():
        raise TlcompileError(f"--csv '{path}' is a folder; give a file name such as results.csv")
    target = path.resolve()
    for item in inputs:
        if Path(item).resolve() == target:
            raise TlcompileError(
                f"--csv '{path}' is one of the input images ({item}); it would be overwritten; give another file name"
            )
    refuse_inside_bundle("--csv", path, bundle_root)
    check_parent_writable("--csv", path)
    if path.exists() or path.is_symlink():
        header = ",".join(CSV_COLUMNS)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.readline(len(header) + 2).rstrip("\r\n")
        except OSError as err:
            raise TlcompileError(
                f"--csv '{path}' exists and cannot be read ({err.strerror or err}); give a new file name"
            ) from err
        earlier = {",".join(columns) for columns in EARLIER_CSV_COLUMNS}
        if (first != header and first not in earlier) or path.is_symlink():
            raise TlcompileError(
                f"--csv '{path}' exists and is not a results CSV of tlcompile predict; it is never overwritten; "
                "give a new file name"
            )
    return path


def write_results_csv(
    results: Iterable[ImageResult], path: str | Path, *, inputs: Iterable[Path] = (), bundle_root: Path | None = None
) -> None:
    path = check_csv_target(path, inputs=inputs, bundle_root=bundle_root)
    try:
        atomic_write_text(path, results_csv(results))
    except OSError as err:  # e.g. the disk filled up while the images were decided
        raise TlcompileError(
            f"--csv '{path}': cannot write it ({err.strerror or err}); the decisions above stand, none was saved"
        ) from err
