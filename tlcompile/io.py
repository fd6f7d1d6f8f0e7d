"""Crash-safe file writes: write under a temporary name in the same folder, fsync, then rename.

A crash mid-write leaves the previous file intact (rename is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes 0600 files; give the final file the permissions an ordinary open() would (0666 & ~umask).
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer(tmp_path)`` produce the file (e.g. torch.save), then rename it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# A file name built on a stem must fit NAME_MAX (255 bytes on every common filesystem) with a suffix (a collision
# hash, .json / .explain.png) and atomic_path's temporary name around it (.<name>.<8 random>.tmp).
STEM_MAX_BYTES = 160
STEM_KEEP_BYTES = 120


def fitting_name(name: str, max_bytes: int = STEM_MAX_BYTES, keep_bytes: int = STEM_KEEP_BYTES) -> str:
    """``name`` when it is at most ``max_bytes`` long (encoded), else its first ``keep_bytes`` bytes (whole characters)
    + '~' + 16 hex digits of the full name's sha256: deterministic, distinct for distinct names, and short enough that
    a file name built on it (plus a suffix and :func:`atomic_path`'s temporary name) fits the filesystem's 255 bytes."""
    raw = os.fsencode(name)
    if len(raw) <= max_bytes:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[:keep_bytes].decode("utf-8", errors="ignore")  # cut at a character boundary
    return os.fsdecode(os.fsencode(head)) + "~" + digest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save_npz(path: str | Path, arrays: dict[str, Any]) -> Path:
    """``np.savez_compressed`` of ``arrays`` to ``path``, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write_with(path, write)
    return Path(path)


def atomic_save_npy(path: str | Path, array: Any) -> Path:
    """``np.save`` of ``array`` to ``path``, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, array)

    atomic_write_with(path, write)
    return Path(path)
