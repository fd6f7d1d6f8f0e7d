"""Load a dataset described by the recipe's ``data`` section into preprocessed in-memory arrays (numpy only).

Every image goes through :func:`tlcompile.runtime.preprocess.prepare_image`, the same function the deployed
runtime uses. Labels are DR grades 0-4 (``data.label_map`` maps other labels to them); the task maps them to
targets (referable: grade >= 2). Reading a file source (:func:`load_data`):

    sources.list_records  -> every image the layout names, with grade and patient (CSV problems listed)
    checks.inspect_file   -> read, hash, [cache], decode, preprocess each file on a thread pool (file problems listed)
    checks.dataset_problems -> duplicate photographs, patients across a given split column
    data.on_error         -> fail with the list, or leave exactly those images out
    split                 -> stratified by label and grouped by patient, fixed by the seed; or a CSV column
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tlcompile.data.checks import (
    GRADE_NAMES,
    DataProblemsError,
    DataReport,
    Inspected,
    dataset_problems,
    inspect_file,
    size_distribution,
)
from tlcompile.data.sources import SPLIT_NAMES, Listing, list_records
from tlcompile.data.splits import SPLITS, stratified_split
from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import PreprocessSpec, prepare_image, targets_for

if TYPE_CHECKING:  # the recipe imports this package to validate layouts: a type-only import keeps them acyclic
    from tlcompile.recipe import DataConfig

REFERABLE_CLASS_NAMES = ("non-referable", "referable")
GRADE_CLASS_NAMES = GRADE_NAMES
# Decoding releases the GIL, so threads speed up multi-megapixel JPEGs; more than this gains little on a CPU box.
MAX_DECODE_THREADS = 8


def class_names_for(task: str) -> tuple[str, ...]:
    return REFERABLE_CLASS_NAMES if task == "referable" else GRADE_CLASS_NAMES


def preprocess_spec(cfg: DataConfig) -> PreprocessSpec:
    """The preprocessing a data section asks for (saved in reports and bundles; the runtime repeats it)."""
    return PreprocessSpec(
        size=cfg.image_size, crop_fov=cfg.crop_fov, ben_graham=cfg.ben_graham, circular_mask=cfg.circular_mask
    )


@dataclass
class DataModule:
    """Preprocessed images and labels with their split; arrays are aligned by index."""

    images: np.ndarray  # (N, S, S, 3) uint8, already cropped and resized
    grades: np.ndarray  # (N,) int64 DR grade 0-4
    targets: np.ndarray  # (N,) int64 task target
    ids: list[str]
    patients: list[str]
    split: np.ndarray  # (N,) 'train' | 'val' | 'test'
    spec: PreprocessSpec
    task: str
    class_names: tuple[str, ...]
    fov_found: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    balance: str = "none"  # data.balance: none | weighted_sampler | weighted_loss
    paths: list[str] = field(default_factory=list)  # source file of each image; empty for generated data
    report: DataReport | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, targets) of one split."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        mask = self.split == name
        return self.images[mask], self.targets[mask]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in SPLITS:
            t = self.targets[self.split == name]
            out[name] = {self.class_names[c]: int((t == c).sum()) for c in range(self.num_classes)}
        return out

    def sample_weights(self, name: str = "train") -> np.ndarray | None:
        """Per-image draw weights of a split for ``balance: weighted_sampler`` (inverse class frequency, so every class
        is drawn equally often on average); None for the other balance modes."""
        if self.balance != "weighted_sampler":
            return None
        _, targets = self.subset(name)
        counts = np.bincount(targets, minlength=self.num_classes).astype(np.float64)
        weights = 1.0 / counts[targets]
        return weights / weights.sum()

    def write_splits_csv(self, path: Path) -> None:
        """image, patient, grade, label (the task target), split: one row per image."""
        from tlcompile.io import atomic_write_text

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "patient", "grade", "label", "split"])
        for i in range(len(self.ids)):
            writer.writerow([self.ids[i], self.patients[i], int(self.grades[i]), int(self.targets[i]), self.split[i]])
        atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------ file sources
@dataclass
class _Read:
    listing: Listing
    inspected: list[Inspected]
    keep: list[int]  # indices into listing.records of the images without problems
    report: DataReport


def _read_files(cfg: DataConfig, spec: PreprocessSpec) -> _Read:
    from tlcompile.runtime.inference import default_threads

    listing = list_records(cfg)
    records = listing.records
    cache = None
    if cfg.cache is not None:
        from tlcompile.data.cache import PreprocessCache

        cache = PreprocessCache(cfg.cache, spec)
    min_side = cfg.min_image_side or cfg.image_size

    def inspect(i: int) -> Inspected:
        r = records[i]
        return inspect_file(r.path, spec, where=r.where, image_id=r.id, min_side=min_side, cache=cache)

    workers = max(1, min(MAX_DECODE_THREADS, default_threads(), len(records)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        inspected = list(pool.map(inspect, range(len(records))))

    file_problems = {i: x.problem for i, x in enumerate(inspected) if x.problem is not None}
    readable = [i for i in range(len(records)) if i not in file_problems]
    cross = dataset_problems(
        [records[i].id for i in readable],
        [records[i].where for i in readable],
        [str(records[i].path) for i in readable],
        [records[i].grade for i in readable],
        [inspected[i].sha256 for i in readable],
        [records[i].patient for i in readable],
        [records[i].split for i in readable],
    )
    cross_problems = {readable[j]: p for j, p in cross.items()}
    bad = file_problems.keys() | cross_problems.keys()
    report = DataReport(
        source=cfg.source,
        location=listing.layout.describe(),
        on_error=cfg.on_error,
        label_csv=str(listing.layout.csv) if listing.layout.csv is not None else None,
        images_folder=str(listing.layout.images),
        listed=len(records) + len(listing.problems) + len(listing.excluded),
        problems=[
            *listing.problems,
            *(file_problems[i] for i in sorted(file_problems)),
            *(cross_problems[i] for i in sorted(cross_problems)),
        ],
        excluded=listing.excluded,
        notes=list(listing.notes),
        sizes=size_distribution([x.stored_hw for x in inspected if x.stored_hw is not None]),
        cache=cache.stats() if cache is not None else None,
    )
    return _Read(
        listing=listing, inspected=inspected, keep=[i for i in range(len(records)) if i not in bad], report=report
    )


def _split_for(
    cfg: DataConfig, targets: np.ndarray, patients: list[str], column_splits: list[str | None], seed: int
) -> np.ndarray:
    if cfg.split.column is not None:
        split = np.asarray(column_splits, dtype=object).astype(str)
        empty = [name for name in SPLIT_NAMES if not np.any(split == name)]
        if empty:
            raise DataError(
                f"data.split.column '{cfg.split.column}' gives no usable image to the {' and '.join(empty)} split; "
                "valid: every split (train, val, test) named on at least one row"
            )
        return split
    return stratified_split(targets, val=cfg.split.val, test=cfg.split.test, seed=seed, groups=patients)


def _describe_split(cfg: DataConfig, split: np.ndarray, patients: list[str], seed: int) -> dict[str, object]:
    per_patient: dict[str, set[str]] = {}
    for p, s in zip(patients, split, strict=True):
        per_patient.setdefault(p, set()).add(str(s))
    method = f"column '{cfg.split.column}'" if cfg.split.column else f"stratified, grouped by patient, seed {seed}"
    return {
        "method": method,
        "images": {name: int((split == name).sum()) for name in SPLITS},
        "patients": {name: sum(1 for v in per_patient.values() if name in v) for name in SPLITS},
        "patients_in_two_splits": sum(1 for v in per_patient.values() if len(v) > 1),
    }


def _assemble(cfg: DataConfig, seed: int, spec: PreprocessSpec, read: _Read) -> DataModule:
    records = [read.listing.records[i] for i in read.keep]
    if not records:
        raise DataError(
            f"{read.report.location}: no usable images ({len(read.report.problems)} with problems, "
            f"{len(read.report.excluded)} left out on purpose)"
        )
    images = np.stack([read.inspected[i].image for i in read.keep])
    grades = np.asarray([r.grade for r in records], dtype=np.int64)
    targets = targets_for(grades, cfg.task)
    patients = [r.patient for r in records]
    split = _split_for(cfg, targets, patients, [r.split for r in records], seed)
    return DataModule(
        images=images,
        grades=grades,
        targets=targets,
        ids=[r.id for r in records],
        patients=patients,
        split=split,
        spec=spec,
        task=cfg.task,
        class_names=class_names_for(cfg.task),
        fov_found=np.asarray([read.inspected[i].fov_found for i in read.keep], dtype=bool),
        balance=cfg.balance,
        paths=[str(r.path) for r in records],
        report=read.report,
    )


def _complete_report(report: DataReport, cfg: DataConfig, dm: DataModule, seed: int, patient_rule: str) -> None:
    report.used = len(dm.ids)
    counts = Counter(int(g) for g in dm.grades)
    report.grades = {f"{g} {GRADE_NAMES[g]}": counts[g] for g in range(5)}
    per_patient = Counter(dm.patients)
    report.patients = {
        "patients": len(per_patient),
        "rule": patient_rule,
        "with_several_images": sum(1 for n in per_patient.values() if n > 1),
    }
    report.splits = _describe_split(cfg, dm.split, dm.patients, seed)


# -------------------------------------------------------------------------------------------------- API
def load_data(cfg: DataConfig, *, seed: int, report_dir: Path | None = None) -> DataModule:
    """Build the data module for a recipe's data section.

    File sources are checked as they are read; with ``data.on_error: fail`` any problem raises
    :class:`DataProblemsError` listing them, with ``skip`` exactly the problem images are left out. With
    ``report_dir`` the check report (``data_check.json``, ``problems.csv``) is written there in both cases.
    """
    spec = preprocess_spec(cfg)
    if cfg.source == "synthetic":
        dm = _load_synthetic(cfg, spec, seed)
    else:
        read = _read_files(cfg, spec)
        if read.report.problems and cfg.on_error == "fail":
            csv_path = read.report.write(report_dir)[1] if report_dir is not None else None
            raise DataProblemsError(read.report.failure_message(csv_path), read.report)
        dm = _assemble(cfg, seed, spec, read)
        _complete_report(read.report, cfg, dm, seed, read.listing.patient_rule)
    if report_dir is not None and dm.report is not None:
        dm.report.write(report_dir)
    return dm


def check_data(cfg: DataConfig, *, seed: int) -> DataReport:
    """Run the data checks alone (``tlcompile data check``): every problem is listed, none raised; the counts, sizes and
    split describe the images that would be used (as with ``data.on_error: skip``)."""
    spec = preprocess_spec(cfg)
    if cfg.source == "synthetic":
        return _load_synthetic(cfg, spec, seed).report
    read = _read_files(cfg, spec)
    try:
        dm = _assemble(cfg, seed, spec, read)
    except DataError as err:  # too few usable images to split: the problems above say why
        read.report.notes.append(f"no split could be drawn: {err}")
        return read.report
    _complete_report(read.report, cfg, dm, seed, read.listing.patient_rule)
    return read.report


def _load_synthetic(cfg: DataConfig, spec: PreprocessSpec, seed: int) -> DataModule:
    from tlcompile.data import synthetic

    # Render larger than the input with the field of view wandering in the frame, then preprocess like
    # a camera image, so the crop is exercised exactly as in deployment.
    raw_size = int(round(cfg.image_size * 1.25))
    difficulty = synthetic.DEFAULT_DIFFICULTY if cfg.difficulty is None else cfg.difficulty
    raw, grades = synthetic.generate(cfg.num_images, seed=seed, size=raw_size, difficulty=difficulty, style=cfg.style)
    prepared = [prepare_image(img, spec) for img in raw]
    ids = [f"syn{seed}_{i:06d}" for i in range(cfg.num_images)]
    targets = targets_for(grades, cfg.task)
    split = stratified_split(targets, val=cfg.split.val, test=cfg.split.test, seed=seed, groups=ids)
    report = DataReport(
        source="synthetic",
        location=f"synthetic: {cfg.num_images} generated images (seed {seed}, style {cfg.style}, {raw_size} px)",
        on_error=cfg.on_error,
        listed=cfg.num_images,
        sizes=size_distribution([(raw_size, raw_size)] * cfg.num_images),
    )
    dm = DataModule(
        images=np.stack([p[0] for p in prepared]),
        grades=np.asarray(grades, dtype=np.int64),
        targets=targets,
        ids=ids,
        patients=list(ids),
        split=split,
        spec=spec,
        task=cfg.task,
        class_names=class_names_for(cfg.task),
        fov_found=np.array([p[1] for p in prepared], dtype=bool),
        balance=cfg.balance,
        report=report,
    )
    _complete_report(report, cfg, dm, seed, "generated images: each is its own patient")
    return dm
