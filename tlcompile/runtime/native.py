"""Small C kernels shipped as source and compiled on first use (torch-free): the fused fake quantization of QAT
(``tlcompile/compress/fused_fq.c``) and the preprocessing's field search, resize and fundus checks
(``tlcompile/runtime/fast_preprocess.c``).

Plain C called through ctypes, compiled with ``$CC`` (else ``cc``) into ``$XDG_CACHE_HOME/tlcompile``
(``~/.cache/tlcompile``), keyed by the source, the compiler, the flags and the machine, so a changed source, another
CPU's flags or another architecture never load a stale library. A machine without a C compiler (many clinic boxes),
or a cache it cannot write, gets an error its caller turns into the slower pure-Python/library path: the results
are the same either way (each kernel's tests hold it to the path it replaces).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from tlcompile.runtime.cpuinfo import cpu_flags

T = TypeVar("T")

#: What a failed build or load raises (no compiler, a compile error, a cache that cannot be written).
BUILD_ERRORS = (OSError, RuntimeError, subprocess.SubprocessError)


def x86_flags() -> list[str]:
    """-mavx2 where the CPU has AVX2 (8 int32 or float32 lanes per instruction), else -msse4.1 where it has SSE4.1
    (a 32-bit multiply and rounding in one instruction): a CPU without them would stop on the instruction. The
    library's cache key holds the flags, so CPUs that differ never share one."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags()
    return ["-mavx2"] if "avx2" in flags else ["-msse4.1"] if "sse4_1" in flags else []


def library_path(source: Path, flags: list[str]) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tlcompile"
    key = hashlib.sha256(
        source.read_bytes() + " ".join([os.environ.get("CC", "cc"), *flags, platform.machine()]).encode()
    ).hexdigest()[:16]
    return cache / f"{source.stem}-{key}.so"


def _build(source: Path, flags: list[str], path: Path) -> None:
    """Compile to a temporary name, then rename: processes building at once each end with a whole library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [os.environ.get("CC", "cc"), *flags, str(source), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, flags: list[str]) -> ctypes.CDLL:
    """The compiled ``source`` (built now if the cache has no library for it). Raises one of :data:`BUILD_ERRORS`."""
    path = library_path(source, flags)
    if not path.is_file():
        _build(source, flags, path)
    return ctypes.CDLL(str(path))


class Compiled(Generic[T]):
    """A C source compiled and loaded once per process, then handed to ``setup`` (which declares its functions' types):
    :meth:`get` gives what ``setup`` made, or None where the library cannot be built or the environment variable
    ``switch`` is 0, and :attr:`error` then says why."""

    def __init__(self, source: Path, flags: list[str], switch: str, setup: Callable[[ctypes.CDLL], T]) -> None:
        self.source, self.flags, self.switch, self.setup = source, flags, switch, setup
        self.tried, self.value, self.error = False, None, None

    def get(self) -> T | None:
        # Not locked: a thread that asks while another is still compiling gets None for that call and runs the code
        # the kernel replaces, which gives the same results.
        if os.environ.get(self.switch, "1") == "0":
            self.error = f"{self.switch}=0"
            return None
        if not self.tried:
            self.tried = True
            try:
                self.value = self.setup(load_library(self.source, self.flags))
            except BUILD_ERRORS as err:  # no compiler, a failed build, a cache that cannot be written
                self.error = f"{type(err).__name__}: {err}"
        return self.value
