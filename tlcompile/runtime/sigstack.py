"""Keep the thread's alternate signal stack valid after OpenVINO has used it (Linux; a no-op elsewhere).

OpenVINO's CPU plugin (2025-2026 releases) gives the thread that compiles and runs a model an alternate signal stack
of its own and, when the model is destroyed, puts back the one that was there before. Two models destroyed in the
order they were made (A made, B made, A destroyed, B destroyed) leave the thread's alternate stack pointing at A's,
which is unmapped by then. Python runs every signal handler on that stack (SA_ONSTACK), so the next handled signal
kills the process with SIGSEGV before any Python code runs: Ctrl-C on a build or on ``tlcompile predict``, SIGTERM on
``serve``, SIGCHLD when a handler is installed for it. Reproduced in tests/runtime/test_sigstack.py.

:func:`repair_signal_stack` looks at the calling thread's alternate stack and, when it lies outside every mapping of
the process, installs a fresh one that this module keeps alive. The OpenVINO session calls it after destroying its
model.
"""

from __future__ import annotations

import ctypes
import functools
import sys

SS_DISABLE = 2
MIN_STACK = 64 * 1024
_owned: list[ctypes.Array] = []  # the stacks this module installed: they must outlive any use


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def current_signal_stack() -> tuple[int, int, int] | None:
    """(address, size, flags) of the calling thread's alternate signal stack; None where it cannot be read."""
    libc = _libc()
    if libc is None:
        return None
    stack = _StackT()
    if libc.sigaltstack(None, ctypes.byref(stack)) != 0:
        return None
    return int(stack.ss_sp or 0), int(stack.ss_size), int(stack.ss_flags)


def is_mapped(address: int, size: int) -> bool:
    """Whether [address, address + size) lies inside the process's mappings (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            ranges = [tuple(int(v, 16) for v in line.split(None, 1)[0].split("-")) for line in maps]
    except OSError:
        return True  # cannot tell: leave it alone
    end = address + max(size, 1)
    for lo, hi in sorted(ranges):
        if lo <= address < hi:
            address = hi  # the stack may span adjacent mappings
            if address >= end:
                return True
    return False


def repair_signal_stack() -> bool:
    """Replace the calling thread's alternate signal stack when it points at unmapped memory; True if it did."""
    libc = _libc()
    current = current_signal_stack()
    if libc is None or current is None:
        return False
    address, size, flags = current
    if flags & SS_DISABLE or not address or is_mapped(address, size):
        return False
    buffer = ctypes.create_string_buffer(max(size, MIN_STACK))
    stack = _StackT(ctypes.addressof(buffer), 0, len(buffer))
    if libc.sigaltstack(ctypes.byref(stack), None) != 0:
        return False
    _owned.append(buffer)
    return True
