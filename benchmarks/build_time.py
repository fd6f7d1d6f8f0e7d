"""Stage times of a build: runs the quickstart, or reads the report.json files given as arguments.

    .venv/bin/python benchmarks/build_time.py                        # build recipes/quickstart.yaml, print its times
    .venv/bin/python benchmarks/build_time.py runs/a/report.json     # one build's table
    .venv/bin/python benchmarks/build_time.py before.json after.json # side by side, with the after/before ratio

Prints the seconds of every stage (report.json ``stage_seconds``) and their sum, the CPU's instruction-set features
that decide which kernels torch, ONNX Runtime and OpenVINO run (AVX2, AVX-512, VNNI, AMX), its model name, its core
count and the load average. On a shared machine the load average says how far the figures are to be trusted: compare
builds measured under the same load, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_int8")


def cpu_line() -> str:
    """'<model name>, N cores, ISA avx2 avx512f ...' from /proc/cpuinfo (the flags of ISA_FLAGS that are present)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} cores, ISA unknown (no /proc/cpuinfo)"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set(re.findall(r"\b\w+\b", " ".join(re.findall(r"^flags\s*:(.*)$", text, re.M))))
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS)
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores, ISA {isa}"


def load_line() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def stage_seconds(report_path: Path) -> dict[str, float]:
    report = json.loads(Path(report_path).read_text())
    return {k: float(v) for k, v in report.get("stage_seconds", {}).items()}


def run_quickstart(out: Path) -> tuple[Path, float]:
    """Build recipes/quickstart.yaml into ``out`` in a fresh interpreter; returns (report.json, wall seconds)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tlcompile.cli", "build", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "report.json", time.perf_counter() - t0


def table(columns: list[tuple[str, dict[str, float]]]) -> str:
    stages = list(dict.fromkeys(k for _, seconds in columns for k in seconds))
    header = ["stage", *(name for name, _ in columns)] + (["after/before"] if len(columns) == 2 else [])
    rows = []
    for stage in [*stages, "total"]:
        values = [sum(s.values()) if stage == "total" else s.get(stage) for _, s in columns]
        row = [stage, *("-" if v is None else f"{v:.1f}" for v in values)]
        if len(columns) == 2:
            a, b = values
            row.append(f"{b / a:.2f}" if a and b is not None else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", type=Path, help="report.json files (none: build the quickstart)")
    parser.add_argument("--out", type=Path, default=None, help="build folder for the quickstart (default: a temp dir)")
    args = parser.parse_args(argv)
    print(cpu_line())
    print("before:", load_line())
    if args.reports:
        columns = [(str(p.parent.name or p), stage_seconds(p)) for p in args.reports]
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="tlcompile-build-time-")) / "quickstart"
        report, wall = run_quickstart(out)
        columns = [("seconds", stage_seconds(report))]
        print(f"quickstart build: {wall:.1f} s wall (interpreter start and imports included), folder {out}")
    print("after: ", load_line())
    print(table(columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
