"""Export a torch model to ONNX and OpenVINO IR, and check each export against the torch model on real inputs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlcompile.compat import import_openvino
from tlcompile.errors import ExportError
from tlcompile.io import atomic_path
from tlcompile.runtime.backends import backend
from tlcompile.runtime.inference import open_session, predict_logits


def export_onnx(
    model: nn.Module, path: Path, *, image_size: int, opset: int = 18, exporter: str = "torchscript"
) -> Path:
    """Write ``path`` (.onnx, one file, dynamic batch axis, input 'input' NCHW float32, output 'logits').

    The TorchScript exporter is the default: it is ~30x faster than the dynamo exporter on these CNNs and is the
    path NNCF documents for quantized models; ``exporter='dynamo'`` uses torch.export.
    """
    model = model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                how = {
                    "dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=4096)},),
                    "opset_version": opset,
                    "dynamo": True,
                    "external_data": False,
                    "verbose": False,
                }
            else:  # the TorchScript exporter stops at opset 20
                how = {
                    "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}},
                    "opset_version": min(opset, 20),
                    "dynamo": False,
                }
            torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"], **how)
        except Exception as err:
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {str(err).splitlines()[0]}") from err
    return path


def export_openvino(model: nn.Module | Path, path: Path, *, image_size: int) -> Path:
    """Write OpenVINO IR ``path`` (.xml + .bin) from a torch module or an ONNX file; weights stay FP32 on disk."""
    try:
        ov = import_openvino()
    except ImportError as err:
        raise ExportError("OpenVINO export needs the 'openvino' package") from err
    try:
        if isinstance(model, nn.Module):
            model = model.eval()
            example = torch.zeros(1, 3, image_size, image_size)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ov_model = ov.convert_model(model, example_input=example, input=[-1, 3, image_size, image_size])
        else:
            ov_model = ov.convert_model(str(model))
        ov_model.outputs[0].get_tensor().set_names({"logits"})
        ov_model.inputs[0].get_tensor().set_names({"input"})
    except Exception as err:
        raise ExportError(f"OpenVINO conversion failed: {str(err).splitlines()[0]}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    # save_model writes the .xml and .bin together; write into temporary names and rename them, the .xml last.
    ir = backend("openvino")
    tmp_xml = path.with_name(f".{path.stem}.tmp{ir.suffix}")
    try:
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        for tmp, final in reversed(list(zip(ir.model_files(tmp_xml), ir.model_files(path), strict=True))):
            tmp.replace(final)
    finally:
        for leftover in ir.model_files(tmp_xml):
            leftover.unlink(missing_ok=True)
    return path


def check_parity(
    reference_logits: np.ndarray, path: Path, runtime: str, inputs: np.ndarray, *, threads: int | None = None
) -> dict[str, Any]:
    """Compare an exported file's logits with the torch model's on the same real inputs.

    OpenVINO is forced to f32 here: parity checks the export, not bf16 rounding (which the bench rows report).
    """
    session = open_session(path, runtime, threads=threads, precision="f32")
    logits = predict_logits(session, inputs)
    diff = np.abs(logits - reference_logits)
    return {
        "runtime": runtime,
        "exec_precision": session.exec_precision,
        "n": int(inputs.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((logits.argmax(1) == reference_logits.argmax(1)).mean()),
    }
