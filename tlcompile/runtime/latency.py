"""Latency measurement: warm-up, then timed synchronous calls; percentiles in milliseconds (torch-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def measure_latency(
    run: Callable[[], Any], *, warmup: int = 10, iterations: int = 50, min_seconds: float = 0.0
) -> dict[str, float]:
    """Time ``run()``: the first call separately (first-inference time), then ``warmup`` untimed calls, then at
    least ``iterations`` timed calls (and at least ``min_seconds`` of them). Returns p50/p90/p99/mean/min ms."""
    t0 = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(0, warmup - 1)):
        run()
    times = []
    start = time.perf_counter()
    while len(times) < iterations or (time.perf_counter() - start) < min_seconds:
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
