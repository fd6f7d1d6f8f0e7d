"""Export an NNCF INT8 (fake-quantized) torch model to OpenVINO IR and to standard QDQ ONNX that ONNX Runtime runs fast.

- OpenVINO: ``ov.convert_model`` turns NNCF's quantizers into ``FakeQuantize`` ops; the CPU plugin runs the
  quantized convs in u8/i8 kernels and ``save_model`` stores the quantized weights as int8.
- ONNX: NNCF's quantizers are switched to their QuantizeLinear/DequantizeLinear export mode (opset >= 13) for the
  trace, then the graph is rewritten in two exact ways (:func:`finalize_qdq`):

  1. *Signed activations become uint8 with zero point 128.* NNCF quantizes activations that can be negative
     (the input, residual sums, projections) as int8 symmetric; ONNX Runtime's fast CPU path (QLinearConv,
     QLinearAdd) wants uint8 activations with int8 weights (U8S8). ``q_u8 = q_s8 + 128`` with the same scale is
     the same grid, so every dequantized value is bit-identical.
  2. *Weights are stored quantized.* ``QuantizeLinear(W)`` on a constant is computed once (round half to even,
     as the operator does) and the int8 tensor feeds ``DequantizeLinear`` directly: the file shrinks ~4x and the
     runtime never sees float weights.

The exported files are parity-checked by the export stage against the fake-quantized torch model (top-1 agreement).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tlcompile.errors import ExportError
from tlcompile.export.exporters import export_onnx, export_openvino
from tlcompile.io import atomic_path

QDQ_MIN_OPSET = 13  # per-channel (axis) QuantizeLinear / DequantizeLinear


@contextmanager
def qdq_export_mode(model: nn.Module) -> Iterator[int]:
    """Within the block, every NNCF quantizer traces as a QuantizeLinear/DequantizeLinear pair; yields their count."""
    from nncf.torch.quantization.layers import QuantizerExportMode

    from tlcompile.compress.quantize import quantizer_hooks

    quantizers = [q for _, q in quantizer_hooks(model)]
    previous = [q._export_mode for q in quantizers]
    for q in quantizers:
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    try:
        yield len(quantizers)
    finally:
        for q, mode in zip(quantizers, previous, strict=True):
            q.set_export_mode(mode)


def export_int8(model: nn.Module, path: Path, fmt: str, *, image_size: int, opset: int = 18) -> dict[str, Any]:
    """Write the int8 ``fmt`` ('onnx' or 'openvino') file of an NNCF model; returns what was done."""
    if fmt == "openvino":
        export_openvino(model, path, image_size=image_size)
        return {"format": "openvino", "quantizers": "FakeQuantize"}
    if fmt != "onnx":
        raise ExportError(f"int8 export to '{fmt}' is not supported; valid: onnx, openvino")
    with qdq_export_mode(model) as count:
        if count == 0:
            raise ExportError("the model has no NNCF quantizers: export it as fp32, not int8")
        export_onnx(model, path, image_size=image_size, opset=max(opset, QDQ_MIN_OPSET))
    return {"format": "onnx", "quantizers": "QuantizeLinear/DequantizeLinear", **finalize_qdq(path)}


def finalize_qdq(path: Path) -> dict[str, int]:
    """Rewrite a QDQ ONNX file in place: signed per-tensor activations -> uint8 (zero point + 128), constant weights
    pre-quantized to int8 initializers. Both exact (module docstring). Returns the counts."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    activations_to_u8 = weights_prequantized = 0
    drop = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        followers = consumers.get(node.output[0], [])
        if not followers or any(f.op_type != "DequantizeLinear" for f in followers):
            raise ExportError(f"{path}: QuantizeLinear '{node.name}' is not followed by DequantizeLinear only; not a QDQ graph")
        x, scale, zero_point = (constants.get(name) for name in node.input[:3])
        if scale is None or zero_point is None:
            continue
        if x is not None:
            # A constant weight: store q = saturate(round_half_even(W / scale) + zp) and drop the QuantizeLinear.
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = scale.size
            info = np.iinfo(zero_point.dtype)
            q = np.rint(x / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.int32)
            q = np.clip(q, info.min, info.max).astype(zero_point.dtype)
            name = f"{node.output[0]}_int8"
            graph.initializer.append(numpy_helper.from_array(q, name))
            for follower in followers:
                follower.input[0] = name
            drop.append(node)
            weights_prequantized += 1
        elif zero_point.dtype == np.int8 and zero_point.size == 1:
            name = f"{node.output[0]}_zero_point_u8"
            graph.initializer.append(numpy_helper.from_array((zero_point.astype(np.int16) + 128).astype(np.uint8), name))
            node.input[2] = name
            for follower in followers:
                follower.input[2] = name
            activations_to_u8 += 1
    for node in drop:
        graph.node.remove(node)
    _remove_unused_constants(graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path}: the rewritten int8 graph is not valid ONNX: {str(err).splitlines()[0]}") from err
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return {"activations_to_uint8": activations_to_u8, "weights_prequantized": weights_prequantized}


def _remove_unused_constants(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
