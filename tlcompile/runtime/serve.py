"""``tlcompile serve``: a fundus camera drops images into a folder; each gets a JSON record (never imports torch).

The records are the ledger. Every image gets exactly one record, written atomically (temporary name, fsync,
rename): ``OUT/<image name>.json`` with the decision, or ``OUT/errors/<image name>.json`` when the file cannot be
read. Each record carries the image's name, size, mtime and sha256, so after a crash or a restart:

- an image whose record exists is not redone (same name and size+mtime, or same name and same content);
- an image without a record is processed: a kill before the rename leaves no record, so nothing is lost;
- a different image under a name already used (a camera counter reset) gets ``<name>.<sha256[:12]>.json``;
- a file rewritten in place with the same size and mtime is still seen as new: its inode and ctime change.

A file is taken only once its size, mtime, inode and ctime have stayed the same for ``settle`` seconds on this
service's own clock, so a frame the camera is still writing is not read half-way (and a camera clock that is off
does not matter). A file that still fails as a truncated or empty image (a camera that paused longer than
``settle``) is retried after it settles again, up to ``TRUNCATION_RETRIES`` times, before its error record is
written; when it later decodes, its result goes under the normal name. Hidden files and usual partial-download
names are ignored; any other file gets a result or an error record, so an unexpected format is reported, never
silently skipped. Whatever goes wrong with one file (unreadable, a name too long for the records folder, a
decoder failure) becomes that file's error record and the service goes on; only a failure to write its own
records stops it, with one line. A record's name always fits: a long image name is shortened and given a hash of
the full name (the record keeps the full name in ``file``). The input folder is never modified.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlcompile.errors import TlcompileError
from tlcompile.io import atomic_write_json, fitting_name, sha256_file
from tlcompile.runtime import dicom
from tlcompile.runtime.bundle import UNGRADABLE, VerifiedBundle, open_verified
from tlcompile.runtime.outputs import refuse_inside_bundle, refuse_linked_folder
from tlcompile.runtime.pipeline import check_workers, ordered
from tlcompile.runtime.predict import PreparedImage, decide, prepare_photo
from tlcompile.runtime.preprocess import IMAGE_EXTENSIONS
from tlcompile.runtime.terminal import printable

# Names a camera or a copy tool uses while a file is still being written; such files are left alone.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp", ".lock")
ERRORS_DIR = "errors"
LOCK_FILE = ".serve.lock"
_COLLISION = re.compile(r"(?P<name>.+)\.[0-9a-f]{12}")
TRUNCATION_RETRIES = 3  # a file that still looks cut off is retried this many times before its error record
RETRY_MIN_WAIT = 0.5  # seconds a retried file must stay unchanged again (at least; --settle when longer)
_TRUNCATION = re.compile(
    r"truncat|end of (file|stream|data)|premature end|unexpected end|broken data stream|\bEOF\b", re.IGNORECASE
)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"II*\x00", b"MM\x00*", b"BM")


def record_stem(name: str) -> str:
    """The record's file name without .json: the image name, or for a long name its first ~120 bytes (whole
    characters) + '~' + 16 hex digits of the full name's sha256, so that every record name fits the filesystem."""
    return fitting_name(name)


def looks_truncated(message: str, head: bytes, size: int) -> bool:
    """An error a file still being written gives: empty, cut off mid-stream, or an image signature with nothing
    decodable after it."""
    if size == 0 or _TRUNCATION.search(message):
        return True
    return "not an image Pillow can read" in message and head.startswith(_IMAGE_MAGIC)


@dataclass
class ServeStats:
    results: int = 0  # new result records written by this run
    errors: int = 0  # new error records written by this run
    already_done: int = 0  # images found with a record from an earlier run (not redone)
    pending: int = 0  # files still settling when the service stopped

    def summary(self) -> str:
        return (
            f"{self.results} results and {self.errors} error records written; {self.already_done} images already done"
            + (f"; {self.pending} still being written (picked up next time)" if self.pending else "")
        )


class Ledger:
    """The records in OUT (and OUT/errors), indexed by image name; reads a record only when its image shows up."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.errors_dir = out_dir / ERRORS_DIR
        self._paths: dict[str, list[Path]] = {}
        self._keys: dict[Path, dict[str, Any]] = {}
        refuse_linked_folder(self.errors_dir, "error records")
        try:
            self.errors_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.out_dir, self.errors_dir):
                for path in folder.iterdir():
                    if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
                        path.unlink()  # a write a kill interrupted; its image has no record and will be redone
                    elif path.suffix == ".json" and path.is_file():
                        self._index(path)
        except OSError as err:
            where = err.filename or self.errors_dir
            raise TlcompileError(
                f"cannot use the records folder: {where} ({err.strerror or err}); "
                f"--out must be a folder this service can write, with a sub-folder {ERRORS_DIR}/"
            ) from err

    def _index(self, path: Path) -> None:
        # Indexed by record stem; a record found under a name maps back to its image through its 'file' field.
        stem = path.name[: -len(".json")]
        self._paths.setdefault(stem, []).append(path)
        match = _COLLISION.fullmatch(stem)
        if match:
            self._paths.setdefault(match["name"], []).append(path)

    def _records_for(self, name: str) -> list[dict[str, Any]]:
        records = []
        for path in self._paths.get(record_stem(name), []):
            if path not in self._keys:
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                    self._keys[path] = {k: record.get(k) for k in _KEY_FIELDS}
                except (OSError, ValueError, RecursionError, AttributeError):  # not a record (not an object)
                    self._keys[path] = {}  # unreadable: matches nothing, so the image is decided again
            if self._keys[path].get("file") == name:
                records.append(self._keys[path])
        return records

    def done_by_stat(self, name: str, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> bool:
        """A record of this very file: same size and mtime, and (records since inode/ctime were kept) the same
        inode and ctime, so a rewrite in place that keeps size and mtime is not mistaken for done."""
        return any(
            r.get("size") == size
            and r.get("mtime_ns") == mtime_ns
            and (r.get("ino") is None or (r.get("ino") == ino and r.get("ctime_ns") == ctime_ns))
            for r in self._records_for(name)
        )

    def done_by_content(self, name: str, sha256: str) -> bool:
        return any(r.get("sha256") == sha256 for r in self._records_for(name))

    def write(self, record: dict[str, Any], *, error: bool) -> Path:
        name = record["file"]
        # Unreadable files have no sha256: their identity is the stat they were recorded under.
        tag = record["sha256"] or hashlib.sha256(repr([record[k] for k in _KEY_FIELDS]).encode()).hexdigest()
        folder = self.errors_dir if error else self.out_dir
        if error:  # again before each write: a link put there while serve runs would be written through
            refuse_linked_folder(folder, "error records")
        stem = record_stem(name)
        path = folder / f"{stem}.json"
        if path.exists():
            # Another image had this name before (its content differs, or it would count as done): keep both. An
            # error record of a file that later decodes (the camera finished it) is in errors/, so its result still
            # gets the normal name.
            path = folder / f"{stem}.{tag[:12]}.json"
        try:
            atomic_write_json(path, record)
            path.chmod(0o644)  # read by the clinic's other systems, often as another user
        except OSError as err:
            raise TlcompileError(
                f"cannot write the record of {name} into {folder} ({err.strerror or err}); "
                "stopped so that no image goes "
                "unrecorded: fix the output folder and restart, the image will be decided then"
            ) from err
        self._index(path)
        self._keys[path] = {k: record.get(k) for k in _KEY_FIELDS}
        return path


_KEY_FIELDS = ("file", "size", "mtime_ns", "ino", "ctime_ns", "sha256")


def _lock(out_dir: Path) -> Any:
    """Hold OUT/.serve.lock for the life of the process: two services writing one ledger would redo images.
    The OS drops the lock when the process dies, even by SIGKILL, so a restart is never blocked by a stale lock."""
    try:
        handle = open(out_dir / LOCK_FILE, "a+")  # held open on purpose until serve() returns
    except OSError as err:
        raise TlcompileError(
            f"cannot open {out_dir / LOCK_FILE} ({err.strerror or err}); --out must be a folder this service can write"
        ) from err
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: run without the guard
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise TlcompileError(
            f"another tlcompile serve is already writing into '{out_dir}' (it holds {out_dir / LOCK_FILE}); "
            "stop it first"
        ) from err
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from the next: size, mtime, inode, ctime."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _wanted(entry: os.DirEntry) -> bool:
    name = entry.name
    if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
        return False
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:  # cannot even tell (a link into a folder we may not read): taken, and recorded as an error
        return not entry.is_dir(follow_symlinks=False)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class _Read:
    """What a worker found for one file: removed, already done (same content), prepared for the model, or an
    error to record."""

    sha256: str | None = None
    head: bytes = b""
    gone: bool = False
    done: bool = False
    prepared: PreparedImage | None = None
    error: Exception | None = None
    changed: bool = False  # written to while it was read: the hash and the pixels may be of two versions


class Service:
    """One watch folder, one output folder, one verified bundle; :meth:`poll` does one pass."""

    def __init__(
        self,
        verified: VerifiedBundle,
        watch: Path,
        out_dir: Path,
        *,
        settle: float,
        log: Callable[[str], None],
        once: bool = False,
        outputs: Sequence[Any] = (),
        workers: int = 1,
        explain: bool = False,
    ) -> None:
        self.verified, self.watch, self.out_dir, self.settle, self.log, self.once = (
            verified,
            watch,
            out_dir,
            settle,
            log,
            once,
        )
        self.workers = workers
        # The ledger is read by the workers (has this content a record?) and written by the service's thread.
        self._ledger_lock = threading.Lock()
        self._watch_error: str | None = None
        self.ledger = Ledger(out_dir)
        self.stats = ServeStats()
        self._done: set[tuple[str, int, int, int, int]] = set()
        # name -> (stat key, first seen unchanged on the monotonic clock, seconds it must stay unchanged)
        self._seen: dict[str, tuple[tuple[int, int, int, int], float, float]] = {}
        self._retries: dict[str, int] = {}  # name -> truncation retries so far
        self._noted: set[str] = set()  # sub-folders already named in the log (each once)
        self._changing: set[str] = set()  # files found changed while read, already said (until recorded)
        # Extra outputs per record (e.g. runtime.fhir.FhirOutput): write(record) -> fields added to the record.
        self.outputs = list(outputs)
        self.explainer = None
        if explain:  # --explain: a heatmap PNG beside each gradable image's record (runtime/explain.py)
            from tlcompile.runtime.explain import Explainer

            self.explainer = Explainer(verified.bundle, verified.session)

    def poll(self, stop: threading.Event) -> int:
        """Decide every settled new image in the folder (oldest first); returns how many are still settling."""
        now = time.monotonic()
        ready, pending, present = [], 0, set()
        try:
            entries = list(os.scandir(self.watch))
        except OSError as err:
            # A network share that drops for a minute must not end a service that runs all day: say so once, retry.
            message = f"cannot read the watch folder {self.watch} ({err.strerror or err})"
            if self.once:
                raise TlcompileError(message) from err
            if message != self._watch_error:
                self.log(f"{message}; retrying every poll")
            self._watch_error = message
            return 0
        if self._watch_error:
            self.log(f"the watch folder {self.watch} is readable again")
            self._watch_error = None
        for entry in entries:
            try:
                if not _wanted(entry):
                    self._note_folder(entry)
                    continue
                try:
                    st = entry.stat(follow_symlinks=True)
                except FileNotFoundError:
                    raise
                except OSError:  # e.g. a link we may not follow: keyed by the link itself, recorded as an error
                    st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed while we looked
                continue
            except OSError:
                continue  # not even the directory entry can be read: nothing to key a record on; seen next poll
            stat_key = _stat_key(st)
            key = (entry.name, *stat_key)
            present.add(entry.name)
            if key in self._done:
                continue
            seen = self._seen.get(entry.name)
            if seen is None or seen[0] != stat_key:
                wait = (
                    self.settle if seen is None or entry.name not in self._retries else max(self.settle, RETRY_MIN_WAIT)
                )
                self._seen[entry.name] = seen = (stat_key, now, wait)
            if now - seen[1] < seen[2]:
                pending += 1
                continue
            ready.append((st.st_mtime_ns, entry.name, stat_key))
        for name in set(self._seen) - present:
            del self._seen[name]
            self._retries.pop(name, None)
        for (name, stat_key), read in ordered(self._read, self._not_done(sorted(ready)), self.workers, stop=stop):
            if not self._take(name, stat_key, read):
                pending += 1  # to be retried once it has settled again
        return pending

    def _not_done(
        self, ready: list[tuple[int, str, tuple[int, int, int, int]]]
    ) -> Iterator[tuple[str, tuple[int, int, int, int]]]:
        """The settled files (oldest first) that have no record under the same name and stat; consumed in this
        thread as workers free up, so the ledger is only ever read and written here (or under its lock)."""
        for _mtime_ns, name, stat_key in ready:
            size, mtime_ns, ino, ctime_ns = stat_key
            with self._ledger_lock:
                done = self.ledger.done_by_stat(name, size, mtime_ns, ino, ctime_ns)
            if done:
                self._done.add((name, *stat_key))
                self.stats.already_done += 1
                continue
            yield name, stat_key

    def _note_folder(self, entry: os.DirEntry) -> None:
        """One line, once, for a sub-folder of the watch folder: a camera or a DICOM export that files photos per day
        or per patient got no record and no word (the service reads the folder's own files, as predict does)."""
        try:
            if entry.name.startswith(".") or entry.name in self._noted or not entry.is_dir(follow_symlinks=True):
                return
            if os.path.realpath(entry.path) == os.path.realpath(self.out_dir):  # its own results/: looked at once
                self._noted.add(entry.name)
                return
        except OSError:
            return
        self._noted.add(entry.name)
        where = printable(str(self.watch))
        self.log(
            f"note: {printable(entry.name)}/ is a folder; serve decides the files directly in {where}, not in its "
            "sub-folders (serve that folder with its own --watch, or move its photos up)"
        )

    def _read(self, item: tuple[str, tuple[int, int, int, int]]) -> _Read:
        """Hash, check and preprocess one file; runs in a worker thread, so it changes no state of the service and
        returns whatever goes wrong instead of raising it."""
        name, stat_key = item
        path = self.watch / name
        read = _Read()
        try:
            if path.is_symlink() and not path.resolve().is_relative_to(self.watch.resolve()):
                # not read, not hashed: whoever can write the camera's folder must not learn of files outside it
                raise TlcompileError(
                    f"{name}: a symbolic link to a file outside the watch folder; not read (copy the photo in instead)"
                )
            try:
                read.sha256 = sha256_file(path)
                with open(path, "rb") as f:
                    read.head = f.read(132)  # image signatures, and DICOM's DICM marker at byte 128
            except FileNotFoundError:
                read.gone = True  # removed before we read it: nothing to record
                return read
            except OSError as err:
                raise TlcompileError(
                    f"{path}: cannot read the file ({err.strerror or err}); check its owner and permissions"
                ) from err
            with self._ledger_lock:
                read.done = self.ledger.done_by_content(name, read.sha256)
            if read.done:
                return read
            if path.suffix.lower() not in IMAGE_EXTENSIONS and not dicom.is_dicom(path, read.head):
                raise TlcompileError(
                    f"{name}: '{path.suffix or '(none)'}' is not an image type this service reads; "
                    f"valid: {', '.join(IMAGE_EXTENSIONS)}, or a DICOM file (DICM marker) of any name"
                )
            read.prepared = prepare_photo(self.verified.bundle, path)
        except Exception as err:  # broad on purpose: any failure is this file's error record (see _take)
            read.error = err
        # A camera that paused longer than --settle and then wrote the rest: hashed as half a file, decoded whole (or
        # cut off). Any write after the poll's look changes the file's time, size or inode.
        try:
            read.changed = _stat_key(os.stat(path)) != stat_key
        except OSError:
            pass  # gone or unreadable now: what was read stands
        return read

    def _take(self, name: str, stat_key: tuple[int, int, int, int], read: _Read) -> bool:
        """Decide one file read by :meth:`_read` and write its record; False when it is left for a retry (it looked
        cut off). Runs in the service's own thread, one file at a time, in the order the files were taken."""
        path = self.watch / name
        size, mtime_ns, ino, ctime_ns = stat_key
        key = (name, *stat_key)
        if read.gone:
            return True
        if read.changed:
            self._seen.pop(name, None)  # seen anew: it must stay unchanged for --settle again before it is read
            if name not in self._changing:  # once per file: one still being appended is read again at every settle
                self._changing.add(name)
                self.log(
                    f"{printable(name)}: changed while it was read (still being written?); read again once it settles"
                )
            return False
        if read.done:
            self._done.add(key)
            self.stats.already_done += 1
            return True
        record: dict[str, Any] = {
            "file": name,
            "path": os.path.abspath(path),
            "size": size,
            "mtime_ns": mtime_ns,
            "ino": ino,
            "ctime_ns": ctime_ns,
            "sha256": read.sha256,
        }
        v = self.verified
        head = read.head
        # A bad frame must never stop the service: whatever reading or deciding this one file raised becomes its
        # error record. Writing the record stays outside the try: if the output folder is unwritable nothing can be
        # recorded, and the service stops with that error rather than dropping images.
        try:
            if read.error is not None:
                raise read.error
            assert read.prepared is not None
            result = decide(v.bundle, v.session, read.prepared).to_dict()
            result.pop("file")
            if self.explainer is not None:
                result.update(self._explain(name, read))
            record.update(status="ok", **result)
            error = False
        except Exception as err:  # broad on purpose: see above
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            tries = self._retries.get(name, 0)
            if isinstance(err, TlcompileError) and tries < TRUNCATION_RETRIES and looks_truncated(message, head, size):
                self._retries[name] = tries + 1
                self._seen[name] = (stat_key, time.monotonic(), max(self.settle, RETRY_MIN_WAIT))
                self.log(
                    f"{printable(name)}: looks cut off ({message}); retry {tries + 1} of {TRUNCATION_RETRIES} "
                    "once it settles again"
                )
                return False
            record.update(status="error", error=message, error_type=type(err).__name__)
            if tries:
                record["retries"] = tries
            error = True
        record.update(
            bundle={
                "name": v.bundle.name,
                "artifact": v.bundle.artifact,
                "runtime": v.bundle.runtime,
                "candidate": v.bundle.candidate_id,
                "pinned": v.pinned,
                "manifest_sha256": v.manifest_sha256,
                **({"signed_by": v.signed_by} if v.signed_by else {}),
            },
            processed_at=_now(),
            service_pid=os.getpid(),
        )
        for output in self.outputs:  # before the record: a crash in between redoes the image, never loses an output
            record.update(output.write(record))
        with self._ledger_lock:
            written = self.ledger.write(record, error=error)
        self._done.add(key)
        self._retries.pop(name, None)
        self._changing.discard(name)
        if error:
            self.stats.errors += 1
            self.log(f"{printable(name)}: ERROR {printable(record['error'])} -> {printable(str(written))}")
        else:
            self.stats.results += 1
            detail = (
                f" ({printable(str(record.get('ungradable_reason') or 'no reason recorded'))}"  # what a retake must fix
                if record["referral"] == UNGRADABLE
                else f" (P(referable DR) {record['referable_dr_probability']:.3f}"
            )
            if record["referral"] != UNGRADABLE and record.get("grade_name"):
                detail += f", grade {record['grade_name']}"
            self.log(
                f"{printable(name)}: {record['referral']}{detail + ')' if detail else ''} -> {printable(str(written))}"
            )
        return True

    def _explain(self, name: str, read: _Read) -> dict[str, Any]:
        """The heatmap beside the record: ``<record stem>.explain.png``, or with the content's hash when another image
        had that name before. A failure costs the heatmap, never the decision. It runs before the record is written,
        so the record's latency includes it (README: median 185 ms at 112 px): a record is written once and never
        rewritten (Ledger.write keeps an existing record and writes beside it), and readers of OUT take each record
        as it appears, so it must name its heatmap from the start."""
        from tlcompile.runtime.explain import EXPLAIN_SUFFIX, mark_for, mark_of

        assert read.prepared is not None
        stem = record_stem(name)
        source = f"{name} sha256:{read.sha256}"  # a redo after a crash finds its own heatmap by this and replaces it
        target = self.out_dir / f"{stem}{EXPLAIN_SUFFIX}"
        if (target.exists() or target.is_symlink()) and mark_of(target) != mark_for(source):
            target = self.out_dir / f"{stem}.{(read.sha256 or '')[:12]}{EXPLAIN_SUFFIX}"
        try:
            return {"explanation": self.explainer.write(read.prepared, target, source=source)}
        except Exception as err:  # broad on purpose: the record is written either way
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.log(f"{printable(name)}: no heatmap ({printable(message)})")
            return {"explanation": None, "explanation_error": message}


def serve(
    bundle_path: str | Path,
    watch: str | Path,
    out_dir: str | Path | None = None,
    *,
    once: bool = False,
    interval: float = 1.0,
    settle: float = 1.0,
    threads: int | None = None,
    workers: int | None = None,
    trust: list[str | Path] | None = None,
    log: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    outputs: Sequence[Callable[[VerifiedBundle, Path], Any]] = (),
    explain: bool = False,
) -> ServeStats:
    """Watch ``watch`` and write one record per image into ``out_dir`` (default WATCH/results).

    ``once``: decide what is there (waiting for files still being written to settle) and return. Otherwise poll
    every ``interval`` seconds until SIGINT/SIGTERM or ``stop`` is set; the images already being read (at most
    2 x ``workers``) are finished and recorded first. ``workers``: threads that hash, decode and preprocess a
    backlog ahead of the model (None: one per core, up to 4); records are still written one at a time, in order.
    ``outputs``: factories (verified bundle, out_dir) -> extra per-record outputs with ``write(record)`` and
    ``flush(final=)`` (FHIR: runtime/fhir.py). ``explain``: a heatmap PNG beside each gradable image's record, named in
    its ``explanation`` field.
    """
    workers = check_workers(workers)
    watch = Path(watch)
    if not watch.is_dir():
        raise TlcompileError(f"--watch '{watch}' is not a folder; give the folder the camera writes images into")
    if not 0.05 <= interval <= 60:
        raise TlcompileError(f"--interval {interval} s is out of range; valid: 0.05 to 60 seconds")
    if not 0 <= settle <= 600:
        raise TlcompileError(f"--settle {settle} s is out of range; valid: 0 to 600 seconds")
    out_dir = Path(out_dir) if out_dir is not None else watch / "results"
    if out_dir.exists() and not out_dir.is_dir():
        raise TlcompileError(f"--out '{out_dir}' is a file; give a folder for the result records")
    if out_dir.resolve() == watch.resolve():
        raise TlcompileError(
            f"--out '{out_dir}' is the watch folder; the records would be taken for images; give another folder"
        )
    refuse_inside_bundle("--out", out_dir, bundle_path, kind="folder")  # its lock, records and FHIR bundles
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TlcompileError(f"--out '{out_dir}': cannot create the records folder ({err.strerror or err})") from err
    lock = _lock(out_dir)
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        verified = open_verified(bundle_path, threads=threads, trust=trust, workers=workers, explain=explain)
        b = verified.bundle
        log(verified.notice)
        log(
            f"serving {b.name} ({b.candidate_id}, {verified.session.exec_precision}, threshold {b.threshold:.4f}; "
            f"golden samples pass, max |Δlogit| {verified.golden.max_abs_logit_diff:.1e}"
            + (f"; signed by trusted key {verified.signed_by}" if verified.signed_by else "")
            + f"): {watch} -> {out_dir}"
        )
        extra = [make(verified, out_dir) for make in outputs]
        service = Service(
            verified, watch, out_dir, settle=settle, log=log, once=once, outputs=extra, workers=workers, explain=explain
        )
        pending = 0
        while not stop.is_set():
            pending = service.poll(stop)
            for output in extra:
                output.flush(final=once and pending == 0)
            if once and pending == 0:
                break
            # Sleep on the event, so SIGTERM ends the wait at once; --once only waits for files to settle.
            stop.wait(min(interval, max(settle, 0.05)) if once else interval)
        service.stats.pending = pending
        return service.stats
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        lock.close()
