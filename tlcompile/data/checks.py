"""Bad data, found and listed: every image that cannot be trusted is a :class:`Problem` with its file and reason.

Per file (:func:`inspect_file`): missing, unreadable, empty, not an image, truncated, corrupt, over Pillow's
decompression-bomb limit, too small, no field of view (a black or blank frame). Per data set
(:func:`dataset_problems`): the same photograph under two ids (exact byte duplicates; with different labels both are
suspect), a patient in two splits of a given split column. The label CSV's own problems (missing ids, duplicate
ids, missing or out-of-range labels, bad split values) come from :mod:`tlcompile.data.sources`.

``data.on_error: fail`` stops with the list (:class:`DataProblemsError`), ``skip`` leaves exactly the listed
images out; either way :class:`DataReport` writes the list (``problems.csv``) and a summary (``data_check.json``).
Nothing is ever replaced by a black image.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import PreprocessSpec, prepare_image, read_image

if TYPE_CHECKING:
    from tlcompile.data.cache import PreprocessCache

#: Problem kinds and what each means (the summary groups by them).
PROBLEM_KINDS = {
    "missing": "named in the labels, but the file does not exist",
    "unreadable": "the file cannot be read (permissions, I/O error)",
    "empty": "zero-byte file",
    "not_image": "not an image file",
    "truncated": "image file cut short",
    "corrupt": "image data that does not decode",
    "too_large": "over Pillow's decompression-bomb pixel limit",
    "too_small": "image smaller than data.min_image_side",
    "no_fov": "no field of view: a black or blank frame",
    "duplicate_image": "the same file content as another image",
    "duplicate_id": "an image id on more than one row",
    "no_id": "a row without an image id",
    "label_missing": "no label",
    "label_invalid": "a label that is not a DR grade (or not in data.label_map)",
    "label_out_of_range": "a grade outside 0-4",
    "split_invalid": "a split column value other than train, val, test",
    "patient_in_two_splits": "a patient whose images are in more than one split",
}
GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")

PROBLEMS_CSV_COLUMNS = ("file", "id", "kind", "reason", "where")  # problems.csv, one row per problem


@dataclass(frozen=True)
class Problem:
    """One image (or CSV row) that cannot be used, and why."""

    kind: str  # a key of PROBLEM_KINDS
    where: str  # 'train.csv line 12' or "folder '2'"
    reason: str  # completes 'image FILE ...' when ``file`` is set, else stands alone
    id: str | None = None
    file: str | None = None

    def describe(self) -> str:
        if self.file:
            return f"{self.where}: image '{self.file}' {self.reason}"
        if self.id and f"'{self.id}'" not in self.reason:  # a label problem: name the image as well as the line
            return f"{self.where} (image id '{self.id}'): {self.reason}"
        return f"{self.where}: {self.reason}"


class DataProblemsError(DataError):
    """``data.on_error: fail`` and the data has problems; ``report`` lists them all."""

    def __init__(self, message: str, report: DataReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Inspected:
    """What reading one image file gave: the preprocessed image, or the problem."""

    image: np.ndarray | None = None
    fov_found: bool = False
    stored_hw: tuple[int, int] | None = None
    sha256: str | None = None
    cached: bool = False
    problem: Problem | None = None


def _decode_problem(err: DataError) -> tuple[str, str]:
    cause = err.__cause__
    detail = str(cause) if cause is not None else str(err)
    if isinstance(cause, UnidentifiedImageError):
        return "not_image", "is not an image Pillow can read (wrong format, or a damaged header)"
    if isinstance(cause, Image.DecompressionBombError):
        return "too_large", f"is too large to decode safely ({detail})"
    if "truncated" in detail.lower():
        return "truncated", f"is truncated ({detail})"
    return "corrupt", f"cannot be decoded ({detail})"


def inspect_file(
    path: Path,
    spec: PreprocessSpec,
    *,
    where: str,
    image_id: str | None = None,
    min_side: int = 1,
    cache: PreprocessCache | None = None,
) -> Inspected:
    """Read, hash, decode and preprocess one image file (or take it from ``cache``); any problem is returned, not
    raised."""

    def problem(kind: str, reason: str) -> Inspected:
        return Inspected(problem=Problem(kind, where, reason, id=image_id, file=str(path)))

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return problem("missing", "does not exist")
    except OSError as err:
        return problem("unreadable", f"cannot be read ({err.strerror or err})")
    if not data:
        return problem("empty", "is empty (0 bytes)")
    sha = hashlib.sha256(data).hexdigest()
    hit = cache.get(sha) if cache is not None else None
    if hit is not None:
        out = Inspected(image=hit.image, fov_found=hit.fov_found, stored_hw=hit.stored_hw, sha256=sha, cached=True)
    else:
        try:
            rgb, stored_hw = read_image(path, draft_size=spec.draft_size, data=data)
        except DataError as err:
            return problem(*_decode_problem(err))
        image, found = prepare_image(rgb, spec)
        if cache is not None:
            cache.put(sha, image, found, stored_hw)
        out = Inspected(image=image, fov_found=found, stored_hw=stored_hw, sha256=sha)
    h, w = out.stored_hw
    if min(h, w) < min_side:
        out.problem = Problem(
            "too_small", where, f"is {w}x{h} pixels, under data.min_image_side {min_side}", id=image_id, file=str(path)
        )
    elif not out.fov_found:
        out.problem = Problem(
            "no_fov", where, "has no field of view (black, blank or lens-cap frame)", id=image_id, file=str(path)
        )
    return out


def dataset_problems(
    ids: list[str],
    wheres: list[str],
    files: list[str],
    grades: list[int],
    digests: list[str | None],
    patients: list[str],
    splits: list[str | None],
) -> dict[int, Problem]:
    """Problems that only show across images: byte-identical photographs under several ids (all of them when their
    labels disagree, else every copy after the first), and a patient in more than one split of a split column."""
    found: dict[int, Problem] = {}
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(digests):
        if digest is not None:
            by_digest[digest].append(i)
    for same in by_digest.values():
        if len(same) < 2:
            continue
        labels = sorted({grades[i] for i in same})
        first = same[0]
        if len(labels) > 1:
            for i in same:
                others = ", ".join(f"'{ids[j]}'" for j in same if j != i)
                found[i] = Problem(
                    "duplicate_image",
                    wheres[i],
                    f"has the same content as {others} with a different label (grades {', '.join(map(str, labels))})",
                    id=ids[i],
                    file=files[i],
                )
        else:
            for i in same[1:]:
                found[i] = Problem(
                    "duplicate_image",
                    wheres[i],
                    f"has the same content as '{ids[first]}' ({wheres[first]})",
                    id=ids[i],
                    file=files[i],
                )
    if any(s is not None for s in splits):
        by_patient: dict[str, list[int]] = defaultdict(list)
        for i, patient in enumerate(patients):
            if i not in found:
                by_patient[patient].append(i)
        for patient, members in by_patient.items():
            names = sorted({splits[i] for i in members})
            if len(names) > 1:
                for i in members:
                    found[i] = Problem(
                        "patient_in_two_splits",
                        wheres[i],
                        f"belongs to patient '{patient}', whose images are in "
                        f"{' and '.join(names)} (split column); put all of a patient's images in one split",
                        id=ids[i],
                        file=files[i],
                    )
    return found


def size_distribution(stored_hw: list[tuple[int, int]]) -> dict[str, Any]:
    """Widths, heights, the commonest sizes and the shorter side in bands, of the images that decoded."""
    if not stored_hw:
        return {"images": 0}
    hw = np.asarray(stored_hw, dtype=np.int64)
    short = hw.min(axis=1)
    bands = {
        "<512": int((short < 512).sum()),
        "512-1023": int(((short >= 512) & (short < 1024)).sum()),
        "1024-2047": int(((short >= 1024) & (short < 2048)).sum()),
        ">=2048": int((short >= 2048).sum()),
    }
    common = Counter(f"{w}x{h}" for h, w in stored_hw).most_common(5)

    def stats(v: np.ndarray) -> dict[str, int]:
        return {"min": int(v.min()), "median": int(np.median(v)), "max": int(v.max())}

    return {
        "images": len(stored_hw),
        "width": stats(hw[:, 1]),
        "height": stats(hw[:, 0]),
        "short_side": bands,
        "most_common": [{"size": s, "images": n} for s, n in common],
    }


@dataclass
class DataReport:
    """What the data section gave: counts, sizes, patients, splits, and every problem with its file and reason."""

    source: str
    location: str
    on_error: str
    label_csv: str | None = None  # the label CSV that was read (file sources other than folder)
    images_folder: str | None = None
    listed: int = 0  # images (and CSV rows) the source names
    used: int = 0  # images in the data module
    grades: dict[str, int] = field(default_factory=dict)  # used images per grade
    sizes: dict[str, Any] = field(default_factory=dict)
    patients: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cache: dict[str, Any] | None = None

    def problem_counts(self) -> dict[str, int]:
        counts = Counter(p.kind for p in self.problems)
        return {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problem_counts"] = self.problem_counts()
        return d

    def problems_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(PROBLEMS_CSV_COLUMNS)
        for p in self.problems:
            writer.writerow([p.file or "", p.id or "", p.kind, p.reason, p.where])
        return buffer.getvalue()

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """``data_check.json`` (everything) and ``problems.csv`` (one row per problem) in ``folder``."""
        from tlcompile.io import atomic_write_json, atomic_write_text

        folder = Path(folder)
        json_path, csv_path = folder / "data_check.json", folder / "problems.csv"
        atomic_write_json(json_path, self.to_dict())
        atomic_write_text(csv_path, self.problems_csv())
        return json_path, csv_path

    def failure_message(self, problems_csv: Path | None = None) -> str:
        shown = "; ".join(p.describe() for p in self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        where = f"; the full list: {problems_csv}" if problems_csv else "; `tlcompile data check RECIPE` lists them all"
        n = len(self.problems)
        return (
            f"{n} data problem{'s' if n != 1 else ''} in {self.location} (data.on_error: fail): {shown}{more}{where}; "
            "fix or remove those images, or set data.on_error: skip to leave exactly them out"
        )

    def summary_lines(self, max_problems: int = 50) -> list[str]:
        """The human summary `tlcompile data check` prints."""
        lines = [
            f"data: {self.location}",
            f"images: {self.listed} listed, {self.used} usable, {len(self.problems)} with problems, "
            f"{len(self.excluded)} left out on purpose",
        ]
        if self.grades:
            lines.append("per grade: " + ", ".join(f"{k} {v}" for k, v in self.grades.items()))
        s = self.sizes
        if s.get("images"):
            common = ", ".join(f"{c['size']} ({c['images']})" for c in s["most_common"][:3])
            lines.append(
                f"image size (w x h): min {s['width']['min']}x{s['height']['min']}, median {s['width']['median']}x"
                f"{s['height']['median']}, max {s['width']['max']}x{s['height']['max']}; commonest {common}"
            )
            lines.append("shorter side: " + ", ".join(f"{k} px {v}" for k, v in s["short_side"].items()))
        if self.patients:
            p = self.patients
            lines.append(
                f"patients: {p['patients']} ({p['rule']}); {p['with_several_images']} with more than one image"
            )
        if self.splits:
            per = ", ".join(f"{name} {n}" for name, n in self.splits["images"].items())
            lines.append(
                f"split ({self.splits['method']}): {per}; patients in more than one split: "
                f"{self.splits['patients_in_two_splits']}"
            )
        if self.cache:
            lines.append(f"cache: {self.cache['hits']} hits, {self.cache['misses']} decoded ({self.cache['folder']})")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.excluded:
            reasons = Counter(e["reason"] for e in self.excluded)
            lines.append("left out on purpose: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common(5)))
        if self.problems:
            lines.append("problems: " + ", ".join(f"{kind} {n}" for kind, n in self.problem_counts().items()))
            lines.extend(f"  {p.kind}: {p.describe()}" for p in self.problems[:max_problems])
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more (all in problems.csv)")
        else:
            lines.append("problems: none")
        return lines
