"""benchmarks/arm_check.sh: tlcompile verify and predict on linux-aarch64 under qemu-user, with golden parity.

The end-to-end run is slow (first run: arm64 packages, aarch64 wheels and a tiny build; then the runtimes emulated)
and needs a Debian host with qemu-aarch64; the helper's own logic is checked here on made-up data, fast.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "arm_check.sh"


def _helper():
    spec = importlib.util.spec_from_file_location("arm_check", REPO / "benchmarks" / "arm_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpuinfo_text_reads_back_as_the_emulated_cpu():
    arm = _helper()
    text = arm.cpuinfo_text(["fp", "asimd", "asimddp"], arm.QEMU_MIDR["cortex-a76"], cores=2)
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert len(blocks) == 2
    fields = dict(line.split(":", 1) for line in blocks[1].splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["processor"] == "1" and fields["Features"] == "fp asimd asimddp"
    assert (fields["CPU implementer"], fields["CPU variant"], fields["CPU part"], fields["CPU revision"]) == (
        "0x41",
        "0x4",
        "0xd0b",
        "1",
    )


def test_bundle_candidates_format_1_and_2():
    arm = _helper()
    golden = {
        "file": "golden/golden.npz",
        "images": [],
        "tolerance": {"max_abs_logit": 1e-3},
        "expected": [{"referral": "refer"}],
    }
    v1 = {"artifact": {"name": "fp32"}, "model": {"runtime": "openvino", "entry": "model/fp32.xml"}, "golden": golden}
    (c,) = arm.bundle_candidates(v1)
    assert (c["id"], c["entry"], c["tolerance"], c["expected"]) == (
        "fp32@openvino",
        "model/fp32.xml",
        1e-3,
        [{"referral": "refer"}],
    )
    v2 = {
        **v1,
        "candidates": [
            {"id": "fp32@openvino", "model": {"runtime": "openvino", "entry": "model/fp32.xml"}, "golden": {}},
            {
                "id": "int8@onnxruntime",
                "model": {"runtime": "onnxruntime", "entry": "model/int8.onnx"},
                "golden": {"tolerance": {"max_abs_logit": 0.05}, "expected": [{"referral": "no referral"}]},
            },
        ],
    }
    cands = {c["id"]: c for c in arm.bundle_candidates(v2)}
    assert cands["fp32@openvino"]["tolerance"] == 1e-3
    assert cands["int8@onnxruntime"]["tolerance"] == 0.05 and cands["int8@onnxruntime"]["expected"] == [
        {"referral": "no referral"}
    ]


def _probe(rows):
    return {
        "machine": {},
        "results": [
            {
                "model": m,
                "runtime": rt,
                "config": cfg,
                "logits": logits,
                "exec_precision": "f32",
                "precision_hint": "f32",
                "ops": [],
            }
            for m, rt, cfg, logits in rows
        ],
    }


def test_compare_fails_the_pinned_candidate_warns_for_the_others_and_reports_default_precision():
    arm = _helper()
    plan = {
        "bundles": [],
        "models": [
            {
                "label": "fp32.xml",
                "quantized": False,
                "candidates": [{"id": "b0:fp32@openvino", "runtime": "openvino", "tolerance": 1e-3}],
            },
            {
                "label": "int8.xml",
                "quantized": True,
                "candidates": [{"id": "b0:int8@openvino", "runtime": "openvino", "tolerance": 0.05}],
            },
        ],
    }
    x86 = _probe(
        [
            ("fp32.xml", "openvino", "f32", [[0.0, 1.0]]),
            ("fp32.xml", "openvino", "default", [[0.0, 1.0]]),
            ("int8.xml", "openvino", "f32", [[0.0, 1.0]]),
        ]
    )
    ok = _probe(
        [
            ("fp32.xml", "openvino", "f32", [[0.0, 1.0005]]),
            ("fp32.xml", "openvino", "default", [[0.0, 1.01]]),
            ("int8.xml", "openvino", "f32", [[0.0, 1.06]]),
        ]
    )
    rows, failures, warnings = arm.compare(plan, x86, ok, running={"b0:fp32@openvino"}, strict=False)
    assert [r[-1] for r in rows] == ["runs: PASS", "info: over", "candidate: WARN"]
    assert not failures and len(warnings) == 2
    _, failures, _ = arm.compare(plan, x86, ok, running={"b0:fp32@openvino"}, strict=True)
    assert len(failures) == 1 and "int8.xml" in failures[0]
    bad = _probe([("fp32.xml", "openvino", "f32", [[0.0, 1.01]])])
    rows, failures, _ = arm.compare(plan, x86, bad, running={"b0:fp32@openvino"}, strict=False)
    assert rows[0][-1] == "runs: FAIL" and "1.00e-02" in failures[0]


@pytest.mark.slow
def test_arm_check_end_to_end_under_qemu():
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 is not on PATH (Debian: apt-get install qemu-user)")
    if shutil.which("apt-get") is None or "ID=debian" not in Path("/etc/os-release").read_text():
        pytest.skip("needs a Debian host: the arm64 Python comes from Debian's arm64 packages through apt")
    env = {**os.environ, "HOST_PY": sys.executable, "ARM_CPU": os.environ.get("ARM_CPU", "cortex-a76")}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=3600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "ARM CHECK: PASS" in proc.stdout, tail
    assert "platform.machine() aarch64" in proc.stdout
