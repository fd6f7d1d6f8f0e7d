"""Run the runtimes' kernels as an older CPU would: the same process under ``qemu-x86_64 -cpu MODEL``.

Which int8 kernels ONNX Runtime (MLAS) and OpenVINO (oneDNN) run is decided from CPUID at start-up: AMX, AVX-512 VNNI,
AVX-VNNI, or plain AVX2, where u8 x s8 products are summed in pairs into int16 (``VPMADDUBSW``) and can saturate. A
build box usually has the newer ones; a clinic's box often has only AVX2. qemu's user-mode emulator reports the CPUID
of the model it is given (``Haswell``: AVX2 + FMA, no AVX-512, no VNNI), so both runtimes take their AVX2 paths on any
x86-64 host: slow (emulated), but the arithmetic is the older CPU's. Neither runtime offers a switch that does this for
both (``ONEDNN_MAX_CPU_ISA`` is oneDNN's alone), hence the emulator.

``python -m tlcompile.runtime.isa_emulation --cpu Haswell ref.npz model.onnx model.xml`` prints one JSON line per file:
the ISA the emulated process saw, max |Δlogit| and top-1 agreement against the reference logits in ``ref.npz``
(arrays ``inputs`` and ``logits``). Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

EMULATED_ENV = "TLCOMPILE_EMULATED_CPU"
QEMU = "qemu-x86_64"


def qemu_available() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and shutil.which(QEMU) is not None


def run_emulated(cpu: str, reference: Path, models: list[Path], *, timeout: float = 900) -> list[dict[str, Any]]:
    """Run :func:`parity_rows` for ``models`` in a child process under ``qemu-x86_64 -cpu cpu``; its rows."""
    if not qemu_available():
        raise RuntimeError(f"{QEMU} is not installed (Debian: apt-get install qemu-user); it emulates the {cpu} CPU")
    cmd = [
        shutil.which(QEMU),
        "-cpu",
        cpu,
        sys.executable,
        "-m",
        "tlcompile.runtime.isa_emulation",
        "--cpu",
        cpu,
        str(reference),
        *map(str, models),
    ]
    env = {**os.environ, EMULATED_ENV: cpu}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(rows) != len(models):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the emulated {cpu} run failed (exit {done.returncode}): {tail}")
    return rows


def visible_isa() -> list[str]:
    """What this process's CPUID says: /proc/cpuinfo shows the host even under qemu, so ask the runtime instead."""
    from tlcompile.compat import import_openvino

    ov = import_openvino()
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return sorted(str(c) for c in caps)


def parity_rows(reference: Path, models: list[Path], threads: int = 1) -> list[dict[str, Any]]:
    from tlcompile.runtime.backends import backend_for_file, backend_for_format
    from tlcompile.runtime.inference import open_session, predict_logits

    with np.load(reference, allow_pickle=False) as ref:
        inputs, expected = ref["inputs"].astype(np.float32), ref["logits"].astype(np.float64)
    rows = []
    for path in models:
        runtime = (backend_for_file(path) or backend_for_format("onnx")).name  # x.xml: openvino, else onnxruntime
        session = open_session(path, runtime, threads=threads, precision="f32")
        logits = predict_logits(session, inputs).astype(np.float64)
        rows.append(
            {
                "file": str(path),
                "runtime": runtime,
                "exec_precision": session.exec_precision,
                "emulated_cpu": os.environ.get(EMULATED_ENV),
                "runtime_capabilities": visible_isa(),
                "max_abs_diff": float(np.abs(logits - expected).max()),
                "top1_agreement": float((logits.argmax(1) == expected.argmax(1)).mean()),
                "n": int(len(inputs)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", default=None, help="qemu CPU model to emulate (e.g. Haswell); omit to run natively")
    parser.add_argument("reference", type=Path, help="npz with 'inputs' and reference 'logits'")
    parser.add_argument("models", type=Path, nargs="+", help=".onnx / .xml files")
    args = parser.parse_args(argv)
    if args.cpu and os.environ.get(EMULATED_ENV) != args.cpu:
        rows = run_emulated(args.cpu, args.reference, args.models)
    else:
        rows = parity_rows(args.reference, args.models)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
