"""Does compression pay on the device? Batch-1 CPU latency of FP32, INT8, pruned+INT8 on OpenVINO, ONNX Runtime, torch.

For each model at --size px (random init, BatchNorm statistics adapted on synthetic fundus images so activations
have realistic ranges; latency does not depend on training -- accuracy targets come from the quickstart build):

- OpenVINO FP32 in true f32 (INFERENCE_PRECISION_HINT=f32; the CPU would otherwise run bf16 on AMX) vs the NNCF
  INT8 IR (PTQ on the same images, BatchNorm folded, per-tensor activations: what the build's QAT produces);
- 50% structured channel pruning (torch-pruning, L2, one step) + INT8, on OpenVINO;
- the unpruned FP32 model in torch eager;
- ONNX Runtime FP32 vs the build's INT8 QDQ ONNX (uint8 activations, int8 weights).

Every ratio is measured in one run with the sessions *interleaved* (a burst of each in turn, repeated): on a shared
machine the load moves, and interleaving makes it hit every session alike. Prints the table and the targets
(OV INT8/f32 <= 0.35; pruned+INT8 >= 8x torch eager and >= 2.5x INT8; ORT INT8/FP32 < 0.8) with PASS/MISS, and
what really ran (OpenVINO's runtime precision of the compute ops). Timings on a loaded machine are noisy: the load
average is printed beside them.

    .venv/bin/python benchmarks/compression.py [--models cbr_small mobilenet_v2 resnet18] [--size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tlcompile.compress.calibration import input_batches
from tlcompile.compress.prune import ChannelPruner, adapt_batchnorm
from tlcompile.compress.quantize import fold_batchnorm, quantize_ptq
from tlcompile.data.datamodule import load_data
from tlcompile.export.exporters import export_onnx, export_openvino
from tlcompile.export.int8 import export_int8
from tlcompile.models import count_macs, get_model
from tlcompile.recipe import DataConfig, PruneConfig
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.inference import default_threads, open_session

TARGETS = {"ov_int8_vs_f32": 0.35, "pruned_int8_vs_eager": 8.0, "pruned_int8_vs_int8": 2.5, "ort_int8_vs_fp32": 0.8}


def interleaved_p50(runs: dict[str, Callable[[], object]], *, rounds: int, burst: int, warmup: int) -> dict[str, float]:
    """Median latency (ms) of each callable, timed in ``rounds`` interleaved bursts of ``burst`` calls."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(burst):
                t = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def prepare(arch: str, images: np.ndarray, spec, folder: Path, *, seed: int) -> dict[str, object]:
    """Export the five files of one model; returns paths and MACs."""
    device = torch.device("cpu")
    size = spec.size
    torch.manual_seed(seed)
    model = get_model(arch, num_classes=2).eval()
    batches = [xb for xb, _ in input_batches(images, spec, batch_size=16, device=device)]
    adapt_batchnorm(model, batches)
    out: dict[str, object] = {"model": model, "macs": count_macs(model, size)}
    out["fp32_xml"] = export_openvino(model, folder / f"{arch}-fp32.xml", image_size=size)
    out["fp32_onnx"] = export_onnx(model, folder / f"{arch}-fp32.onnx", image_size=size)

    folded = copy.deepcopy(model)
    fold_batchnorm(folded)
    int8 = quantize_ptq(folded, images, spec, device=device)
    out["int8_xml"] = folder / f"{arch}-int8.xml"
    export_int8(int8, out["int8_xml"], "openvino", image_size=size)
    out["int8_onnx"] = folder / f"{arch}-int8.onnx"
    out["int8_qdq"] = export_int8(int8, out["int8_onnx"], "onnx", image_size=size)

    pruned = copy.deepcopy(model)
    ChannelPruner(pruned, PruneConfig(ratio=0.5, steps=1), torch.zeros(1, 3, size, size)).step()
    adapt_batchnorm(pruned, batches)
    out["pruned_macs"] = count_macs(pruned, size)
    fold_batchnorm(pruned)
    pruned_int8 = quantize_ptq(pruned, images, spec, device=device)
    out["pruned_int8_xml"] = folder / f"{arch}-pruned-int8.xml"
    export_int8(pruned_int8, out["pruned_int8_xml"], "openvino", image_size=size)
    return out


def measure(
    arch: str, files: dict[str, object], one: np.ndarray, *, threads: int, rounds: int, burst: int
) -> dict[str, object]:
    # OpenVINO compiled for a static batch of 1, as deployed and as benchmark_app does (faster kernels than dynamic).
    sessions = {
        "ov_f32": open_session(files["fp32_xml"], "openvino", threads=threads, precision="f32", static_batch=1),
        "ov_int8": open_session(files["int8_xml"], "openvino", threads=threads, precision="f32", static_batch=1),
        "ov_pruned_int8": open_session(
            files["pruned_int8_xml"], "openvino", threads=threads, precision="f32", static_batch=1
        ),
        "ort_fp32": open_session(files["fp32_onnx"], "onnxruntime", threads=threads),
        "ort_int8": open_session(files["int8_onnx"], "onnxruntime", threads=threads),
    }
    model = files["model"]
    x = torch.from_numpy(one)

    def eager() -> None:
        with torch.inference_mode():
            model(x)

    runs: dict[str, Callable[[], object]] = {name: (lambda s=s: s.run(one)) for name, s in sessions.items()}
    runs["torch_eager"] = eager
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p50 = interleaved_p50(runs, rounds=rounds, burst=burst, warmup=5)
    finally:
        torch.set_num_threads(previous)
    return {
        "model": arch,
        "macs": files["macs"],
        "pruned_macs": files["pruned_macs"],
        "p50_ms": {k: round(v, 3) for k, v in p50.items()},
        "exec_precision": {k: s.exec_precision for k, s in sessions.items()},
        "ov_int8_vs_f32": p50["ov_int8"] / p50["ov_f32"],
        "pruned_int8_vs_eager": p50["torch_eager"] / p50["ov_pruned_int8"],
        "pruned_int8_vs_int8": p50["ov_int8"] / p50["ov_pruned_int8"],
        "ort_int8_vs_fp32": p50["ort_int8"] / p50["ort_fp32"],
        "int8_onnx_rewrite": files["int8_qdq"],
    }


def verdict(name: str, value: float) -> str:
    target = TARGETS[name]
    ok = {"ov_int8_vs_f32": value <= target, "ort_int8_vs_fp32": value < target}.get(name, value >= target)
    return "PASS" if ok else "MISS"


def print_table(rows: list[dict[str, object]], header: str) -> None:
    print(header)
    cols = (
        "model",
        "OV f32 ms",
        "OV int8 ms",
        "int8/f32",
        "pruned+int8 ms",
        "torch eager ms",
        "eager/pr-int8",
        "int8/pr-int8",
        "ORT fp32 ms",
        "ORT int8 ms",
        "ORT int8/fp32",
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        p = r["p50_ms"]
        print(
            "| "
            + " | ".join(
                [
                    r["model"],
                    f"{p['ov_f32']:.2f}",
                    f"{p['ov_int8']:.2f}",
                    f"{r['ov_int8_vs_f32']:.2f} {verdict('ov_int8_vs_f32', r['ov_int8_vs_f32'])}",
                    f"{p['ov_pruned_int8']:.2f}",
                    f"{p['torch_eager']:.2f}",
                    f"{r['pruned_int8_vs_eager']:.1f}x {verdict('pruned_int8_vs_eager', r['pruned_int8_vs_eager'])}",
                    f"{r['pruned_int8_vs_int8']:.2f}x {verdict('pruned_int8_vs_int8', r['pruned_int8_vs_int8'])}",
                    f"{p['ort_fp32']:.2f}",
                    f"{p['ort_int8']:.2f}",
                    f"{r['ort_int8_vs_fp32']:.2f} {verdict('ort_int8_vs_fp32', r['ort_int8_vs_fp32'])}",
                ]
            )
            + " |"
        )
    print()
    print(
        "targets: OV int8/f32 <= 0.35; pruned+int8 >= 8x torch eager FP32 and "
        ">= 2.5x unpruned int8 (OpenVINO); ORT int8/fp32 < 0.8"
    )
    for r in rows:
        e = r["exec_precision"]
        print(
            f"{r['model']}: MACs {r['macs'] / 1e6:,.0f}M -> {r['pruned_macs'] / 1e6:,.0f}M pruned; OpenVINO ran "
            f"f32={e['ov_f32']}, int8={e['ov_int8']}, pruned+int8={e['ov_pruned_int8']}; "
            f"int8 ONNX: {r['int8_onnx_rewrite']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cbr_small", "mobilenet_v2", "resnet18"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--images", type=int, default=64, help="synthetic fundus images for BN statistics and calibration"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per session")
    parser.add_argument("--burst", type=int, default=5, help="timed calls per session per round")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    threads = args.threads or default_threads()
    data = load_data(DataConfig(num_images=max(args.images, 20), image_size=args.size), seed=args.seed)
    images = data.images[: args.images]
    one = np.ascontiguousarray(
        next(input_batches(images[:1], data.spec, batch_size=1, device=torch.device("cpu")))[0].numpy()
    )
    cpu = cpu_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlcompile-compression-") as tmp:
        for arch in args.models:
            t0 = time.perf_counter()
            files = prepare(arch, images, data.spec, Path(tmp), seed=args.seed)
            row = measure(arch, files, one, threads=threads, rounds=args.rounds, burst=args.burst)
            row["load_average"] = os.getloadavg()
            rows.append(row)
            print(
                f"{arch}: measured in {time.perf_counter() - t0:.0f} s, load average {row['load_average'][0]:.2f}",
                flush=True,
            )
    load = os.getloadavg()
    header = (
        f"\nbatch 1, {args.size} px, {threads} threads, p50 of {args.rounds} x {args.burst} interleaved calls; "
        f"CPU {cpu.get('model', platform.processor())}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    print_table(rows, header)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"size": args.size, "threads": threads, "cpu": cpu, "load_average": load, "rows": rows},
                indent=2,
                default=str,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
