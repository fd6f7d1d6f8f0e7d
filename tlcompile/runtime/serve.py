"""``tlcompile serve``: a fundus camera drops images into a folder; each gets a JSON record (never imports torch).

The records are the ledger. Every image gets exactly one record, written atomically (temporary name, fsync,
rename): ``OUT/<image name>.json`` with the decision, or ``OUT/errors/<image name>.json`` when the file cannot be
read. Each record carries the image's name, size, mtime and sha256, so after a crash or a restart:

- an image whose record exists is not redone (same name and size+mtime, or same name and same content);
- an image without a record is processed: a kill before the rename leaves no record, so nothing is lost;
- a different image under a name already used (a camera counter reset) gets ``<name>.<sha256[:12]>.json``.

A file is taken only once its size and mtime have stayed the same for ``settle`` seconds on this service's own
clock, so a frame the camera is still writing is not read half-way (and a camera clock that is off does not
matter). Hidden files and usual partial-download names are ignored; any other file gets a result or an error
record, so an unexpected format is reported, never silently skipped. The input folder is never modified.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlcompile.data.datamodule import IMAGE_EXTENSIONS
from tlcompile.errors import TlcompileError
from tlcompile.io import atomic_write_json, sha256_file
from tlcompile.runtime.bundle import UNGRADABLE, VerifiedBundle, open_verified
from tlcompile.runtime.predict import predict_image

# Names a camera or a copy tool uses while a file is still being written; such files are left alone.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp", ".lock")
ERRORS_DIR = "errors"
LOCK_FILE = ".serve.lock"
_COLLISION = re.compile(r"(?P<name>.+)\.[0-9a-f]{12}")


@dataclass
class ServeStats:
    results: int = 0  # new result records written by this run
    errors: int = 0  # new error records written by this run
    already_done: int = 0  # images found with a record from an earlier run (not redone)
    pending: int = 0  # files still settling when the service stopped

    def summary(self) -> str:
        return (f"{self.results} results and {self.errors} error records written; {self.already_done} images already done"
                + (f"; {self.pending} still being written (picked up next time)" if self.pending else ""))


class Ledger:
    """The records in OUT (and OUT/errors), indexed by image name; reads a record only when its image shows up."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.errors_dir = out_dir / ERRORS_DIR
        self.errors_dir.mkdir(parents=True, exist_ok=True)
        self._paths: dict[str, list[Path]] = {}
        self._keys: dict[Path, dict[str, Any]] = {}
        for folder in (self.out_dir, self.errors_dir):
            for path in folder.iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink()  # a write a kill interrupted; its image has no record and will be redone
                elif path.suffix == ".json" and path.is_file():
                    self._index(path)

    def _index(self, path: Path) -> None:
        stem = path.name[: -len(".json")]
        self._paths.setdefault(stem, []).append(path)
        match = _COLLISION.fullmatch(stem)
        if match:
            self._paths.setdefault(match["name"], []).append(path)

    def _records_for(self, name: str) -> list[dict[str, Any]]:
        records = []
        for path in self._paths.get(name, []):
            if path not in self._keys:
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                    self._keys[path] = {k: record.get(k) for k in ("file", "size", "mtime_ns", "sha256")}
                except (OSError, ValueError):
                    self._keys[path] = {}  # unreadable: matches nothing, so the image is decided again
            if self._keys[path].get("file") == name:
                records.append(self._keys[path])
        return records

    def done_by_stat(self, name: str, size: int, mtime_ns: int) -> bool:
        return any(r["size"] == size and r["mtime_ns"] == mtime_ns for r in self._records_for(name))

    def done_by_content(self, name: str, sha256: str) -> bool:
        return any(r["sha256"] == sha256 for r in self._records_for(name))

    def write(self, record: dict[str, Any], *, error: bool) -> Path:
        name, sha = record["file"], record["sha256"]
        folder = self.errors_dir if error else self.out_dir
        path = folder / f"{name}.json"
        if (self.out_dir / path.name).exists() or (self.errors_dir / path.name).exists():
            # Another image had this name before (its content differs, or it would count as done): keep both.
            path = folder / f"{name}.{sha[:12]}.json"
        try:
            atomic_write_json(path, record)
            path.chmod(0o644)  # read by the clinic's other systems, often as another user
        except OSError as err:
            raise TlcompileError(
                f"cannot write the record of {name} into {folder} ({err.strerror or err}); stopped so that no image goes "
                "unrecorded: fix the output folder and restart, the image will be decided then"
            ) from err
        self._index(path)
        self._keys[path] = {k: record[k] for k in ("file", "size", "mtime_ns", "sha256")}
        return path


def _lock(out_dir: Path) -> Any:
    """Hold OUT/.serve.lock for the life of the process: two services writing one ledger would redo images.
    The OS drops the lock when the process dies, even by SIGKILL, so a restart is never blocked by a stale lock."""
    handle = open(out_dir / LOCK_FILE, "a+")  # held open on purpose until serve() returns
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: run without the guard
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise TlcompileError(f"another tlcompile serve is already writing into '{out_dir}' (it holds {out_dir / LOCK_FILE}); stop it first") from err
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _wanted(entry: os.DirEntry) -> bool:
    name = entry.name
    return not name.startswith(".") and not name.lower().endswith(PARTIAL_SUFFIXES) and entry.is_file(follow_symlinks=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Service:
    """One watch folder, one output folder, one verified bundle; :meth:`poll` does one pass."""

    def __init__(self, verified: VerifiedBundle, watch: Path, out_dir: Path, *, settle: float, log: Callable[[str], None],
                 once: bool = False) -> None:
        self.verified, self.watch, self.out_dir, self.settle, self.log, self.once = verified, watch, out_dir, settle, log, once
        self._watch_error: str | None = None
        self.ledger = Ledger(out_dir)
        self.stats = ServeStats()
        self._done: set[tuple[str, int, int]] = set()
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen on the monotonic clock)

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
                    continue
                st = entry.stat(follow_symlinks=True)
            except FileNotFoundError:  # removed while we looked
                continue
            key = (entry.name, st.st_size, st.st_mtime_ns)
            present.add(entry.name)
            if key in self._done:
                continue
            seen = self._seen.get(entry.name)
            if seen is None or seen[:2] != key[1:]:
                self._seen[entry.name] = (st.st_size, st.st_mtime_ns, now)
                seen = self._seen[entry.name]
            if now - seen[2] < self.settle:
                pending += 1
                continue
            ready.append((st.st_mtime_ns, entry.name, st.st_size))
        for name in set(self._seen) - present:
            del self._seen[name]
        for mtime_ns, name, size in sorted(ready):
            if stop.is_set():
                break
            self._take(name, size, mtime_ns)
        return pending

    def _take(self, name: str, size: int, mtime_ns: int) -> None:
        path = self.watch / name
        key = (name, size, mtime_ns)
        if self.ledger.done_by_stat(name, size, mtime_ns):
            self._done.add(key)
            self.stats.already_done += 1
            return
        try:
            sha = sha256_file(path)
        except FileNotFoundError:
            return
        if self.ledger.done_by_content(name, sha):
            self._done.add(key)
            self.stats.already_done += 1
            return
        record: dict[str, Any] = {"file": name, "path": str(path.resolve()), "size": size, "mtime_ns": mtime_ns, "sha256": sha}
        v = self.verified
        # A bad frame must never stop the service: whatever deciding this one file raises becomes its error record.
        # Writing the record stays outside the try: if the output folder is unwritable nothing can be recorded,
        # and the service stops with that error rather than dropping images.
        try:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise TlcompileError(f"{name}: '{path.suffix or '(none)'}' is not an image type this service reads; valid: {', '.join(IMAGE_EXTENSIONS)}")
            result = predict_image(v.bundle, v.session, path).to_dict()
            result.pop("file")
            record.update(status="ok", **result)
            error = False
        except Exception as err:  # broad on purpose: see above
            record.update(status="error", error=str(err).splitlines()[0] if str(err) else type(err).__name__, error_type=type(err).__name__)
            error = True
        record.update(
            bundle={"name": v.bundle.name, "artifact": v.bundle.artifact, "manifest_sha256": v.manifest_sha256,
                    **({"signed_by": v.signed_by} if v.signed_by else {})},
            processed_at=_now(),
            service_pid=os.getpid(),
        )
        written = self.ledger.write(record, error=error)
        self._done.add(key)
        if error:
            self.stats.errors += 1
            self.log(f"{name}: ERROR {record['error']} -> {written}")
        else:
            self.stats.results += 1
            detail = "" if record["referral"] == UNGRADABLE else f" (P(referable DR) {record['referable_dr_probability']:.3f}"
            if detail and record.get("grade_name"):
                detail += f", grade {record['grade_name']}"
            self.log(f"{name}: {record['referral']}{detail + ')' if detail else ''} -> {written}")


def serve(
    bundle_path: str | Path,
    watch: str | Path,
    out_dir: str | Path | None = None,
    *,
    once: bool = False,
    interval: float = 1.0,
    settle: float = 1.0,
    threads: int | None = None,
    trust: list[str | Path] | None = None,
    log: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> ServeStats:
    """Watch ``watch`` and write one record per image into ``out_dir`` (default WATCH/results).

    ``once``: decide what is there (waiting for files still being written to settle) and return. Otherwise poll
    every ``interval`` seconds until SIGINT/SIGTERM or ``stop`` is set; the image being decided is finished first.
    """
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
        raise TlcompileError(f"--out '{out_dir}' is the watch folder; the records would be taken for images; give another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        verified = open_verified(bundle_path, threads=threads, trust=trust)
        b = verified.bundle
        log(f"serving {b.name} ({b.artifact}, {b.runtime} {verified.session.exec_precision}, threshold {b.threshold:.4f}; "
            f"golden samples pass, max |Δlogit| {verified.golden.max_abs_logit_diff:.1e}"
            + (f"; signed by trusted key {verified.signed_by}" if verified.signed_by else "") + f"): {watch} -> {out_dir}")
        service = Service(verified, watch, out_dir, settle=settle, log=log, once=once)
        pending = 0
        while not stop.is_set():
            pending = service.poll(stop)
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
