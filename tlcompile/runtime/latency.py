"""Latency measurement: warm-up, then timed synchronous calls; percentiles in milliseconds (torch-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

# The fewest timed calls a time limit (``max_seconds``) leaves: enough for a median and a rough 90th percentile.
MIN_TIMED = 10


def measure_latency(
    run: Callable[[], Any],
    *,
    warmup: int = 10,
    iterations: int = 50,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
) -> dict[str, float]:
    """Time ``run()``: the first call separately (first-inference time), then ``warmup`` untimed calls, then at
    least ``iterations`` timed calls (and at least ``min_seconds`` of them). ``max_seconds`` stops the timed calls
    early once they have taken that long and at least :data:`MIN_TIMED` (or ``iterations``, if fewer) are timed: a
    slow run (a fake-quantized model in torch: ~90 ms a call) gets fewer samples, not minutes. Returns
    p50/p90/p99/mean/min ms and how many calls were timed."""
    t0 = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(0, warmup - 1)):
        run()
    times = []
    start = time.perf_counter()
    least = min(iterations, MIN_TIMED)
    while len(times) < iterations or (time.perf_counter() - start) < min_seconds:
        if max_seconds is not None and len(times) >= least and time.perf_counter() - start >= max_seconds:
            break
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    arr = np.asarray(times)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "first_ms": float(first_ms),
        "iterations": len(times),
    }
