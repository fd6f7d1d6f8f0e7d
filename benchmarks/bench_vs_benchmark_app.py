"""Is `tlcompile bench` a trustworthy yardstick? Compare its p50 with OpenVINO's own benchmark_app.

For mobilenet_v2, mobilenet_v3_large and resnet18 exported to OpenVINO IR at --size px (random init: latency does
not depend on the weights): our p50 (`tlcompile bench`'s own `measure()`: sync API, LATENCY hint, all usable cores,
static batch 1) against benchmark_app's median latency with the same IR, hint, precision, input type and shape.
Both sides are checked, not assumed, to run alike: the execution precision of the compute ops (ours read back from
the compiled model, benchmark_app's from its dumped execution graph), threads and streams.

Machine noise: the models alternate, and within each round the side that goes first alternates, so load from other
jobs hits both sides alike; each round gives a ratio, and the table shows the median ratio and its spread (min-max
over rounds). Two columns are immune to load drift, measured on the same calls: what our Python wrapper costs per
call, the median of (wall time of ``session.run`` - OpenVINO's own request latency, the number benchmark_app
reports), and the same-call ratio median(wall) / median(request latency).

    .venv/bin/python benchmarks/bench_vs_benchmark_app.py [--size 224] [--iterations 200] [--repeats 5] [--sweep]

benchmark_app feeds image-like inputs as u8 by default (a Convert inside the graph); `tlcompile bench` feeds float32,
so benchmark_app runs with ``-ip f32`` (``--ba-input u8`` to see its default). With the LATENCY hint benchmark_app
accepts no -nthreads/-nstreams; it uses one stream on all physical cores, which is what our session reads back when
it is given all usable cores (a mismatch is flagged in the table).

Prints tables; asserts nothing (timings on a shared machine are not pass/fail).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from tlcompile.runtime.bench import BenchOptions, BenchTarget, measure
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.inference import _COMPUTE_OPS, OpenVINOSession, default_threads

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "resnet18")


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def export_irs(models: tuple[str, ...], folder: Path, size: int) -> dict[str, Path]:
    """Random-init IRs (cached in ``folder``: an existing <arch>.xml is reused)."""
    xmls = {}
    for arch in models:
        xml = folder / f"{arch}_{size}.xml"
        if not xml.is_file():
            import torch

            from tlcompile.export.exporters import export_openvino
            from tlcompile.models import get_model

            torch.manual_seed(0)
            export_openvino(get_model(arch, num_classes=2), xml, image_size=size)
        xmls[arch] = xml
    return xmls


def _benchmark_app() -> str:
    exe = shutil.which("benchmark_app", path=str(Path(sys.executable).parent)) or shutil.which("benchmark_app")
    if exe is None:
        raise SystemExit("benchmark_app not found (it ships with the openvino package)")
    return exe


def _exec_graph_precision(path: Path) -> str:
    """Most common runtimePrecision of the compute ops in a dumped execution graph (as OpenVINOSession reads it)."""
    counts: Counter[str] = Counter()
    for layer in ET.parse(path).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") in _COMPUTE_OPS and data is not None and data.get("runtimePrecision"):
            counts[data.get("runtimePrecision").lower()] += 1
    return counts.most_common(1)[0][0] if counts else "?"


def benchmark_app(
    xml: Path, *, size: int, iterations: int, precision: str, input_type: str, exec_graph: Path | None = None
) -> dict:
    """benchmark_app's median/min latency (ms), threads, streams and (with ``exec_graph``) execution precision."""
    cmd = [
        _benchmark_app(),
        "-m",
        str(xml),
        "-d",
        "CPU",
        "-hint",
        "latency",
        "-api",
        "sync",
        "-niter",
        str(iterations),
        "-shape",
        f"[1,3,{size},{size}]",
        "-infer_precision",
        precision,
        "-ip",
        input_type,
    ]
    if exec_graph is not None:
        cmd += ["-exec_graph_path", str(exec_graph)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def grab(pattern: str) -> str:
        match = re.search(pattern, out)
        if not match:
            raise SystemExit(f"could not read {pattern!r} from benchmark_app's output:\n{out[-2000:]}")
        return match.group(1)

    row = {
        "median": float(grab(r"Median:\s+([\d.]+)\s*ms")),
        "min": float(grab(r"Min:\s+([\d.]+)\s*ms")),
        "threads": int(grab(r"INFERENCE_NUM_THREADS:\s+(\d+)")),
        "streams": int(grab(r"NUM_STREAMS:\s+(\d+)")),
    }
    if exec_graph is not None:
        row["exec"] = _exec_graph_precision(exec_graph)
    return row


def ours(xml: Path, *, threads: int, batch: int, iterations: int, precision: str) -> dict:
    """A `tlcompile bench` row, measured exactly as the CLI measures it."""
    opts = BenchOptions(
        runtimes=["openvino"], threads=[threads], batches=[batch], precision=precision, iterations=iterations, warmup=20
    )
    return measure(BenchTarget(name=xml.stem, files={"openvino": xml}), "openvino", threads, batch, opts)


def same_calls(xml: Path, *, size: int, threads: int, iterations: int, precision: str) -> tuple[float, float, dict]:
    """Our wrapper's per-call cost, measured on the same calls as what benchmark_app would time.

    For each ``session.run``: its wall time, and OpenVINO's own latency of that request (the number benchmark_app
    reports). Both come from the same call, so load from other jobs largely cancels. Returns the median of
    (wall - latency) in microseconds, the ratio median(wall) / median(latency), and what the session runs.
    """
    session = OpenVINOSession(path=xml, threads=threads, precision=precision, static_batch=1)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(10):
        session.run(x)
    walls, lats = [], []
    for _ in range(iterations):
        t = time.perf_counter()
        session.run(x)
        walls.append((time.perf_counter() - t) * 1e3)
        lats.append(session._request.latency)
    props = {
        **session.properties,
        "exec": session.exec_precision,
        "pinning": bool(session._compiled.get_property("ENABLE_CPU_PINNING")),
    }
    gap_us = statistics.median(w - lat for w, lat in zip(walls, lats, strict=True)) * 1e3
    return gap_us, statistics.median(walls) / statistics.median(lats), props


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=200, help="timed inferences per measurement, each side")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (each gives one ratio per model)")
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--ba-input", default="f32", choices=["f32", "u8"], help="benchmark_app's input element type (-ip)"
    )
    parser.add_argument(
        "--ir-dir", type=Path, help="keep the exported IRs here and reuse them (default: a temporary folder)"
    )
    parser.add_argument("--sweep", action="store_true", help="add a thread x batch sweep of mobilenet_v3_large")
    args = parser.parse_args()
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    threads = default_threads()
    cpu = cpu_info()
    import openvino as ov

    print(
        f"CPU {cpu['model']}; {cpu['usable_cores']} usable / {cpu['logical_cores']} logical cores; "
        f"ISA {', '.join(cpu['isa']) or '-'}"
    )
    print(
        f"OpenVINO {ov.__version__}; requested precision {args.precision}; {args.size} px, batch 1; "
        f"benchmark_app input {args.ba_input}; {args.iterations} iterations x {args.repeats} rounds; "
        f"load average {load()} (1/5/15 min)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.ir_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        xmls = export_irs(models, folder, args.size)

        # What each side really runs: exec precision of the compute ops, threads, streams; and our wrapper's cost.
        config, overhead, same = {}, {}, {}
        for arch, xml in xmls.items():
            ba = benchmark_app(
                xml,
                size=args.size,
                iterations=20,
                precision=args.precision,
                input_type=args.ba_input,
                exec_graph=Path(tmp) / f"{arch}_exec.xml",
            )
            overhead[arch], same[arch], mine = same_calls(
                xml, size=args.size, threads=threads, iterations=args.iterations, precision=args.precision
            )
            config[arch] = (mine, ba)

        ratios: dict[str, list[float]] = {m: [] for m in models}
        a: dict[str, list[float]] = {m: [] for m in models}
        b: dict[str, list[float]] = {m: [] for m in models}
        mins: dict[str, list[float]] = {m: [] for m in models}
        loads = []
        for r in range(args.repeats):
            loads.append(load())
            for arch, xml in xmls.items():
                sides = ["ours", "ba"] if r % 2 == 0 else ["ba", "ours"]
                got = {}
                for side in sides:
                    if side == "ours":
                        got[side] = ours(
                            xml, threads=threads, batch=1, iterations=args.iterations, precision=args.precision
                        )["latency_ms"]
                    else:
                        got[side] = benchmark_app(
                            xml,
                            size=args.size,
                            iterations=args.iterations,
                            precision=args.precision,
                            input_type=args.ba_input,
                        )
                a[arch].append(got["ours"]["p50"])
                b[arch].append(got["ba"]["median"])
                ratios[arch].append(got["ours"]["p50"] / got["ba"]["median"])
                mins[arch].append(got["ours"]["min"] / got["ba"]["min"])
        loads.append(load())

        print("\n## tlcompile bench p50 vs benchmark_app median (batch 1, LATENCY hint, interleaved rounds)")
        print(
            "| model | exec ours / BA | threads x streams ours / BA | tlcompile p50 ms (rounds) "
            "| benchmark_app median ms (rounds) "
            "| ratio median | ratio spread | min-latency ratio | same-call ratio | wrapper us/call |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for arch in models:
            mine, ba = config[arch]
            alike = (
                mine["num_threads"] == ba["threads"]
                and mine["num_streams"] == ba["streams"]
                and mine["exec"] == ba["exec"]
            )
            print(
                f"| {arch} | {mine['exec']} / {ba['exec']} | "
                f"{mine['num_threads']}x{mine['num_streams']} / {ba['threads']}x{ba['streams']}"
                f"{'' if alike else ' MISMATCH'} | {', '.join(f'{v:.2f}' for v in a[arch])} | "
                f"{', '.join(f'{v:.2f}' for v in b[arch])} "
                f"| {statistics.median(ratios[arch]):.3f} | {spread(ratios[arch])} | "
                f"{statistics.median(mins[arch]):.3f} | {same[arch]:.3f} "
                f"| {overhead[arch]:.0f} |"
            )
        print(f"\nLoad average (1/5/15 min) at the start of each round and at the end: {'; '.join(loads)}")
        print(
            "ratio = our p50 / benchmark_app median in the same round; spread = min-max over rounds; "
            "min-latency ratio = "
            "median over rounds of our min / benchmark_app's min (less sensitive to load); same-call ratio = median "
            "session.run wall time / median OpenVINO request latency (what benchmark_app times) over the same calls, "
            "immune to load drift; wrapper us/call = median of (session.run wall time - request latency)."
        )

        if args.sweep:
            arch = "mobilenet_v3_large" if "mobilenet_v3_large" in xmls else models[0]
            print(f"\n## Thread x batch sweep: {arch} (p50 ms per batch; img/s); load average {load()}")
            print("| threads | batch | p50 ms | p90 ms | img/s |\n|---|---|---|---|---|")
            for t in range(1, threads + 1):
                for batch in (1, 4, 8):
                    row = ours(
                        xmls[arch],
                        threads=t,
                        batch=batch,
                        iterations=max(20, args.iterations // 2),
                        precision=args.precision,
                    )
                    print(
                        f"| {t} | {batch} | {row['latency_ms']['p50']:.2f} | {row['latency_ms']['p90']:.2f} | "
                        f"{row['throughput_fps']:.0f} |"
                    )


if __name__ == "__main__":
    main()
