"""Is `tlcompile bench` a trustworthy yardstick? Compare its p50 with OpenVINO's own benchmark_app.

For three models exported to OpenVINO IR at --size px: our p50 (sync API, LATENCY hint, all cores, static batch 1)
against benchmark_app's median latency with the same IR, hint, threads, precision and shape, interleaved so
machine noise hits both alike; then five repeats of our p50 (spread), and a thread x batch sweep of one model.

    .venv/bin/python benchmarks/bench_vs_benchmark_app.py [--size 224] [--iterations 200]

Prints tables; asserts nothing (timings on a shared machine are not pass/fail).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tlcompile.export.exporters import export_openvino
from tlcompile.models import get_model
from tlcompile.runtime.bench import BenchOptions, BenchTarget, measure
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.inference import default_threads

MODELS = ("cbr_small", "mobilenet_v3_small", "resnet18")


def benchmark_app_median(xml: Path, *, size: int, iterations: int, precision: str) -> float:
    exe = shutil.which("benchmark_app", path=str(Path(sys.executable).parent)) or shutil.which("benchmark_app")
    if exe is None:
        raise SystemExit("benchmark_app not found (it ships with the openvino package)")
    cmd = [exe, "-m", str(xml), "-d", "CPU", "-hint", "latency", "-api", "sync", "-niter", str(iterations),
           "-shape", f"[1,3,{size},{size}]", "-infer_precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Median:\s+([\d.]+)\s*ms", out)
    if not match:
        raise SystemExit(f"could not read the median from benchmark_app's output:\n{out[-2000:]}")
    return float(match.group(1))


def ours(xml: Path, *, threads: int, batch: int, iterations: int, precision: str) -> dict:
    opts = BenchOptions(runtimes=["openvino"], threads=[threads], batches=[batch], precision=precision, iterations=iterations, warmup=20)
    return measure(BenchTarget(name=xml.stem, files={"openvino": xml}), "openvino", threads, batch, opts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    args = parser.parse_args()
    threads = default_threads()
    cpu = cpu_info()
    print(f"CPU {cpu['model']}, {threads} usable cores, ISA {', '.join(cpu['isa'])}; precision {args.precision}, {args.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        xmls = {}
        for arch in MODELS:
            torch.manual_seed(0)
            xmls[arch] = export_openvino(get_model(arch, num_classes=2), Path(tmp) / f"{arch}.xml", image_size=args.size)

        print("\n## tlcompile bench vs benchmark_app (p50, batch 1, LATENCY hint, all cores; alternating, 3 rounds, medians)")
        print("| model | tlcompile p50 ms | benchmark_app median ms | ratio |\n|---|---|---|---|")
        for arch, xml in xmls.items():
            a, b = [], []
            for _ in range(3):
                a.append(ours(xml, threads=threads, batch=1, iterations=args.iterations, precision=args.precision)["latency_ms"]["p50"])
                b.append(benchmark_app_median(xml, size=args.size, iterations=args.iterations, precision=args.precision))
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {arch} | {ma:.3f} | {mb:.3f} | {ma / mb:.3f} |")

        print("\n## Five repeats of tlcompile bench p50 (ms)")
        print("| model | runs | median | spread (max-min)/median |\n|---|---|---|---|")
        for arch, xml in xmls.items():
            runs = [ours(xml, threads=threads, batch=1, iterations=args.iterations, precision=args.precision)["latency_ms"]["p50"] for _ in range(5)]
            med = statistics.median(runs)
            print(f"| {arch} | {', '.join(f'{r:.2f}' for r in runs)} | {med:.3f} | {(max(runs) - min(runs)) / med:.1%} |")

        arch = "mobilenet_v3_small"
        print(f"\n## Thread x batch sweep: {arch} (p50 ms per batch; img/s)")
        print("| threads | batch | p50 ms | p90 ms | img/s |\n|---|---|---|---|---|")
        for t in range(1, threads + 1):
            for b in (1, 4, 8):
                row = ours(xmls[arch], threads=t, batch=b, iterations=max(20, args.iterations // 2), precision=args.precision)
                print(f"| {t} | {b} | {row['latency_ms']['p50']:.2f} | {row['latency_ms']['p90']:.2f} | {row['throughput_fps']:.0f} |")


if __name__ == "__main__":
    main()
