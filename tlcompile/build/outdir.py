"""Where a build may write: a new or empty folder, or one an earlier build made (it holds :data:`BUILD_MARKER`).

A build writes and deletes only inside a folder it owns, so no file of the user's is ever touched."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import tlcompile
from tlcompile.errors import TlcompileError
from tlcompile.io import atomic_write_json

# A build writes and deletes only inside a folder it owns: one it created (or found empty) and marked with this file.
BUILD_MARKER = ".tlcompile-build.json"


def is_build_dir(path: Path) -> bool:
    """True for a folder a tlcompile build created (it holds the build marker as a regular file)."""
    marker = path / BUILD_MARKER
    return marker.is_file() and not marker.is_symlink()


def prepare_out_dir(out_dir: Path, *, resume: bool) -> bool:
    """Check that a build may use ``out_dir``, or refuse without touching anything; creates it when missing. Returns
    whether it was new or empty (a --resume there has nothing to resume).

    A new or empty folder is accepted (:func:`claim_out_dir` marks it once the build's preflight checks pass). A
    folder holding anything else is refused unless it is a tlcompile build (it has the marker) and ``resume`` is set.
    A folder that is not a build is refused with and without --resume, and the message never suggests --resume for
    it: it holds someone's files.
    """
    if out_dir.is_symlink() and not out_dir.exists():
        raise TlcompileError(f"--out '{out_dir}' is a broken symbolic link; give a folder (nothing was changed)")
    if out_dir.exists() and not out_dir.is_dir():
        raise TlcompileError(f"--out '{out_dir}' is a file; give a folder (nothing was changed)")
    try:
        empty = not out_dir.exists() or not any(out_dir.iterdir())
    except OSError as err:
        raise TlcompileError(f"--out '{out_dir}': cannot read the folder ({err.strerror or err})") from err
    if not empty:
        if not is_build_dir(out_dir):
            raise TlcompileError(
                f"--out '{out_dir}' is not empty and is not a tlcompile build folder "
                f"(no {BUILD_MARKER}); a build writes "
                "only into a new or empty folder or one it made, so nothing was changed; choose a new --out"
            )
        if not resume:
            raise TlcompileError(
                f"output folder '{out_dir}' already holds a build; use --resume to continue it, "
                "or choose another --out "
                "(nothing was changed)"
            )
        return False
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder of the path should be, no permission, a read-only disk
        raise TlcompileError(
            f"--out '{out_dir}': cannot create the build folder ({err.strerror or err}); give a folder you can write"
        ) from err
    return True


def claim_out_dir(out_dir: Path) -> None:
    """Mark a folder :func:`prepare_out_dir` accepted as this build's own (the first file the build writes)."""
    if not is_build_dir(out_dir):
        atomic_write_json(
            out_dir / BUILD_MARKER,
            {
                "tlcompile_build": 1,
                "tlcompile_version": tlcompile.__version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
