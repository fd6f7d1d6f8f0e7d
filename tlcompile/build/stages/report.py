"""``report``: assemble report.json's content from what the stages recorded (written by the loop at the end, after
the bundle stage has added its record). Its shape is :mod:`tlcompile.report.schema`."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import torch

import tlcompile
from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.build.stages.bench import bootstrap_seed
from tlcompile.evaluate.clinical import CI_LEVEL, CI_METHODS


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    ctx.report = assemble_report(ctx)
    return artifacts


def assemble_report(ctx: BuildContext) -> dict[str, Any]:
    data = ctx.data
    return {
        "tlcompile_version": tlcompile.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": ctx.recipe.name,
        "recipe": ctx.recipe.to_yaml_dict(),
        "recipe_sha256": ctx.recipe.fingerprint(),
        "task": data.task,
        "class_names": list(data.class_names),
        "preprocessing": data.spec.to_dict(),
        "data": {"counts": data.counts(), "images": len(data.ids)},
        "operating_point": ctx.operating_point,
        "evaluation": _evaluation_settings(ctx),
        "training": ctx.training,
        **({"transfer": ctx.transfer} if ctx.transfer is not None else {}),
        "artifacts": ctx.bench_rows,
        **({"quality": ctx.quality} if ctx.quality is not None else {}),
        "stage_seconds": {k: round(v, 2) for k, v in ctx.stage_seconds.items()},
        "environment": environment(),
    }


def _evaluation_settings(ctx: BuildContext) -> dict[str, Any]:
    """How the clinical numbers in the rows were computed, so report.json explains itself."""
    e = ctx.recipe.evaluate
    return {
        "split": "test",
        "score": "P(referable DR) = softmax(logits / temperature), summed over the referable classes",
        "ci_level": CI_LEVEL,
        "ci_methods": CI_METHODS,
        "bootstrap_resamples": e.bootstrap_resamples,
        "bootstrap_seed": bootstrap_seed(ctx),
        "calibration_bins": e.calibration_bins,
        "endpoints": e.endpoints.model_dump(),
        "reference": "the fp32 row of the same runtime",
        "test_targets_path": "06_bench/logits/test_targets.npy",
    }


def _version(module: str) -> str | None:
    """A runtime's version, or None where it is not installed (a build that exports ONNX only needs no OpenVINO)."""
    import importlib

    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def environment() -> dict[str, Any]:
    from tlcompile.runtime.cpuinfo import cpu_info

    env = {
        "tlcompile": tlcompile.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "openvino": _version("openvino"),
        "onnxruntime": _version("onnxruntime"),
        "platform": platform.platform(),
        "cpu": cpu_info(),
    }
    if torch.cuda.is_available():  # what trained the model, where a GPU did
        env["cuda"] = {
            "version": torch.version.cuda,
            "device": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
        }
    return env


STAGE = Stage(name="report", folder=None, sections=None, run=run)
