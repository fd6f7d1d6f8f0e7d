"""Fixtures made once per test run, also when pytest-xdist runs the suite in several processes (make test)."""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], T]) -> T:
    """``make(folder)``, run once per test run even when pytest-xdist runs the suite in several processes (make test):
    the first process to ask makes it in a folder all of them share, the others wait for it and unpickle what it
    returned. Whatever ``make`` writes in the folder is shared: tests copy it before they change it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # the run's temp root, above each worker's
    done = folder / ".made.pickle"
    with open(folder.with_name(f"shared-{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if make raises
        if done.is_file():
            return pickle.loads(done.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # a process that failed half way: start again
        folder.mkdir()
        value = make(folder)
        done.write_bytes(pickle.dumps(value))
        return value
