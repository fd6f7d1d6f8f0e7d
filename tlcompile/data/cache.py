"""Preprocessed-image cache: one small file per (photograph content, preprocessing), so a build, a resumed build, a
sweep variant or ``tlcompile data check`` after the first reads a few KiB per image instead of decoding a
multi-megapixel JPEG again.

Keyed by the sha256 of the file's bytes, not its name or time stamp: a re-exported or replaced photograph is a
new entry, and renaming or copying the data set keeps its entries. The folder of a preprocessing is named by a
hash of the :class:`PreprocessSpec`, the preprocessing code's version and Pillow's version (its decoder and resize
are part of the result), so a change to any of them never serves stale images.

Entries are derived data: one that cannot be read back (a torn write, a disk error) is decoded again and
replaced; deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlcompile.errors import DataError
from tlcompile.runtime.preprocess import PREPROCESS_VERSION, PreprocessSpec


def spec_key(spec: PreprocessSpec) -> str:
    """Folder name of one preprocessing: what the cached pixels depend on, hashed."""
    import PIL

    identity = {"spec": spec.to_dict(), "preprocess_version": PREPROCESS_VERSION, "pillow": PIL.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CachedImage:
    image: np.ndarray  # (size, size, 3) uint8, exactly what prepare_image returned
    fov_found: bool
    stored_hw: tuple[int, int]  # the photograph's size as stored in the file (before any draft decoding)


class PreprocessCache:
    """Preprocessed images of one :class:`PreprocessSpec` under ``root``; counts its hits and misses."""

    def __init__(self, root: str | Path, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.folder = Path(root) / spec_key(spec)
        self.hits = 0
        self.misses = 0
        self.repaired = 0
        self._lock = threading.Lock()  # the data module reads and writes entries from a thread pool
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            marker = self.folder / "spec.json"
            if not marker.is_file():  # for people looking in the folder: which preprocessing these are
                self._write_bytes(
                    marker, json.dumps({"preprocess_version": PREPROCESS_VERSION, **spec.to_dict()}, indent=2).encode()
                )
        except OSError as err:
            raise DataError(
                f"data.cache: cannot use '{root}' for the preprocessed-image cache ({err.strerror or err}); "
                "give a writable folder, or remove data.cache"
            ) from err

    def _entry(self, content_sha256: str) -> Path:
        return self.folder / content_sha256[:2] / f"{content_sha256}.npz"

    def get(self, content_sha256: str) -> CachedImage | None:
        path = self._entry(content_sha256)
        try:
            with np.load(path, allow_pickle=False) as z:
                image, fov_found, stored_hw = z["image"], bool(z["fov_found"]), tuple(int(v) for v in z["stored_hw"])
        except FileNotFoundError:
            return self._count(hit=False)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            # A torn or damaged entry: decode the photograph again; put() replaces the entry.
            return self._count(hit=False, damaged=True)
        size = self.spec.size
        if image.shape != (size, size, 3) or image.dtype != np.uint8 or len(stored_hw) != 2:
            return self._count(hit=False, damaged=True)
        self._count(hit=True)
        return CachedImage(image=image, fov_found=fov_found, stored_hw=stored_hw)  # type: ignore[arg-type]

    def _count(self, *, hit: bool, damaged: bool = False) -> None:
        with self._lock:
            self.hits += hit
            self.misses += not hit
            self.repaired += damaged

    def put(self, content_sha256: str, image: np.ndarray, fov_found: bool, stored_hw: tuple[int, int]) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            image=np.ascontiguousarray(image, dtype=np.uint8),
            fov_found=np.bool_(fov_found),
            stored_hw=np.asarray(stored_hw, dtype=np.int64),
        )
        path = self._entry(content_sha256)
        try:
            path.parent.mkdir(exist_ok=True)
            self._write_bytes(path, buffer.getvalue())
        except OSError as err:
            raise DataError(
                f"data.cache: cannot write '{path}' ({err.strerror or err}); free space, or remove data.cache"
            ) from err

    @staticmethod
    def _write_bytes(path: Path, data: bytes) -> None:
        # Temporary name + rename: a reader never sees half an entry. No fsync (unlike tlcompile.io's atomic writes):
        # an entry lost in a crash is just decoded again, and thousands of fsyncs would cost more than they save.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def stats(self) -> dict[str, object]:
        return {"folder": str(self.folder), "hits": self.hits, "misses": self.misses, "repaired": self.repaired}
