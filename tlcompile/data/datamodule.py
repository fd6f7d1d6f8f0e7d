"""Load a dataset described by the recipe's ``data`` section into preprocessed in-memory arrays (numpy only).

Every image goes through :func:`tlcompile.runtime.preprocess.prepare_image`, the same function the deployed
runtime uses. Labels are DR grades 0-4; the task maps them to targets (referable: grade >= 2).
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlcompile.data.splits import SPLITS, stratified_split
from tlcompile.errors import DataError
from tlcompile.recipe import DataConfig
from tlcompile.runtime.preprocess import PreprocessSpec, prepare_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
REFERABLE_CLASS_NAMES = ("non-referable", "referable")
GRADE_CLASS_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")


def class_names_for(task: str) -> tuple[str, ...]:
    return REFERABLE_CLASS_NAMES if task == "referable" else GRADE_CLASS_NAMES


def targets_for(grades: np.ndarray, task: str) -> np.ndarray:
    """DR grades -> training targets for the task (referable DR is grade >= 2: moderate NPDR or worse)."""
    grades = np.asarray(grades, dtype=np.int64)
    return (grades >= 2).astype(np.int64) if task == "referable" else grades


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

    def write_splits_csv(self, path: Path) -> None:
        from tlcompile.io import atomic_write_text

        lines = ["image,patient,grade,label,split"]
        for i in range(len(self.ids)):
            lines.append(f"{self.ids[i]},{self.patients[i]},{self.grades[i]},{self.targets[i]},{self.split[i]}")
        atomic_write_text(path, "\n".join(lines) + "\n")


def _prepare_many(paths: list[Path], spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    # Decoding releases the GIL, so threads give a real speed-up on multi-megapixel JPEGs.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda p: prepare_image(p, spec), paths))
    images = np.stack([r[0] for r in results]) if results else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    return images, np.array([r[1] for r in results], dtype=bool)


def _read_label_csv(cfg: DataConfig) -> tuple[list[str], list[Path], np.ndarray]:
    csv_path = Path(cfg.csv)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for key, col in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
                if col not in columns:
                    raise DataError(f"{csv_path}: {key} '{col}' is not a column; columns: {', '.join(columns) or '(none)'}")
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path}: not UTF-8 text") from err
    if not rows:
        raise DataError(f"{csv_path}: no rows under the header")
    ids, paths, grades = [], [], []
    for line_no, row in enumerate(rows, start=2):
        image_id = (row[cfg.image_column] or "").strip()
        raw = (row[cfg.label_column] or "").strip()
        try:
            grade = int(float(raw))
        except ValueError as err:
            raise DataError(f"{csv_path} line {line_no}: label '{raw}' is not a number; valid: DR grades 0-4") from err
        if grade not in range(5):
            raise DataError(f"{csv_path} line {line_no}: label {grade} is out of range; valid: DR grades 0-4")
        path = Path(cfg.images) / cfg.path_template.format(id=image_id)
        if not path.is_file():
            raise DataError(f"{csv_path} line {line_no}: image '{path}' does not exist")
        ids.append(image_id)
        paths.append(path)
        grades.append(grade)
    return ids, paths, np.asarray(grades, dtype=np.int64)


def _read_class_folders(cfg: DataConfig) -> tuple[list[str], list[Path], np.ndarray]:
    root = Path(cfg.images)
    ids, paths, grades = [], [], []
    for grade in range(5):
        folder = root / str(grade)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                ids.append(f"{grade}/{path.stem}")
                paths.append(path)
                grades.append(grade)
    if not paths:
        raise DataError(f"{root}: no images found in sub-folders 0..4 (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return ids, paths, np.asarray(grades, dtype=np.int64)


def load_data(cfg: DataConfig, *, seed: int) -> DataModule:
    """Build the data module for a recipe's data section."""
    spec = PreprocessSpec(size=cfg.image_size, crop_fov=cfg.crop_fov)
    if cfg.source == "synthetic":
        from tlcompile.data import synthetic

        # Render larger than the input with the field of view wandering in the frame, then preprocess like
        # a camera image, so the crop is exercised exactly as in deployment.
        raw_size = int(round(cfg.image_size * 1.25))
        difficulty = synthetic.DEFAULT_DIFFICULTY if cfg.difficulty is None else cfg.difficulty
        raw, grades = synthetic.generate(cfg.num_images, seed=seed, size=raw_size, difficulty=difficulty, style=cfg.style)
        prepared = [prepare_image(img, spec) for img in raw]
        images = np.stack([p[0] for p in prepared])
        fov = np.array([p[1] for p in prepared], dtype=bool)
        ids = [f"syn{seed}_{i:06d}" for i in range(cfg.num_images)]
    else:
        ids, paths, grades = _read_label_csv(cfg) if cfg.source == "csv" else _read_class_folders(cfg)
        images, fov = _prepare_many(paths, spec)
    targets = targets_for(grades, cfg.task)
    patients = list(ids)
    split = stratified_split(targets, val=cfg.split.val, test=cfg.split.test, seed=seed, groups=patients)
    return DataModule(
        images=images,
        grades=np.asarray(grades, dtype=np.int64),
        targets=targets,
        ids=ids,
        patients=patients,
        split=split,
        spec=spec,
        task=cfg.task,
        class_names=class_names_for(cfg.task),
        fov_found=fov,
    )
