"""Checks on model files before a runtime opens them (torch-free, no `onnx` package needed).

ONNX models may keep tensors in "external data" files named inside the model. A crafted model could name
``../../etc/shadow`` or an absolute path, or a symlink pointing out of its folder, and make the runtime read it.
tlcompile confines external data to the model's own folder.
"""

from __future__ import annotations

from pathlib import Path

from tlcompile.errors import UnsafeFileError

# A TensorProto's external_data entry is a StringStringEntryProto {1: key, 2: value}; serialised, the key
# "location" is the bytes 0x0a 0x08 "location", and the value follows as field 2 (0x12, varint length, bytes).
_LOCATION_KEY = b"\x0a\x08location\x12"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise UnsafeFileError("truncated varint in ONNX external data entry")


def onnx_external_locations(data: bytes) -> list[str]:
    """Every external-data location named in a serialised ONNX model."""
    out, start = [], 0
    while (i := data.find(_LOCATION_KEY, start)) != -1:
        length, pos = _varint(data, i + len(_LOCATION_KEY))
        out.append(data[pos : pos + length].decode("utf-8", errors="replace"))
        start = pos + length
    return out


def check_onnx_external_data(path: str | Path) -> list[Path]:
    """Refuse external data outside the model's folder (absolute paths, '..', symlinks); returns the files used."""
    path = Path(path)
    folder = path.resolve().parent
    files = []
    for location in onnx_external_locations(path.read_bytes()):
        rel = Path(location)
        if rel.is_absolute() or location.startswith(("/", "\\")) or ".." in rel.parts or ":" in location:
            raise UnsafeFileError(f"{path}: external data location '{location}' leaves the model's folder; refused")
        target = folder / rel
        if target.is_symlink():
            raise UnsafeFileError(
                f"{path}: external data '{location}' is a symlink; refused (copy the file into the model's folder)"
            )
        resolved = target.resolve()
        if folder not in resolved.parents:
            raise UnsafeFileError(f"{path}: external data '{location}' resolves outside the model's folder; refused")
        files.append(resolved)
    return files
