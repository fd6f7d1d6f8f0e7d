"""Choose the artifact on the box that runs it: bench every candidate of a bundle here, pin the fastest that passes.

Which artifact is fastest depends on the model and the CPU together: int8 gains little without VNNI (AVX2 sums u8 x s8
pairs in int16), ONNX Runtime and OpenVINO rank differently on different cores, and a pruned fp32 model can beat an
int8 one. So the build ships every candidate that met the accuracy guard and the endpoints, each with its golden
outputs, and ``tlcompile verify`` measures them on the clinic's box and writes the choice to ``BUNDLE/device.json``.

The rule (:func:`choose`), stated so that a noisy machine cannot talk it into a compressed model:

- the candidates are those whose golden samples pass on this box;
- latency is measured in ``rounds`` interleaved rounds (every candidate once per round, so drift hits all alike);
  a candidate's p90 is the median of its per-round p90s and its noise the spread (max - min) of those;
- the baseline is the fastest uncompressed (fp32) candidate; a compressed one is chosen only when it is faster than
  the baseline by more than the noise of both (the larger of the two spreads); among those, the fastest.
  Without an fp32 candidate, the fastest is chosen.

Torch-free.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.io import atomic_write_json
from tlcompile.runtime.backends import SHIPPABLE_RUNTIMES, backend
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.latency import measure_latency

DEVICE_JSON = "device.json"
DEVICE_FORMAT_VERSION = 1
DEFAULT_ROUNDS = 5
DEFAULT_ITERATIONS = 30
DEFAULT_ROUND_SECONDS = 0.2
# Noise above this share of the fastest p90 is worth a warning: the box was busy while it was measured.
NOISY_SHARE = 0.2


def bench_interleaved(
    runs: dict[str, Callable[[], Any]],
    *,
    rounds: int = DEFAULT_ROUNDS,
    iterations: int | None = None,
    warmup: int = 5,
    min_seconds: float | None = None,
) -> dict[str, dict[str, Any]]:
    """p50 / p90 (median over rounds) and their spread over ``rounds`` interleaved rounds of at least ``iterations``
    calls and ``min_seconds`` (None: ``DEFAULT_ITERATIONS`` and ``DEFAULT_ROUND_SECONDS``, read at call time) each."""
    iterations = DEFAULT_ITERATIONS if iterations is None else iterations
    min_seconds = DEFAULT_ROUND_SECONDS if min_seconds is None else min_seconds
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for run in runs.values():  # first call and warm-up once, outside the rounds
        measure_latency(run, warmup=warmup, iterations=1)
    for _ in range(rounds):
        for name, run in runs.items():
            per_round[name].append(measure_latency(run, warmup=1, iterations=iterations, min_seconds=min_seconds))
    out = {}
    for name, results in per_round.items():
        p50s, p90s = np.array([r["p50"] for r in results]), np.array([r["p90"] for r in results])
        out[name] = {
            "p50_ms": round(float(np.median(p50s)), 4),
            "p90_ms": round(float(np.median(p90s)), 4),
            "p90_spread_ms": round(float(p90s.max() - p90s.min()), 4),
            "p50_spread_ms": round(float(p50s.max() - p50s.min()), 4),
            "rounds": rounds,
            "iterations_per_round": iterations,
        }
    return out


def choose(
    measured: dict[str, dict[str, Any]], compressed: dict[str, bool], passed: dict[str, bool]
) -> tuple[str | None, str]:
    """The candidate to pin and why (see the module docstring). ``compressed[name]``: not the fp32 artifact."""
    ok = [n for n in measured if passed.get(n)]
    if not ok:
        return None, "no candidate passed its golden samples on this box"
    fastest = min(ok, key=lambda n: (measured[n]["p90_ms"], n))
    baselines = [n for n in ok if not compressed.get(n)]
    if not baselines:
        return (
            fastest,
            f"fastest p90 ({measured[fastest]['p90_ms']:.3f} ms); the bundle has no fp32 candidate to compare with",
        )
    base = min(baselines, key=lambda n: (measured[n]["p90_ms"], n))
    b = measured[base]
    better = []
    for n in ok:
        if not compressed.get(n):
            continue
        noise = max(measured[n]["p90_spread_ms"], b["p90_spread_ms"])
        if b["p90_ms"] - measured[n]["p90_ms"] > noise:
            better.append(n)
    if not better:
        near = [n for n in ok if compressed.get(n) and measured[n]["p90_ms"] < b["p90_ms"]]
        tie = (
            (
                f"; {', '.join(near)} measured faster, but by less than the noise (p90 spread over "
                f"{b['rounds']} rounds), a tie that goes to the uncompressed model"
            )
            if near
            else ""
        )
        return base, f"fastest fp32 candidate: p90 {b['p90_ms']:.3f} ms (spread {b['p90_spread_ms']:.3f}){tie}"
    pick = min(better, key=lambda n: (measured[n]["p90_ms"], n))
    m = measured[pick]
    return pick, (
        f"p90 {m['p90_ms']:.3f} ms against the fastest fp32 candidate {base}'s {b['p90_ms']:.3f} ms: faster by "
        f"{b['p90_ms'] - m['p90_ms']:.3f} ms, more than the noise "
        f"({max(m['p90_spread_ms'], b['p90_spread_ms']):.3f} ms)"
    )


def runtime_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for module in (*(backend(r).package for r in SHIPPABLE_RUNTIMES), "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return versions


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return None


def noise_warning(measured: dict[str, dict[str, Any]]) -> str | None:
    """A sentence when the p90 spread over the rounds is large against the fastest p90 (a busy box), else None."""
    if not measured:
        return None
    best = min(m["p90_ms"] for m in measured.values())
    worst = max(m["p90_spread_ms"] for m in measured.values())
    if best > 0 and worst > NOISY_SHARE * best:
        load = load_average()
        return (
            f"latencies were noisy (p90 spread up to {worst:.2f} ms against a fastest p90 of {best:.2f} ms"
            + (f"; load average {load[0]:.2f} on {os.cpu_count()} cores" if load else "")
            + "): differences within the noise count as ties; on a quiet box, run tlcompile verify --repin"
        )
    return None


def device_record(
    *,
    manifest_sha256: str,
    candidates: dict[str, dict[str, Any]],
    chosen: str | None,
    why: str,
    threads: int,
    noise: str | None = None,
) -> dict[str, Any]:
    return {
        "format_version": DEVICE_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle_manifest_sha256": manifest_sha256,
        "cpu": cpu_info(),
        "threads": threads,
        "load_average": load_average(),
        "runtime_versions": runtime_versions(),
        "candidates": candidates,
        "chosen": chosen,
        "why": why,
        "noise": noise,
    }


def write_device(root: Path, record: dict[str, Any]) -> Path:
    path = Path(root) / DEVICE_JSON
    atomic_write_json(path, record)
    path.chmod(0o644)
    return path


def read_device(root: Path, *, manifest_sha256: str, candidates: list[str]) -> tuple[dict[str, Any] | None, str]:
    """device.json when it is a pin for this bundle (same manifest) on this CPU model; else (None, why not)."""
    path = Path(root) / DEVICE_JSON
    if not path.is_file():
        return None, "no device.json: this box has not been measured (run tlcompile verify BUNDLE)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        chosen, sha, cpu = record["chosen"], record["bundle_manifest_sha256"], record["cpu"]["model"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None, f"{path}: not a readable pin; run tlcompile verify --repin"
    if sha != manifest_sha256:
        return (
            None,
            f"{path}: pinned for another version of this bundle (manifest changed); run tlcompile verify --repin",
        )
    here = cpu_info()["model"]
    if cpu != here:
        return None, f"{path}: pinned on another CPU ({cpu}, this is {here}); run tlcompile verify --repin"
    if chosen not in candidates:
        return None, f"{path}: pins '{chosen}', which is not a candidate of this bundle; run tlcompile verify --repin"
    return record, ""
