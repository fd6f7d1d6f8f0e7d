"""``05_export``: every artifact to ONNX and/or OpenVINO IR, each file checked against its torch model (parity).

Writes ``parity.json`` and ``parity_reference.npz`` (the inputs and the torch logits behind it, so the same check can
be rerun on another CPU, or an emulated older one, without torch: :mod:`tlcompile.runtime.isa_emulation`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.build.stages import quantize
from tlcompile.export.exporters import check_parity, export_onnx, export_openvino
from tlcompile.io import atomic_save_npz, atomic_write_json
from tlcompile.runtime.backends import backend_for_format
from tlcompile.runtime.preprocess import to_input

SECTIONS = (*quantize.SECTIONS, "export")


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    r, data, folder = ctx.recipe, ctx.data, ctx.stage.folder
    x_val, _ = data.subset("val")
    inputs = to_input(x_val[: r.export.parity_images], data.spec)
    records: dict[str, Any] = {}
    references: dict[str, np.ndarray] = {"inputs": inputs}
    # An int8 model's QDQ ONNX trace, made once for both formats, is kept here (never in the build folder).
    with tempfile.TemporaryDirectory(prefix="tlcompile-qdq-") as scratch:
        for art in artifacts:
            _export_artifact(ctx, art, inputs, Path(scratch) / f"{art.name}.qdq.onnx", records, references)
    atomic_write_json(folder / "parity.json", records)
    atomic_save_npz(folder / "parity_reference.npz", references)
    ctx.stage.record = {"files": {k: str(v) for a in artifacts for k, v in a.files.items()}}
    return artifacts


def _export_artifact(
    ctx: BuildContext,
    art: Artifact,
    inputs: np.ndarray,
    trace: Path,
    records: dict[str, Any],
    references: dict[str, np.ndarray],
) -> None:
    """Every format of one artifact, parity-checked against its torch model; fills ``records`` and ``references``."""
    r, folder, done = ctx.recipe, ctx.stage.folder, ctx.stage.done
    module = art.module.cpu().eval()
    with torch.no_grad():
        reference = module(torch.from_numpy(inputs)).numpy()
    references[f"logits_{art.name}"] = reference
    for fmt in r.export.formats:
        path = folder / f"{art.name}{backend_for_format(fmt).suffix}"
        if not (done and path.is_file()):
            with ctx.console.status(f"[bold]export[/]: {art.name} -> {fmt}"):
                _export(art, module, path, fmt, ctx, trace=trace)
        art.files[fmt] = path
        runtime = backend_for_format(fmt).name
        art.parity[fmt] = check_parity(reference, path, runtime, inputs)
        records[f"{art.name}.{fmt}"] = art.parity[fmt]
        p = art.parity[fmt]
        ok = p["max_abs_diff"] <= r.export.parity_max_abs_diff or p["exec_precision"] != "f32"
        ctx.console.print(
            f"[bold]export[/]: {path.name}: max |Δlogit| {p['max_abs_diff']:.2e}, top-1 agreement "
            f"{p['top1_agreement']:.1%} ({runtime}, {p['exec_precision']})" + ("" if ok else " [red]PARITY FAILED[/]")
        )
    art.module.to(ctx.device)


def _export(art: Artifact, module: torch.nn.Module, path, fmt: str, ctx: BuildContext, *, trace: Path) -> None:
    r, size = ctx.recipe, ctx.data.spec.size
    if art.precision == "int8":  # NNCF fake-quantized: FakeQuantize IR / U8S8 QDQ ONNX, from one QDQ trace
        from tlcompile.export.int8 import export_int8

        export_int8(module, path, fmt, image_size=size, opset=r.export.opset, trace=trace)
    elif fmt == "onnx":
        export_onnx(module, path, image_size=size, opset=r.export.opset, exporter=r.export.onnx_exporter)
    elif art.files.get("onnx") is not None and art.files["onnx"].is_file():
        # From the ONNX file this stage just wrote and checked: OpenVINO reads it in ~0.1 s, where converting the
        # torch module traces it through TorchScript again (~4 s per model on a 2-core AVX2 box).
        export_openvino(art.files["onnx"], path, image_size=size)
    else:
        export_openvino(module, path, image_size=size)


STAGE = Stage(name="export", folder="05_export", sections=SECTIONS, run=run)
