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

import contextlib
import csv
import dataclasses
import functools
import io
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from tlcompile.data.cache import PreprocessCache
    from tlcompile.recipe import DataConfig

Progress = Callable[[str, int, int], None] | None  # (what, done, total): reading and store building report through it

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


@dataclass(frozen=True)
class PhotoSource:
    """Photo ``i`` of a data module as the camera gave it (:meth:`DataModule.photo`): the generated frame re-drawn
    from the generator's arguments, or the source file decoded as predict decodes it."""

    generator: dict[str, Any] | None
    paths: tuple[str, ...]
    draft_size: int | None

    def __call__(self, i: int) -> np.ndarray:
        if self.generator is not None:
            from tlcompile.data import synthetic

            return synthetic.generate_one(index=int(i), **self.generator)[0]
        from tlcompile.runtime.preprocess import read_input

        return read_input(self.paths[i], draft_size=self.draft_size)[0]


@dataclass
class DataModule:
    """Preprocessed images and labels with their split; arrays are aligned by index."""

    images: np.ndarray | None  # (N, S, S, 3) uint8, already cropped and resized; None with split_images
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
    # data.store: disk: each split's images, memory-mapped from the store (rows = images[split == name], in order)
    split_images: dict[str, np.ndarray] | None = None
    loader_workers: int = 0  # data.loader_workers: processes reading training batches from split_images
    # Generated data: synthetic.generate_one's arguments (seed, size, difficulty, style), so photo(i) can re-draw the
    # frame the camera would have given; None for photographs read from files (paths).
    generator: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, targets) of one split."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        mask = self.split == name
        if self.split_images is not None:
            return self.split_images[name], self.targets[mask]
        return self.images[mask], self.targets[mask]

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` (an index into ids/grades/split), whether the images are in memory or in the disk store."""
        if self.split_images is None:
            return self.images[i]
        return self.split_images[str(self.split[i])][int(self._row_in_split[i])]

    @functools.cached_property
    def _row_in_split(self) -> np.ndarray:
        """Per image, its row in its split's array (images[split == name] order)."""
        rows = np.empty(len(self.split), np.int64)
        for name in SPLITS:
            mask = self.split == name
            rows[mask] = np.arange(int(mask.sum()))
        return rows

    def photo(self, i: int) -> np.ndarray:
        """Photo ``i`` as the camera gave it (uint8 RGB), before preprocessing: the source file decoded as predict
        decodes it, or the generated frame re-drawn (bit for bit: image i of the generator does not depend on n)."""
        return self.photo_source()(i)

    def photo_source(self) -> PhotoSource:
        """:meth:`photo` without the data module's images: small and picklable, for another process."""
        return PhotoSource(self.generator, tuple(self.paths), self.spec.draft_size)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name in SPLITS:
            t = self.targets[self.split == name]
            out[name] = {self.class_names[c]: int((t == c).sum()) for c in range(self.num_classes)}
        return out

    def split_class_gap(self) -> str | None:
        """Why val or test cannot judge the referral (no referable image, or none that is not), or None: val locks the
        operating point and test measures it, and neither is defined on one class (a build got 'val AUC nan' and a
        threshold of 1.0, and failed at its very end)."""
        from tlcompile.evaluate.metrics import referable_truth

        for name in ("val", "test"):
            truth = referable_truth(self.targets[self.split == name], self.num_classes)
            positives, total = int(truth.sum()), int(truth.size)
            if positives == 0 or positives == total:
                return (
                    f"the {name} split has {positives} referable and {total - positives} non-referable images; val "
                    "and test each need both to lock and measure the referral (sensitivity and specificity): add "
                    "images of the kind missing, or give val and test a larger share (data.split)"
                )
        return None

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
    cache: PreprocessCache | None = None


def _read_files(cfg: DataConfig, spec: PreprocessSpec, progress: Progress = None) -> _Read:
    from tlcompile.runtime.inference import default_threads

    listing = list_records(cfg)
    records = listing.records
    cache = None
    if cfg.cache is not None:
        from tlcompile.data.cache import PreprocessCache

        cache = PreprocessCache(cfg.cache, spec)
    min_side = cfg.min_image_side or cfg.image_size

    on_disk = cfg.store == "disk"

    def inspect(i: int) -> Inspected:
        r = records[i]
        x = inspect_file(r.path, spec, where=r.where, image_id=r.id, min_side=min_side, cache=cache)
        if on_disk:  # the pixels are in the cache entry now; the store is assembled from the entries later
            x.image = None
        return x

    workers = max(1, min(MAX_DECODE_THREADS, default_threads(), len(records)))
    inspected: list[Inspected] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for x in pool.map(inspect, range(len(records))):
            inspected.append(x)
            if progress is not None:
                progress("reading", len(inspected), len(records))

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
        listing=listing,
        inspected=inspected,
        keep=[i for i in range(len(records)) if i not in bad],
        report=report,
        cache=cache,
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


def _assemble(
    cfg: DataConfig, seed: int, spec: PreprocessSpec, read: _Read, *, store: bool = True, progress: Progress = None
) -> DataModule:
    """``store=False`` (data checks): with data.store: disk the split is drawn but no store is written."""
    records = [read.listing.records[i] for i in read.keep]
    if not records:
        raise DataError(
            f"{read.report.location}: no usable images ({len(read.report.problems)} with problems, "
            f"{len(read.report.excluded)} left out on purpose)"
        )
    on_disk = cfg.store == "disk"
    images = None if on_disk else np.stack([read.inspected[i].image for i in read.keep])
    grades = np.asarray([r.grade for r in records], dtype=np.int64)
    targets = targets_for(grades, cfg.task)
    patients = [r.patient for r in records]
    split = _split_for(cfg, targets, patients, [r.split for r in records], seed)
    split_images = None
    if on_disk and store:
        split_images = _file_store(spec, read, split, progress)
    return DataModule(
        split_images=split_images,
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


def _file_store(spec: PreprocessSpec, read: _Read, split: np.ndarray, progress: Progress) -> dict[str, np.ndarray]:
    """The split files of ``data.store: disk`` for images read from files: rows copied from the cache entries."""
    from tlcompile.data.cache import spec_key
    from tlcompile.data.store import build_split_store, store_key

    cache = read.cache
    assert cache is not None  # the recipe refuses data.store: disk without data.cache
    shas = [read.inspected[i].sha256 or "" for i in read.keep]
    key = store_key(spec_key(spec), shas, [str(s) for s in split])

    def row(j: int) -> np.ndarray:
        entry = cache.get(shas[j])
        if entry is not None:
            return entry.image
        # The entry went missing or was damaged since it was read: read the photograph again.
        record = read.listing.records[read.keep[j]]
        again = inspect_file(record.path, spec, where=record.where, image_id=record.id, min_side=1, cache=cache)
        if again.image is None:
            raise DataError(f"data.store: '{record.path}' could not be read again for the store ({again.problem})")
        return again.image

    size = spec.size
    return build_split_store(
        cache.folder / "store" / key,
        split,
        row,
        (size, size, 3),
        {"images": len(shas), "spec": spec.to_dict()},
        progress=None if progress is None else lambda d, t: progress("writing the store", d, t),
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
def load_data(
    cfg: DataConfig,
    *,
    seed: int,
    report_dir: Path | None = None,
    progress: Progress = None,
    preprocess_version: int | None = None,
) -> DataModule:
    """Build the data module for a recipe's data section.

    File sources are checked as they are read; with ``data.on_error: fail`` any problem raises
    :class:`DataProblemsError` listing them, with ``skip`` exactly the problem images are left out. With
    ``report_dir`` the check report (``data_check.json``, ``problems.csv``) is written there in both cases.
    ``preprocess_version``: prepare the images with that version's arithmetic (a bundle's, to score its model on the
    pixels it was trained on); None: this tlcompile's.
    """
    spec = preprocess_spec(cfg)
    if preprocess_version is not None:
        spec = dataclasses.replace(spec, version=preprocess_version)
    if cfg.source == "synthetic":
        dm = _load_synthetic(cfg, spec, seed, progress)
    else:
        read = _read_files(cfg, spec, progress)
        if read.report.problems and cfg.on_error == "fail":
            csv_path = read.report.write(report_dir)[1] if report_dir is not None else None
            raise DataProblemsError(read.report.failure_message(csv_path), read.report)
        dm = _assemble(cfg, seed, spec, read, progress=progress)
        _complete_report(read.report, cfg, dm, seed, read.listing.patient_rule)
    if report_dir is not None and dm.report is not None:
        dm.report.write(report_dir)
    dm.loader_workers = cfg.loader_workers
    return dm


def check_data(cfg: DataConfig, *, seed: int) -> DataReport:
    """Run the data checks alone (``tlcompile data check``): every problem is listed, none raised; the counts, sizes and
    split describe the images that would be used (as with ``data.on_error: skip``)."""
    spec = preprocess_spec(cfg)
    if cfg.source == "synthetic":
        return _load_synthetic(cfg, spec, seed).report
    read = _read_files(cfg, spec)
    try:
        dm = _assemble(cfg, seed, spec, read, store=False)
    except DataError as err:  # too few usable images to split: the problems above say why
        read.report.notes.append(f"no split could be drawn: {err}")
        return read.report
    _complete_report(read.report, cfg, dm, seed, read.listing.patient_rule)
    if (gap := dm.split_class_gap()) is not None:
        read.report.notes.append(f"no build can use this split: {gap}")
    return read.report


def _draw_prepared(args: tuple) -> list[tuple[np.ndarray, int, bool]]:
    """One chunk of generated images, preprocessed (a process pool's task: picklable arguments, module-level)."""
    from tlcompile.data import synthetic

    indices, seed, raw_size, difficulty, style, spec = args
    out = []
    for i in indices:
        image, grade = synthetic.generate_one(seed, i, size=raw_size, difficulty=difficulty, style=style)
        prepared, found = prepare_image(image, spec)
        out.append((prepared, int(grade), bool(found)))
    return out


# numpy's BLAS (OpenBLAS) starts a thread per core in every process, for the generator's matrix products
# (synthetic._blobs); in a pool of one process per core they only fight each other: 2 processes drew 1.14x the images
# of one at 384 px, 2 AMD EPYC cores. The images are the same bytes with one BLAS thread.
_ONE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_SCRIPT_NEEDS_MAIN_GUARD = (
    "data.store: disk draws generated images in worker processes, which import the script that started them; put "
    'the script\'s own code under `if __name__ == "__main__":` (the tlcompile command needs nothing)'
)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Processes started inside run numpy's BLAS on one thread (they inherit the environment at their start)."""

    saved = {name: os.environ.get(name) for name in _ONE_THREAD_ENV}
    os.environ.update(dict.fromkeys(_ONE_THREAD_ENV, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Drawing:
    """Generated images, preprocessed, in index order (``draw(indices)`` yields (image, grade, fov found)): in this
    process, or across ``workers`` spawned processes with one BLAS thread each, started on the first draw (a filled
    store needs none) and stopped when the block ends. A host without process pools draws in this process.
    ``why_broken`` ends the one-line error when a worker dies."""

    def __init__(self, args: tuple, workers: int, why_broken: str) -> None:
        self.args, self.workers, self.why_broken = args, workers, why_broken
        self.pool = None

    def __enter__(self) -> _Drawing:
        return self

    def __exit__(self, *_: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def draw(self, indices: range) -> Iterator[tuple[np.ndarray, int, bool]]:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        from multiprocessing import get_context

        tasks = [(list(indices[k : k + 16]), *self.args) for k in range(0, len(indices), 16)]
        if self.workers > 1 and self.pool is None:
            try:
                self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
            except (OSError, NotImplementedError):  # no process pools on this host (no /dev/shm): the same images
                self.workers = 1
        if self.pool is None:
            for part in map(_draw_prepared, tasks):
                yield from part
            return
        with _one_blas_thread():  # the processes start as the tasks are handed out
            results = self.pool.map(_draw_prepared, tasks)
        try:
            for part in results:
                yield from part
        except BrokenProcessPool as err:
            raise DataError(f"a process drawing the synthetic images ended early ({self.why_broken})") from err


def _generated_store(
    cfg: DataConfig, spec: PreprocessSpec, seed: int, raw_size: int, difficulty: float, progress: Progress
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """data.store: disk for generated images: every image drawn and preprocessed once, across processes, into the
    cache (keyed by the generator's arguments and the preprocessing); returns (record-order file, grades, fov)."""
    import hashlib
    import json
    from multiprocessing import current_process

    from tlcompile.data import store
    from tlcompile.data.cache import PreprocessCache
    from tlcompile.runtime.inference import default_threads

    if getattr(current_process(), "_inheriting", False):
        # A worker process importing a caller's script that has no main guard, which called this again: it would
        # wait for the store's lock (held by its parent, which waits for it). End it with the reason instead.
        raise SystemExit(f"tlcompile: {_SCRIPT_NEEDS_MAIN_GUARD}")
    cache = PreprocessCache(cfg.cache, spec)  # type: ignore[arg-type]  # the recipe requires data.cache here
    what = {"n": cfg.num_images, "seed": seed, "raw": raw_size, "difficulty": difficulty, "style": cfg.style}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
    path = cache.folder / "synthetic" / f"{key}.npy"
    workers = max(1, min(default_threads(), cfg.num_images // 64 or 1))
    why = f"killed, out of memory, or started from a script without a main guard: {_SCRIPT_NEEDS_MAIN_GUARD}"
    with _Drawing((seed, raw_size, difficulty, cfg.style, spec), workers, why) as drawing:
        grades, fov = store.fill_generated(
            path,
            cfg.num_images,
            (spec.size, spec.size, 3),
            drawing.draw,
            chunk=256,
            progress=None if progress is None else lambda d, t: progress("generating", d, t),
        )
    return path, grades, fov


# Whether generated data held in memory may be drawn across worker processes. Spawned workers import the script that
# started the build; the tlcompile command (whose entry point is guarded) allows it, a caller's own script does not
# get them unless it says so, so a script without a main guard keeps working as it always has.
_WORKER_PROCESSES = {"allowed": False}
_ALLOW_NEEDS_MAIN_GUARD = (
    'allow_worker_processes() was called outside `if __name__ == "__main__":`; the worker processes import the '
    "script that started them, so call it, and the script's own code, under that guard"
)


def process_map(fn: Callable[[Any], Any], tasks: list[Any], *, workers: int) -> list[Any]:
    """``[fn(t) for t in tasks]``, across up to ``workers`` spawned processes (numpy's BLAS on one thread in each)
    when :func:`allow_worker_processes` was called and there is more than one task and worker. ``fn`` and the tasks
    must be picklable and ``fn`` deterministic: where no process pool can start, or a worker ends early (a script
    without a main guard, the memory), the tasks run in this process instead, with the same results."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    workers = min(workers, len(tasks))
    if workers > 1 and _WORKER_PROCESSES["allowed"]:
        try:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        except (OSError, NotImplementedError):  # no process pools on this host (no /dev/shm)
            pool = None
        if pool is not None:
            try:
                with pool, _one_blas_thread():
                    return list(pool.map(fn, tasks))
            except BrokenProcessPool:
                pass
    return [fn(t) for t in tasks]


def allow_worker_processes(allowed: bool = True) -> None:
    """Let :func:`load_data` draw generated images held in memory across processes, one per usable core (the images
    are the same bytes). Call it from code under ``if __name__ == "__main__":``; the tlcompile command does."""
    from multiprocessing import current_process

    if allowed and getattr(current_process(), "_inheriting", False):
        # A worker importing a script that allows worker processes outside its main guard: it would run the script
        # again in every worker. End it here, with the reason (the parent's pool then reports it).
        raise SystemExit(f"tlcompile: {_ALLOW_NEEDS_MAIN_GUARD}")
    _WORKER_PROCESSES["allowed"] = bool(allowed)


def _generated_in_memory(
    cfg: DataConfig, spec: PreprocessSpec, seed: int, raw_size: int, difficulty: float, progress: Progress
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated images drawn and preprocessed into memory: (images, grades, fov found), in index order; across
    processes when :func:`allow_worker_processes` was called (quickstart, 1,500 images at 140 px: 18.0 s in one
    process, 11.2 s in two, on a 2-core AMD EPYC with AVX2 only)."""
    from tlcompile.runtime.inference import default_threads

    n = cfg.num_images
    # The node's cores are shared by its torchrun ranks, each drawing its own copy of the data.
    cores = max(1, default_threads() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    workers = max(1, min(cores, n // 64 or 1)) if _WORKER_PROCESSES["allowed"] else 1
    images = np.empty((n, spec.size, spec.size, 3), np.uint8)
    grades = np.empty(n, np.int64)
    fov = np.empty(n, bool)
    why = f"killed, out of memory, or {_ALLOW_NEEDS_MAIN_GUARD}"
    with _Drawing((seed, raw_size, difficulty, cfg.style, spec), workers, why) as drawing:
        for i, (image, grade, found) in enumerate(drawing.draw(range(n))):
            images[i], grades[i], fov[i] = image, grade, found
            if progress is not None and ((i + 1) % 16 == 0 or i + 1 == n):
                progress("generating", i + 1, n)
    return images, grades, fov


def _load_synthetic(cfg: DataConfig, spec: PreprocessSpec, seed: int, progress: Progress = None) -> DataModule:
    from tlcompile.data import synthetic

    # Render larger than the input with the field of view wandering in the frame, then preprocess like
    # a camera image, so the crop is exercised exactly as in deployment.
    raw_size = int(round(cfg.image_size * 1.25))
    difficulty = synthetic.DEFAULT_DIFFICULTY if cfg.difficulty is None else cfg.difficulty
    ids = [f"syn{seed}_{i:06d}" for i in range(cfg.num_images)]
    split_images = None
    if cfg.store == "disk":
        path, grades, fov_found = _generated_store(cfg, spec, seed, raw_size, difficulty, progress)
        targets = targets_for(grades, cfg.task)
        split = stratified_split(targets, val=cfg.split.val, test=cfg.split.test, seed=seed, groups=ids)
        from tlcompile.data.store import RowReader, build_split_store, store_key

        reader = RowReader(path)
        split_images = build_split_store(
            path.parent.parent / "store" / store_key(path.stem, ids, [str(s) for s in split]),
            split,
            lambda i: reader.read([i])[0],
            (spec.size, spec.size, 3),
            {"images": cfg.num_images, "generated": path.name},
            progress=None if progress is None else lambda d, t: progress("writing the store", d, t),
        )
        images = None
    else:
        images, grades, fov_found = _generated_in_memory(cfg, spec, seed, raw_size, difficulty, progress)
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
        images=images,
        split_images=split_images,
        grades=np.asarray(grades, dtype=np.int64),
        targets=targets,
        ids=ids,
        patients=list(ids),
        split=split,
        spec=spec,
        task=cfg.task,
        class_names=class_names_for(cfg.task),
        fov_found=np.asarray(fov_found, dtype=bool),
        balance=cfg.balance,
        report=report,
        generator={"seed": seed, "size": raw_size, "difficulty": difficulty, "style": cfg.style},
    )
    _complete_report(report, cfg, dm, seed, "generated images: each is its own patient")
    return dm
