"""A folder's manifest.json: sha256 and size of every file, and the check that the folder still matches it.

Bundles (``bundle/manifest.json``, signed by :mod:`tlcompile.runtime.signing`) and whole builds use the same format.
Never imports torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlcompile.errors import UnsafeFileError
from tlcompile.io import sha256_file
from tlcompile.runtime.pinning import DEVICE_JSON
from tlcompile.runtime.terminal import printable

MANIFEST_JSON = "manifest.json"
SIGNATURE_JSON = "signature.json"
# Files a bundle may hold that manifest.json does not list: the signature (it signs the manifest, so it cannot be
# in it) and what `tlcompile verify` records about this box. Neither can change a decision.
UNLISTED_OK = frozenset({SIGNATURE_JSON, DEVICE_JSON})


def inside(root: Path, relpath: str, source: str) -> Path:
    """``root / relpath``, refusing absolute paths and '..' that would read outside the bundle."""
    rel = Path(relpath)
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(root.resolve()):
        raise UnsafeFileError(
            f"{source}: '{relpath}' points outside the bundle folder {root}; a bundle only names its own files"
        )
    return path


def manifest_entries(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` except manifest.json, keyed by POSIX relative path."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST_JSON and rel not in UNLISTED_OK:
            entries[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return entries


@dataclass
class ManifestCheck:
    checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    manifest_sha256: str = ""
    failed: set[str] = field(default_factory=set)  # the listed files (bundle-relative) missing or not as listed

    @property
    def ok(self) -> bool:
        return not self.problems and self.checked > 0


def check_manifest(root: str | Path) -> ManifestCheck:
    """Every file the manifest lists is present with its size and sha256; no file is there that it does not list."""
    root = Path(root)
    result = ManifestCheck()
    manifest_path = root / MANIFEST_JSON
    if not manifest_path.is_file():
        result.problems.append(f"{MANIFEST_JSON}: missing; without it nothing in the bundle can be trusted")
        return result
    result.manifest_sha256 = sha256_file(manifest_path)
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        result.problems.append(f"{MANIFEST_JSON}: not a valid manifest ({err})")
        return result
    except RecursionError:  # arrays within arrays, thousands deep: json's parser gives up
        result.problems.append(f"{MANIFEST_JSON}: not a valid manifest (nested too deeply)")
        return result
    for rel, expected in sorted(files.items()):
        try:
            path = inside(root, rel, str(manifest_path))
        except UnsafeFileError as err:
            result.problems.append(str(err))
            continue
        except ValueError:  # a NUL byte: no file can have that name
            shown = printable(rel)
            result.problems.append(f"{MANIFEST_JSON}: the entry '{shown}' is not a file name (a NUL character in it)")
            continue
        result.checked += 1
        if not isinstance(expected, dict):
            result.problems.append(f"{rel}: the manifest entry is {expected!r}, not {{'sha256', 'size'}}")
            continue
        if not path.is_file():
            result.problems.append(f"{rel}: missing")
            result.failed.add(rel)
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            # not hashed: a file of another size is not the file (an 8 GB sparse one took verify minutes to read)
            result.problems.append(f"{rel}: size {size} bytes, manifest says {expected.get('size')}")
            result.failed.add(rel)
            continue
        digest = sha256_file(path)
        if digest != expected.get("sha256"):
            result.problems.append(
                f"{rel}: sha256 {digest[:16]}... does not match the manifest's {str(expected.get('sha256'))[:16]}..."
            )
            result.failed.add(rel)
    listed = set(files) | {MANIFEST_JSON} | UNLISTED_OK
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in listed:
            result.problems.append(f"{rel}: not in the manifest (a file was added to the bundle after the build)")
    return result
