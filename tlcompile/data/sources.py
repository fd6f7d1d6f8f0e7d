"""Dataset layouts as clinics and public sets have them: where the labels and images are, read into records.

A preset (``data.source``) knows one layout under ``data.root``; ``data.csv`` / ``data.images`` and the column keys
override any part of it:

=========  ==============================================  ======================  ======================  ==========
source     label CSV (first found under root)              columns (image, label)  image file               patient
=========  ==============================================  ======================  ======================  ==========
aptos      train.csv                                       id_code, diagnosis      train_images/{id}.png    (none)
eyepacs    trainLabels.csv                                 image, level            train/{id}.jpeg          before
                                                                                                            _left/_right
idrid      2. Groundtruths/a. IDRiD_Disease Grading_       Image name,             1. Original Images/      (none)
           Training Labels.csv (or that name in root)      Retinopathy grade       a. Training Set/{id}.jpg
messidor   messidor_data.csv (Messidor-2, Krause et al.)   image_id,               IMAGES/{id}              (none)
                                                           adjudicated_dr_grade
folder     -- one sub-folder per class (0..4, or data.label_map's names) --
csv        data.csv                                        id_code, diagnosis      {id}.png                 optional
dicom      labels.csv                                      file, grade             dicom/*.dcm: the         PatientID
                                                                                   SOPInstanceUID or name   (hashed)
=========  ==============================================  ======================  ======================  ==========

Reading never stops at the first bad row: every row that cannot become a usable record is a :class:`Problem`
(with its CSV line), so ``tlcompile data check`` can list them all. Decoding the images is not done here (see
:mod:`tlcompile.data.checks`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tlcompile.data.checks import Problem
from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from tlcompile.recipe import DataConfig

SPLIT_NAMES = ("train", "val", "test")
# The label CSV of a data set is small; anything this large is not one (and would be read into memory).
MAX_LABEL_CSV_BYTES = 256 << 20


@dataclass(frozen=True)
class Preset:
    """Where one public layout keeps its labels and images, relative to ``data.root``."""

    description: str
    csv: tuple[str, ...]  # candidate label CSVs, first that exists wins
    images: tuple[str, ...]  # candidate image folders ('' = root itself), first that exists wins
    image_column: str | None
    label_column: str | None
    path_template: str
    patient_regex: str | None = None
    # Rows with '0' in this column are ungradable: left out (and counted), not a problem.
    gradable_column: str | None = None


PRESETS: dict[str, Preset] = {
    "aptos": Preset(
        "APTOS 2019: train.csv (id_code, diagnosis) + train_images/<id_code>.png",
        ("train.csv",),
        ("train_images",),
        "id_code",
        "diagnosis",
        "{id}.png",
    ),
    "eyepacs": Preset(
        "Kaggle EyePACS 2015: trainLabels.csv (image, level) + <image>.jpeg (in train/ or the root)",
        ("trainLabels.csv",),
        ("train", ""),
        "image",
        "level",
        "{id}.jpeg",
        patient_regex=r"^(.+)_(?:left|right)$",
    ),
    "idrid": Preset(
        "IDRiD disease grading: the grading CSV (Image name, Retinopathy grade) + <Image name>.jpg",
        (
            "2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv",
            "a. IDRiD_Disease Grading_Training Labels.csv",
        ),
        ("1. Original Images/a. Training Set", "a. Training Set", ""),
        "Image name",
        "Retinopathy grade",
        "{id}.jpg",
    ),
    "messidor": Preset(
        "Messidor-2: messidor_data.csv (image_id, adjudicated_dr_grade) + IMAGES/<image_id>",
        ("messidor_data.csv",),
        ("IMAGES", "images", ""),
        "image_id",
        "adjudicated_dr_grade",
        "{id}",
        gradable_column="adjudicated_gradable",
    ),
    "dicom": Preset(
        "DICOM: labels.csv (file, grade; file = a SOPInstanceUID or a file name) + a folder of .dcm files; the patient "
        "is the DICOM PatientID (pseudonymised)",
        ("labels.csv",),
        ("dicom", "images", ""),
        "file",
        "grade",
        "{id}",
    ),
    "csv": Preset("a label CSV (data.csv) + an image folder", (), ("",), "id_code", "diagnosis", "{id}.png"),
    "folder": Preset("one sub-folder per class (0..4 or data.label_map's names)", (), ("",), None, None, "{id}"),
}


@dataclass(frozen=True)
class Layout:
    """A data section resolved against its preset: concrete files, columns and rules."""

    source: str
    csv: Path | None
    images: Path
    image_column: str | None
    label_column: str | None
    path_template: str
    patient_column: str | None
    patient_regex: str | None
    gradable_column: str | None
    split_column: str | None
    label_map: dict[str, int | None]

    def describe(self) -> str:
        """'aptos: /data/aptos/train.csv + /data/aptos/train_images' (folder: the class-folder root)."""
        return f"{self.source}: " + (f"{self.csv} + {self.images}" if self.csv is not None else str(self.images))


@dataclass
class Record:
    """One image the source names, with its label already mapped to a DR grade."""

    id: str
    path: Path
    label: str  # as written in the CSV or the folder name
    grade: int
    patient: str
    where: str  # 'train.csv line 12' or "folder '2'": for messages
    split: str | None = None  # from data.split.column


@dataclass
class Listing:
    layout: Layout
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)  # left out on purpose: label_map null, ungradable
    notes: list[str] = field(default_factory=list)
    patient_rule: str = "no patient ids: each image is its own patient"


def _first_existing(root: Path, candidates: tuple[str, ...], want_dir: bool) -> Path | None:
    for rel in candidates:
        path = root / rel if rel else root
        if path.is_dir() if want_dir else path.is_file():
            return path
    return None


def resolve_layout(cfg: DataConfig) -> Layout:
    """The concrete label CSV, image folder and columns of a data section. Raises :class:`DataError` naming the recipe
    key when a file or folder it needs is not there."""
    if cfg.source not in PRESETS:
        raise DataError(f"data.source '{cfg.source}' has no file layout; valid: {', '.join(PRESETS)}")
    preset = PRESETS[cfg.source]
    root = Path(cfg.root) if cfg.root is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"data.root: '{root}' is not a folder; give the dataset folder ({preset.description})")

    csv_path: Path | None = None
    if cfg.source != "folder":
        if cfg.csv is not None:
            csv_path = Path(cfg.csv)
            if not csv_path.is_file():
                raise DataError(f"data.csv: '{csv_path}' does not exist or is not a file; give the label CSV's path")
        else:
            csv_path = _first_existing(root, preset.csv, want_dir=False) if root is not None else None
            if csv_path is None:
                looked = ", ".join(f"'{c}'" for c in preset.csv)
                raise DataError(
                    f"data.root: '{root}' has no label CSV of the {cfg.source} layout (looked for {looked}); "
                    "set data.csv to the label file"
                )

    if cfg.images is not None:
        images = Path(cfg.images)
        if not images.is_dir():
            raise DataError(f"data.images: '{images}' is not a folder; give the folder holding the images")
    elif root is not None:
        found = _first_existing(root, preset.images, want_dir=True)
        if found is None:
            looked = ", ".join(f"'{c}'" for c in preset.images)
            raise DataError(
                f"data.root: '{root}' has no image folder of the {cfg.source} layout (looked for {looked}); "
                "set data.images to the folder holding the images"
            )
        images = found
    else:  # csv source without root or images: the images sit beside the CSV
        images = csv_path.parent

    patient_regex = cfg.patient_regex
    if patient_regex is None and cfg.patient_column is None:
        patient_regex = preset.patient_regex
    return Layout(
        source=cfg.source,
        csv=csv_path,
        images=images,
        image_column=cfg.image_column or preset.image_column,
        label_column=cfg.label_column or preset.label_column,
        path_template=cfg.path_template or preset.path_template,
        patient_column=cfg.patient_column,
        patient_regex=patient_regex,
        gradable_column=preset.gradable_column,
        split_column=cfg.split.column,
        label_map=dict(cfg.label_map),
    )


# ------------------------------------------------------------------------------------------------ labels
def parse_grade(raw: str, label_map: dict[str, int | None]) -> tuple[str, int | None, str]:
    """A raw label -> ('ok', grade, '') | ('excluded', None, why) | (problem kind, None, reason)."""
    text = raw.strip()
    if label_map:
        key = text
        if key not in label_map:
            try:  # '2.0' in a CSV written by a spreadsheet is the label '2'
                number = float(text)
                key = str(int(number)) if number.is_integer() else text
            except ValueError:
                pass
        if key in label_map:
            grade = label_map[key]
            return (
                ("ok", grade, "")
                if grade is not None
                else ("excluded", None, f"label '{text}' is mapped to null in data.label_map")
            )
        if not text:
            return "label_missing", None, "has no label"
        keys = ", ".join(f"'{k}'" for k in label_map)
        return "label_invalid", None, f"label '{text}' is not in data.label_map; valid: {keys}"
    if not text:
        return "label_missing", None, "has no label"
    try:
        number = float(text)
    except ValueError:
        return (
            "label_invalid",
            None,
            f"label '{text}' is not a number; valid: DR grades 0-4 (map other labels with data.label_map)",
        )
    if not number.is_integer():
        return "label_invalid", None, f"label '{text}' is not a whole number; valid: DR grades 0-4"
    grade = int(number)
    if grade not in range(5):
        return "label_out_of_range", None, f"label {grade} is out of range; valid: DR grades 0-4"
    return "ok", grade, ""


class _PatientRule:
    """Patient id of an image: a CSV column, a regex on the id, or the image itself."""

    def __init__(self, layout: Layout) -> None:
        self.column = layout.patient_column
        self.regex = re.compile(layout.patient_regex) if layout.patient_regex else None
        self.unmatched: list[str] = []
        if self.column:
            self.description = f"data.patient_column '{self.column}'"
        elif self.regex is not None:
            self.description = f"patient_regex '{self.regex.pattern}'"
        else:
            self.description = "no patient ids: each image is its own patient"

    def __call__(self, image_id: str, text: str, row: dict[str, str] | None = None) -> str:
        if self.column and row is not None:
            value = (row.get(self.column) or "").strip()
            if value:
                return value
            self.unmatched.append(image_id)
            return image_id
        if self.regex is not None:
            m = self.regex.search(text)
            value = (m.groupdict().get("patient") or m.group(1)) if m else None
            if value:
                return value
            self.unmatched.append(image_id)
        return image_id

    def note(self) -> str | None:
        if not self.unmatched:
            return None
        how = f"have an empty {self.column}" if self.column else f"do not match {self.description}"
        examples = ", ".join(self.unmatched[:3])
        return f"{len(self.unmatched)} images {how} (e.g. {examples}); each of them is its own patient"


# -------------------------------------------------------------------------------------------- CSV sources
def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (stripped names) and the non-blank rows with their 1-based line numbers."""
    size = path.stat().st_size
    if size > MAX_LABEL_CSV_BYTES:
        raise DataError(f"{path}: {size} bytes is too large for a label CSV (limit {MAX_LABEL_CSV_BYTES} bytes)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save the label CSV as UTF-8") from err
    first = text.split("\n", 1)[0]
    # Spreadsheets in many locales write ';' between fields: take the delimiter the header uses most.
    delimiter = max((",", ";", "\t"), key=first.count)
    # Lines end at \n, \r or \r\n only (str.splitlines also broke a row at U+2028 or \x1c inside a cell), a quoted
    # field may span lines, and each row is named by the file's line it starts on.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration as err:
        raise DataError(f"{path}: empty file; a label CSV needs a header row and one row per image") from err
    rows = []
    starts = reader.line_num + 1
    for values in reader:
        line_no, starts = starts, reader.line_num + 1
        if not any(v.strip() for v in values):  # blank lines (IDRiD's CSV ends with some)
            continue
        rows.append((line_no, {name: (values[i] if i < len(values) else "") for i, name in enumerate(header) if name}))
    if not rows:
        raise DataError(f"{path}: no rows under the header")
    return header, rows


class _FolderIndex:
    """Case- and extension-insensitive lookup in an image folder, for CSVs that name 'x.png' where the folder holds
    'x.PNG' or 'x.tif' (Messidor-2's CSV and ADCIS's download disagree so)."""

    def __init__(self) -> None:
        self._folders: dict[Path, tuple[dict[str, list[Path]], dict[str, list[Path]]]] = {}

    def find(self, path: Path) -> Path | None:
        folder = path.parent
        if folder not in self._folders:
            by_name: dict[str, list[Path]] = defaultdict(list)
            by_stem: dict[str, list[Path]] = defaultdict(list)
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                        by_name[p.name.lower()].append(p)
                        by_stem[p.stem.lower()].append(p)
            self._folders[folder] = (by_name, by_stem)
        by_name, by_stem = self._folders[folder]
        for candidates in (by_name.get(path.name.lower(), []), by_stem.get(path.stem.lower(), [])):
            if len(candidates) == 1:
                return candidates[0]
        return None


def _list_csv(
    layout: Layout,
    locate: Callable[[str], Path | None] | None = None,
    patient_for: Callable[[Path], str | None] | None = None,
) -> Listing:
    """The records a label CSV names. ``locate`` finds an id's file instead of the path template; ``patient_for``
    gives a file's patient instead of the patient rule (the dicom source: its header's PatientID)."""
    csv_path = layout.csv
    header, rows = _read_csv_rows(csv_path)
    wanted = [("data.image_column", layout.image_column), ("data.label_column", layout.label_column)]
    if layout.patient_column:
        wanted.append(("data.patient_column", layout.patient_column))
    if layout.split_column:
        wanted.append(("data.split.column", layout.split_column))
    present = [h for h in header if h]
    for key, column in wanted:
        if column not in present:
            raise DataError(f"{csv_path}: {key} '{column}' is not a column; columns: {', '.join(present) or '(none)'}")
    listing = Listing(layout=layout, records=[])
    patient_of = _PatientRule(layout)
    listing.patient_rule = patient_of.description
    index = _FolderIndex()
    found_elsewhere: list[str] = []
    name = csv_path.name

    # Duplicate ids: a later row naming the same image is a problem; when the rows disagree on the label, the first
    # one is too (which label is right cannot be known).
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, (_, row) in enumerate(rows):
        by_id[(row.get(layout.image_column) or "").strip()].append(i)

    for i, (line_no, row) in enumerate(rows):
        where = f"{name} line {line_no}"
        image_id = (row.get(layout.image_column) or "").strip()
        if not image_id:
            listing.problems.append(Problem("no_id", where, f"has no image id in column '{layout.image_column}'"))
            continue
        raw_label = row.get(layout.label_column) or ""
        same = by_id[image_id]
        if len(same) > 1:
            labels = {(rows[j][1].get(layout.label_column) or "").strip() for j in same}
            first_line = rows[same[0]][0]
            if i != same[0]:
                listing.problems.append(
                    Problem("duplicate_id", where, f"id '{image_id}' is also on line {first_line}", id=image_id)
                )
                continue
            if len(labels) > 1:
                listing.problems.append(
                    Problem(
                        "duplicate_id",
                        where,
                        f"id '{image_id}' appears {len(same)} times with different labels "
                        f"({', '.join(sorted(labels))})",
                        id=image_id,
                    )
                )
                continue
        if layout.gradable_column and (row.get(layout.gradable_column) or "").strip() == "0":
            listing.excluded.append(
                {"id": image_id, "where": where, "reason": f"ungradable ({layout.gradable_column} 0)"}
            )
            continue
        status, grade, reason = parse_grade(raw_label, layout.label_map)
        if status == "excluded":
            listing.excluded.append({"id": image_id, "where": where, "reason": reason})
            continue
        if status != "ok":
            listing.problems.append(Problem(status, where, reason, id=image_id))
            continue
        split = None
        if layout.split_column:
            split = (row.get(layout.split_column) or "").strip().lower()
            if split not in SPLIT_NAMES:
                listing.problems.append(
                    Problem(
                        "split_invalid",
                        where,
                        f"split '{row.get(layout.split_column, '')}' in column '{layout.split_column}' "
                        "is not train, val or test",
                        id=image_id,
                    )
                )
                continue
        path = layout.images / layout.path_template.format(id=image_id)
        located = locate(image_id) if locate is not None else None
        if located is not None:
            path = located
        elif not path.is_file():
            other = index.find(path)
            if other is None:
                listing.problems.append(Problem("missing", where, "does not exist", id=image_id, file=str(path)))
                continue
            found_elsewhere.append(f"'{other.name}' for '{path.name}'")
            path = other
        listing.records.append(
            Record(
                id=image_id,
                path=path,
                label=raw_label.strip(),
                grade=grade,
                patient=(patient_for(path) if patient_for is not None else None) or patient_of(image_id, image_id, row),
                where=where,
                split=split,
            )
        )
    if found_elsewhere:
        listing.notes.append(
            f"{len(found_elsewhere)} images found under another extension or letter case "
            f"(e.g. {', '.join(found_elsewhere[:2])})"
        )
    if (note := patient_of.note()) is not None:
        listing.notes.append(note)
    # Every file a row names (usable or not), against what the image folder holds.
    named = {(layout.images / layout.path_template.format(id=i)).resolve() for i in by_id if i}
    named |= {r.path.resolve() for r in listing.records}
    if layout.images.is_dir() and "/" not in layout.path_template:
        unlisted = [
            p for p in layout.images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.resolve() not in named
        ]
        if unlisted:
            listing.notes.append(
                f"{len(unlisted)} image files in {layout.images} are not named in {name} (not used; "
                f"e.g. {', '.join(sorted(p.name for p in unlisted)[:3])})"
            )
    return listing


# ---------------------------------------------------------------------------------------------- folder
def _list_folder(layout: Layout) -> Listing:
    root = layout.images
    listing = Listing(layout=layout, records=[])
    patient_of = _PatientRule(layout)
    listing.patient_rule = patient_of.description
    ignored_folders, other_files = [], []
    class_folders = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "__")):  # .ipynb_checkpoints, __MACOSX
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        where = f"folder '{folder.name}'"
        status, grade, reason = parse_grade(folder.name, layout.label_map)
        if status in ("label_invalid", "label_missing"):
            ignored_folders.append(f"'{folder.name}' ({len(files)} files)")
            continue
        class_folders += 1
        for path in files:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                other_files.append(path.name)
                continue
            image_id = f"{folder.name}/{path.name}"
            if status == "excluded":
                listing.excluded.append({"id": image_id, "where": where, "reason": reason})
            elif status != "ok":
                listing.problems.append(Problem(status, where, reason, id=image_id, file=str(path)))
            else:
                listing.records.append(
                    Record(
                        id=image_id,
                        path=path,
                        label=folder.name,
                        grade=grade,
                        patient=patient_of(image_id, path.stem),
                        where=where,
                    )
                )
    if class_folders == 0:
        valid = (
            "data.label_map's keys: " + ", ".join(layout.label_map)
            if layout.label_map
            else "0, 1, 2, 3, 4 (or map other names with data.label_map)"
        )
        raise DataError(
            f"{root}: no class sub-folders; valid names: {valid}"
            + (f"; found: {', '.join(ignored_folders)}" if ignored_folders else "")
        )
    if ignored_folders:
        listing.notes.append(f"sub-folders that are not classes were ignored: {', '.join(ignored_folders)}")
    top_level = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if top_level:
        listing.notes.append(f"{len(top_level)} images directly in {root} (not in a class folder) were ignored")
    if other_files:
        listing.notes.append(
            f"{len(other_files)} files without an image extension were ignored (e.g. {', '.join(other_files[:3])})"
        )
    if (note := patient_of.note()) is not None:
        listing.notes.append(note)
    return listing


# ----------------------------------------------------------------------------------------------- dicom
def pseudonym(patient_id: str) -> str:
    """The patient key a DICOM PatientID becomes: grouping by it splits by patient exactly as the ID would, and the
    ID itself never reaches splits.csv, the build report or a log."""
    return "patient-" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:16]


def _list_dicom(layout: Layout) -> Listing:
    """A label CSV keyed by SOPInstanceUID or file name, over a folder of DICOM files whose headers (read without
    pixel data) give each file's SOPInstanceUID and patient."""
    from tlcompile.runtime.dicom import DICOM_EXTENSIONS, read_header

    by_key: dict[str, Path] = {}
    patients: dict[Path, str | None] = {}
    unreadable = 0
    for path in sorted(layout.images.iterdir()):
        if path.suffix.lower() not in DICOM_EXTENSIONS or not path.is_file():
            continue
        by_key.setdefault(path.name, path)
        by_key.setdefault(path.stem, path)
        try:
            header = read_header(path)
        except DataError:
            unreadable += 1  # named by file name, it is still listed; decoding reports what is wrong with it
            continue
        uid = str(header.get("SOPInstanceUID") or "").strip()
        if uid:
            by_key.setdefault(uid, path)
        patient_id = str(header.get("PatientID") or "").strip()
        patients[path] = pseudonym(patient_id) if patient_id else None
    listing = _list_csv(layout, locate=by_key.get, patient_for=patients.get)
    listing.patient_rule = "DICOM PatientID (pseudonymised with sha256; images without one are their own patient)"
    if unreadable:
        listing.notes.append(f"{unreadable} .dcm files in {layout.images} have no readable DICOM header")
    return listing


def list_records(cfg: DataConfig) -> Listing:
    """Every image the data section names, with its grade and patient; rows that cannot be used are problems."""
    layout = resolve_layout(cfg)
    if layout.source == "folder":
        return _list_folder(layout)
    return _list_dicom(layout) if layout.source == "dicom" else _list_csv(layout)
