"""The training store (``data.store: disk``): each split's preprocessed images as one uint8 ``.npy`` file on disk,
read a batch at a time, so a build's memory follows the batch, not the data set.

Layout, under the preprocessed-image cache's folder of one preprocessing (``data.cache``/<spec key>/)::

    store/<key>/train.npy, val.npy, test.npy   (n, size, size, 3) uint8, rows in the order DataModule.subset gives
    store/<key>/store.json                     written last: a store without it is unfinished and rebuilt
    synthetic/<key>.npy (+ .done)              generated data sets: every image in index order, filled in chunks

``<key>`` hashes the preprocessing key (spec, preprocessing version, Pillow) with every image's identity in order
(the sha256 of its file's bytes; for generated images the generator's arguments and the index) and its split, so a
store is only reused for exactly the same rows: a later build, check or sweep variant of the same data reads it
instead of decoding again. Rows are copied from the per-image cache entries (file sources) or from the generated
file, so each split file holds exactly the arrays ``images[split == name]`` would in memory, in the same order:
training on it gives the same checkpoints byte for byte.

A killed store build leaves the per-image entries (file sources) or the chunks marked done (generated data):
the next build continues from them. Everything here is derived data; deleting ``store/`` is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tlcompile.errors import DataError
from tlcompile.io import atomic_write_json

SPLIT_FILES = ("train", "val", "test")


def store_key(spec_key: str, identities: Sequence[str], split: Sequence[str]) -> str:
    h = hashlib.sha256(spec_key.encode())
    for ident, s in zip(identities, split, strict=True):
        h.update(f"\0{ident}\1{s}".encode())
    return h.hexdigest()[:24]


def open_split(path: Path) -> np.memmap:
    """A split file as a read-only memory map (nothing is read until rows are indexed)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


class StoreWriter:
    """Appends rows to one ``.npy`` file without holding more than one row: header first, then the bytes."""

    def __init__(self, path: Path, rows: int, shape: tuple[int, ...]) -> None:
        self.path, self.rows, self.written = path, rows, 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        np.lib.format.write_array_header_1_0(self._f, {"descr": "|u1", "fortran_order": False, "shape": (rows, *shape)})

    def append(self, row: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
        self.written += 1

    def close(self) -> None:
        self._f.close()
        if self.written != self.rows:
            raise DataError(f"data.store: '{self.path}' got {self.written} rows of {self.rows}")


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (a lock file beside what is built): torchrun ranks of one node, or sweep variants,
    loading the same data build it once; the others wait, then reuse it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_split_store(
    folder: Path,
    split: np.ndarray,
    row: Callable[[int], np.ndarray],
    shape: tuple[int, int, int],
    meta: dict,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.memmap]:
    """Write (or reuse) ``folder``'s split files from ``row(i)`` over the record indices in order; return them
    memory-mapped. Written into a temporary folder renamed into place, so a reader never sees half a store."""
    with _locked(folder.parent / f".{folder.name}.lock"):
        for stale in folder.parent.glob(f".{folder.name}.*"):  # the temporary folder of a killed build
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return _build_split_store(folder, split, row, shape, meta, progress)


def _build_split_store(
    folder: Path,
    split: np.ndarray,
    row: Callable[[int], np.ndarray],
    shape: tuple[int, int, int],
    meta: dict,
    progress: Callable[[int, int], None] | None,
) -> dict[str, np.memmap]:
    if (folder / "store.json").is_file():
        try:
            return {name: open_split(folder / f"{name}.npy") for name in SPLIT_FILES}
        except (OSError, ValueError):
            pass  # damaged: rebuilt below
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writers = {name: StoreWriter(tmp / f"{name}.npy", int((split == name).sum()), shape) for name in SPLIT_FILES}
        for i, name in enumerate(split):
            writers[str(name)].append(row(i))
            if progress is not None:
                progress(i + 1, len(split))
        for w in writers.values():
            w.close()
        (tmp / "store.json").write_text(json.dumps({**meta, "rows": {k: w.rows for k, w in writers.items()}}))
        if (folder / "store.json").is_file():  # another machine sharing the cache finished the same store meanwhile
            shutil.rmtree(tmp)
        else:
            if folder.exists():  # a damaged or unfinished store of the same key
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: open_split(folder / f"{name}.npy") for name in SPLIT_FILES}


def fill_generated(
    path: Path,
    n: int,
    shape: tuple[int, int, int],
    draw: Callable[[range], Iterable[tuple[np.ndarray, int, bool]]],
    chunk: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every generated image, in index order, in ``path`` (a ``.npy``); grades and field-of-view flags returned.

    Filled a chunk at a time; ``<path>.done`` records the chunks written (with their grades), so a killed fill
    continues where it stopped. ``draw(range)`` yields (prepared image, grade, fov_found) for those indices."""
    with _locked(path.with_suffix(".lock")):
        return _fill_generated(path, n, shape, draw, chunk, progress)


def _fill_generated(
    path: Path,
    n: int,
    shape: tuple[int, int, int],
    draw: Callable[[range], Iterable[tuple[np.ndarray, int, bool]]],
    chunk: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    done_path = path.with_suffix(".done.json")
    grades = np.zeros(n, np.int64)
    fov = np.zeros(n, bool)
    done: dict[str, list] = {}
    if path.is_file() and done_path.is_file():
        try:
            done = json.loads(done_path.read_text())
        except (OSError, ValueError):
            done = {}
    if not done:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape)).flush()
    offset = open_split(path).offset
    row_bytes = int(np.prod(shape))
    fd = os.open(path, os.O_WRONLY)
    try:
        for start in range(0, n, chunk):
            key = str(start)
            if key in done:
                grades[start : start + chunk], fov[start : start + chunk] = done[key][0], done[key][1]
                continue
            stop = min(n, start + chunk)
            block = np.empty((stop - start, *shape), np.uint8)
            for j, (image, grade, found) in enumerate(draw(range(start, stop))):
                block[j], grades[start + j], fov[start + j] = image, grade, found
            os.pwrite(fd, block.tobytes(), offset + start * row_bytes)
            os.fsync(fd)  # the chunk is on disk before it is marked done
            done[key] = [grades[start:stop].tolist(), fov[start:stop].tolist()]
            atomic_write_json(done_path, done)
            if progress is not None:
                progress(stop, n)
    finally:
        os.close(fd)
    return grades, fov


class RowReader:
    """Reads rows of a ``.npy`` store with ``os.pread`` into a fresh array: no memory map, so what a worker process
    holds is the batch it returns. Picklable (path and layout only) for reader processes."""

    def __init__(self, path: str | Path) -> None:
        arr = open_split(Path(path))
        self.path, self.shape = str(path), arr.shape
        self.offset = arr.offset
        self.row_bytes = int(np.prod(arr.shape[1:]))
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def read(self, idx: np.ndarray) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        flat = out.reshape(len(idx), -1)
        for j, i in enumerate(idx):
            data = os.pread(self._fd, self.row_bytes, self.offset + int(i) * self.row_bytes)
            flat[j] = np.frombuffer(data, np.uint8)
        return out


def store_path(images: np.ndarray) -> str | None:
    """The file behind a whole split array of the disk store (as :func:`open_split` returned it); None for anything
    else: an in-memory array, or a view of part of a store (its ``filename`` would name the whole file)."""
    import mmap

    if isinstance(images, np.memmap) and images.filename and isinstance(images.base, mmap.mmap):
        return images.filename
    return None


def _read_rows(reader: RowReader, idx: np.ndarray) -> np.ndarray:
    return reader.read(idx)


def read_batches(path: str, batches: list[np.ndarray], workers: int):
    """uint8 tensors of ``batches`` (row indices) from the store at ``path``, in order: read by ``workers``
    processes, at most two batches per process ahead (0: read here). Only the batches in flight are in memory.

    Not torch's DataLoader: it installs a process-wide SIGCHLD handler that stays after training, and OpenVINO's CPU
    plugin can leave the thread's alternate signal stack pointing at memory it has unmapped (each compiled model
    installs one and restores the one before it when destroyed, so models destroyed out of order leave a dangling
    one). The next child process to exit (any subprocess of the build) then has the kernel kill the build with
    SIGSEGV while delivering SIGCHLD. A plain process pool installs no handler."""
    import torch

    reader = RowReader(path)
    if workers <= 0:
        for idx in batches:
            yield torch.from_numpy(reader.read(idx))
        return
    from collections import deque
    from multiprocessing import get_context

    # Spawned, not forked: a fork copies a process whose OpenMP/oneDNN/OpenVINO thread pools are running, which is
    # undefined behaviour for those libraries; a spawned worker imports only this module and reads with pread.
    with get_context("spawn").Pool(min(workers, len(batches) or 1)) as pool:
        pending: deque = deque()
        ahead = 2 * workers
        for idx in batches:
            pending.append(pool.apply_async(_read_rows, (reader, idx)))
            if len(pending) >= ahead:
                yield torch.from_numpy(pending.popleft().get())
        while pending:
            yield torch.from_numpy(pending.popleft().get())
