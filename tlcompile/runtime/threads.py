"""How many threads tlcompile's work may use: its own module, without numpy or a runtime, because every command
checks ``TLCOMPILE_NUM_THREADS`` as it starts (:func:`tlcompile.cli.main`)."""

from __future__ import annotations

import os

from tlcompile.errors import TlcompileError


def default_threads() -> int:
    """All cores this process may use (respects taskset/cgroup affinity where the OS reports it).

    ``TLCOMPILE_NUM_THREADS`` overrides it: a sweep running several builds side by side gives each its share.
    """
    value = os.environ.get("TLCOMPILE_NUM_THREADS", "").strip()
    if value:
        cpus = os.cpu_count() or 1
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= cpus):
            raise TlcompileError(
                f"TLCOMPILE_NUM_THREADS {value[:40]!r} (environment) is out of range; valid: a whole number of "
                f"threads from 1 to {cpus} (this machine's logical CPUs), or unset for every core this process may use"
            )
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
