"""Crash-safe, resumable, deterministic training and builds."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tlcompile.models import get_model
from tlcompile.runtime.preprocess import PreprocessSpec
from tlcompile.train import loop


class _Killed(Exception):
    pass


def _fit(tmp_path, *, kill_after: int | None = None, checkpoint: bool = True):
    """3 epochs of mobilenet_v3_small (it has dropout: the global RNG matters) on random 32 px data."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (48, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 48)
    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", num_classes=2)
    opt = loop.make_optimizer(model.parameters(), name="adamw", lr=1e-3)
    from tlcompile.recipe import TrainConfig

    sched = loop.make_scheduler(opt, TrainConfig(), 3, 3)

    def on_epoch(record):
        if kill_after is not None and record["epoch"] == kill_after:
            raise _Killed

    ckpt = loop.EpochCheckpoint(tmp_path / "epoch.pt", tag="t") if checkpoint else None
    settings = loop.FitSettings(
        epochs=3,
        batch_size=16,
        optimizer=opt,
        scheduler=sched,
        loss_fn=torch.nn.CrossEntropyLoss(),
        seed=0,
        device=torch.device("cpu"),
        checkpoint=ckpt,
    )
    result, best = loop.fit(
        model, (x, y), (x[:16], y[:16]), PreprocessSpec(size=32), settings, loop.FitCallbacks(on_epoch=on_epoch)
    )
    return model, result, best


def _digest(state) -> str:
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resumed_training_ends_with_identical_weights(tmp_path, kill_after):
    reference_model, reference, _ = _fit(tmp_path / "ref", checkpoint=False)
    with pytest.raises(_Killed):
        _fit(tmp_path / "run", kill_after=kill_after)
    # The checkpoint of the last finished epoch is on disk; a fresh process-equivalent run continues from it.
    torch.manual_seed(1234)  # a different RNG state at restart must not matter: the checkpoint restores it
    model, result, _ = _fit(tmp_path / "run")
    assert _digest(model.state_dict()) == _digest(reference_model.state_dict())
    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference.history]


def test_checkpoint_of_another_recipe_is_not_resumed(tmp_path):
    with pytest.raises(_Killed):
        _fit(tmp_path, kill_after=1)
    assert loop.EpochCheckpoint(tmp_path / "epoch.pt", tag="other").load() is None


# ------------------------------------------------------------------------------ whole builds (subprocess)
# Timings, and what is derived from them: the bundle selection's p90, and the bundle manifest's hash (bundle.json
# records the measured latency and its creation time).
TIMING_KEYS = {
    "created",
    "latency_ms",
    "stage_seconds",
    "wall_s",
    "seconds",
    "first_ms",
    "first_inference_ms",
    "compile_ms",
    "iterations",
    "throughput_fps",
    "gmacs_per_s",
    "peak_rss_mb",
    "e2e",
    "p90_ms",
    "manifest_sha256",
    "measured_on_build_box",
    "load_average",
    "noise",
    "stability",
}
# With several candidates the build's default among them is measured too (interleaved rounds on the build box).
BUNDLE_CHOICE_KEYS = {"default_candidate", "artifact", "runtime", "verify"}
SELECTION_CHOICE_KEYS = {"chosen", "chosen_id", "why"}


def _strip_report(report):
    report = _strip_timings(report)
    bundle = report.get("bundle") or {}
    for key in BUNDLE_CHOICE_KEYS:
        bundle.pop(key, None)
    for key in SELECTION_CHOICE_KEYS:
        (bundle.get("selection") or {}).pop(key, None)
    if report.get("explain"):  # the explain stage explains the bundle's default candidate: it follows that choice
        report["explain"] = {"method": report["explain"].get("method")}
    if report.get("quality"):  # the gate's measured cost on this box
        report["quality"].pop("ms_per_photo", None)
    return report


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tlcompile.cli", "build", str(recipe), "--out", str(out), *extra]


@pytest.fixture
def build_recipe(tiny_recipe_dict, write_recipe):
    tiny_recipe_dict["train"]["epochs"] = 3
    tiny_recipe_dict["model"]["arch"] = "mobilenet_v3_small"
    return write_recipe(tiny_recipe_dict)


@pytest.mark.slow
def test_two_seeded_builds_are_identical(build_recipe, tmp_path):
    for name in ("a", "b"):
        subprocess.run(_build_cmd(build_recipe, tmp_path / name), check=True, capture_output=True, timeout=600)
    a, b = tmp_path / "a", tmp_path / "b"
    assert _sha(a / "02_train" / "fp32.pt") == _sha(b / "02_train" / "fp32.pt")
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert _strip_report(ra) == _strip_report(rb)


def _kill_when(recipe: Path, out: Path, marker: str, timeout: float = 300) -> None:
    proc = subprocess.Popen(_build_cmd(recipe, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / marker).exists():
        if proc.poll() is not None:
            pytest.fail(f"the build finished before {marker} appeared; cannot test a kill there")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{marker} never appeared")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["02_train/epoch-checkpoint.pt", "02_train/stage.json", "05_export/stage.json"])
def test_killed_build_resumes_to_the_same_result(build_recipe, tmp_path, marker):
    reference = tmp_path / "reference"
    subprocess.run(_build_cmd(build_recipe, reference), check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    _kill_when(build_recipe, out, marker)
    assert not (out / "report.json").exists()
    subprocess.run(_build_cmd(build_recipe, out, "--resume"), check=True, capture_output=True, timeout=600)
    assert _sha(out / "02_train" / "fp32.pt") == _sha(reference / "02_train" / "fp32.pt")
    r_ref, r_out = (json.loads((p / "report.json").read_text()) for p in (reference, out))
    assert _strip_report(r_ref) == _strip_report(r_out)
