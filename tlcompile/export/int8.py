"""Export an NNCF INT8 (fake-quantized) torch model to OpenVINO IR and to standard QDQ ONNX that ONNX Runtime runs fast.

- OpenVINO: the model is traced once to QDQ ONNX (NNCF's quantizers as QuantizeLinear/DequantizeLinear pairs) and
  ``ov.convert_model`` turns each pair into a ``FakeQuantize`` op; the CPU plugin runs the quantized convs in u8/i8
  kernels and ``save_model`` stores the quantized weights as int8.
- ONNX: NNCF's quantizers are switched to their QuantizeLinear/DequantizeLinear export mode (opset >= 13) for the
  trace, then :func:`finalize_qdq` rewrites the graph, first in two exact ways:

  1. *Signed activations become uint8 with zero point 128.* NNCF quantizes activations that can be negative
     (the input, residual sums, projections) as int8 symmetric; ONNX Runtime's fast CPU path (QLinearConv,
     QLinearAdd) wants uint8 activations with int8 weights (U8S8). ``q_u8 = q_s8 + 128`` with the same scale is
     the same grid, so every dequantized value is bit-identical.
  2. *Weights are stored quantized.* ``QuantizeLinear(W)`` on a constant is computed once (round half to even,
     as the operator does) and the int8 tensor feeds ``DequantizeLinear`` directly: the file shrinks ~4x.

  and then so that ONNX Runtime (1.32, CPU) fuses every layer it can and runs the others on its fast float kernels:

  3. *Flatten moves before its DequantizeLinear* (exact), so ``DQ -> Gemm`` is adjacent, and a Gemm whose input
     and weight are quantized gets its float bias as int32 at scale ``s_x * s_w`` -- what ONNX Runtime does itself
     for a conv bias when it builds QLinearConv (at most half a step of that product per logit) -- so the
     classifier runs as QGemm on int8 weights instead of a float Gemm on weights dequantized at every call.
  4. *Weights of a Conv/Gemm that cannot fuse are stored dequantized* (float, bit-identical to what
     DequantizeLinear computes; MobileNetV3-small's file grows from 3.1 to 3.9 MB, FP32 is 6.1 MB -- NNCF leaves
     the SE convs float): ONNX Runtime does not constant-fold DequantizeLinear, so such a layer otherwise
     re-dequantizes its weights at every call and runs the generic float conv (no NCHWc kernels; a depthwise conv
     becomes a slow grouped GEMM). A conv fuses when its output reaches a QuantizeLinear (directly or through
     Relu/Clip, ONNX Runtime's own test); those keep int8 weights -- a float weight there would be re-quantized
     by ONNX Runtime per tensor, not per channel.

  Rewrite 4 is what MobileNetV3 needs: NNCF quantizes after Conv+HardSwish, ONNX Runtime has no int8 HardSwish, so
  18 of its 34 quantized convs cannot become QLinearConv; with their weights dequantized at run time the int8 file
  ran ~3.8x slower than FP32 at 112 px, now ~1.3x (2 cores; ONNX Runtime's own ``quantize_static`` of the same net
  is ~1.1x). MobileNetV3 does not get faster than FP32 in int8 on ONNX Runtime's CPU provider (measured 112-512 px,
  small and large): every HardSwish costs a DequantizeLinear -> HardSigmoid -> Mul -> QuantizeLinear round trip in
  float, while int8 convs save only ~20% over FP32's NCHWc convs. A Q/DQ inserted before each HardSwish (so those
  convs fuse too, as ``quantize_static`` does) gained only 5-10% more and doubled max |Δlogit| against the
  fake-quantized model; it is not done. Plain conv nets and MobileNetV2 (ReLU/ReLU6 fuse into QLinearConv) run at
  ~0.4-0.8x FP32, depending on the machine's load.

The exported files are parity-checked by the export stage against the fake-quantized torch model (top-1 agreement).
"""

from __future__ import annotations

import shutil
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


def export_int8(
    model: nn.Module, path: Path, fmt: str, *, image_size: int, opset: int = 18, trace: Path | None = None
) -> dict[str, Any]:
    """Write the int8 ``fmt`` ('onnx' or 'openvino') file of an NNCF model; returns what was done.

    Both formats start from a QDQ ONNX trace of the model (~4 s per model on a 2-core AVX2 box). ``trace``: a path
    where that trace is kept between calls for the same model (in its current state): the first call writes it, a
    later one for the other format reads it instead of tracing again."""
    if fmt not in ("onnx", "openvino"):
        raise ExportError(f"int8 export to '{fmt}' is not supported; valid: onnx, openvino")
    if trace is None:  # a trace for this call only, never a stray file beside the output
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tlcompile-qdq-") as scratch:
            trace = Path(scratch) / f"{path.stem}.qdq.onnx"
            return export_int8(model, path, fmt, image_size=image_size, opset=opset, trace=trace)
    if not trace.is_file():
        _trace_qdq(model, trace, image_size=image_size, opset=opset)
    if fmt == "openvino":
        # From the plain QDQ trace: OpenVINO's ONNX frontend turns each QuantizeLinear/DequantizeLinear pair into the
        # FakeQuantize its torch frontend makes of an NNCF quantizer, but reads a file in ~0.1 s where the torch
        # frontend traces the hooked model through TorchScript (~13 s per model on a 2-core AVX2 box).
        export_openvino(trace, path, image_size=image_size)
        return {"format": "openvino", "quantizers": "FakeQuantize"}
    shutil.copyfile(trace, path)  # then rewritten for ONNX Runtime; the trace stays plain for OpenVINO
    return {"format": "onnx", "quantizers": "QuantizeLinear/DequantizeLinear", **finalize_qdq(path)}


def _trace_qdq(model: nn.Module, path: Path, *, image_size: int, opset: int) -> None:
    with qdq_export_mode(model) as count:
        if count == 0:
            raise ExportError("the model has no NNCF quantizers: export it as fp32, not int8")
        export_onnx(model, path, image_size=image_size, opset=max(opset, QDQ_MIN_OPSET))


def finalize_qdq(path: Path, *, for_onnxruntime: bool = True) -> dict[str, int]:
    """Rewrite a QDQ ONNX file in place: signed per-tensor activations -> uint8 (zero point + 128), constant weights
    pre-quantized to int8 initializers (both exact); with ``for_onnxruntime`` also rewrites 3 and 4 of the module
    docstring (QGemm classifier, no weight dequantized at run time). Returns the counts."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    counts = _uint8_activations_and_int8_weights(graph, path)
    if for_onnxruntime:
        _flatten_before_dequantize(graph)
        counts["gemm_bias_int32"] = _quantize_gemm_bias(graph)
        counts["weights_dequantized"] = _dequantize_unfused_weights(graph)
    _remove_unused_constants(graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path}: the rewritten int8 graph is not valid ONNX: {str(err).splitlines()[0]}") from err
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return counts


class _Graph:
    """Constants (initializers and Constant nodes), producer and consumers of every tensor of a graph."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {name: node for node in graph.node for name in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}

    def made_by(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type or name in self.outputs:
            return None
        return users[0]

    def per_tensor(self, node) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, zero point) of a per-tensor Q/DQ node with constant parameters, else None."""
        scale = self.constants.get(node.input[1])
        zero_point = self.constants.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
            return None
        return scale, zero_point

    def add_constant(self, value: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name


def _uint8_activations_and_int8_weights(graph, path: Path) -> dict[str, int]:
    """Rewrites 1 and 2 (exact)."""
    g = _Graph(graph)
    activations_to_u8 = weights_prequantized = 0
    drop = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        followers = g.consumers.get(node.output[0], [])
        if not followers or any(f.op_type != "DequantizeLinear" for f in followers):
            raise ExportError(
                f"{path}: QuantizeLinear '{node.name}' is not followed by DequantizeLinear only; not a QDQ graph"
            )
        x, scale, zero_point = (g.constants.get(name) for name in node.input[:3])
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
            name = g.add_constant(q, f"{node.output[0]}_int8")
            for follower in followers:
                follower.input[0] = name
            drop.append(node)
            weights_prequantized += 1
        elif zero_point.dtype == np.int8 and zero_point.size == 1:
            name = g.add_constant(
                (zero_point.astype(np.int16) + 128).astype(np.uint8), f"{node.output[0]}_zero_point_u8"
            )
            node.input[2] = name
            for follower in followers:
                follower.input[2] = name
            activations_to_u8 += 1
    for node in drop:
        graph.node.remove(node)
    return {"activations_to_uint8": activations_to_u8, "weights_prequantized": weights_prequantized}


def _flatten_before_dequantize(graph) -> int:
    """Rewrite 3 (exact): ``DQ(q) -> Flatten``  ==>  ``Flatten(q) -> DQ`` for a per-tensor DQ with one consumer."""
    g = _Graph(graph)
    count = 0
    for flatten in list(graph.node):
        if flatten.op_type != "Flatten":
            continue
        dequantize = g.made_by(flatten.input[0], "DequantizeLinear")
        if (
            dequantize is None
            or g.only_consumer(dequantize.output[0], "Flatten") is None
            or g.per_tensor(dequantize) is None
        ):
            continue
        flat, out = f"{flatten.output[0]}_quantized", flatten.output[0]
        flatten.input[0], flatten.output[0] = dequantize.input[0], flat
        dequantize.input[0], dequantize.output[0] = flat, out
        graph.node.remove(flatten)
        graph.node.insert(list(graph.node).index(dequantize), flatten)
        count += 1
    return count


def _quantize_gemm_bias(graph) -> int:
    """Rewrite 3: the float bias of a Gemm on ``DQ(x)`` and ``DQ(W)`` -> ``DQ(int32 bias, s_x * s_w)``."""
    from onnx import helper

    g = _Graph(graph)
    count = 0
    for gemm in list(graph.node):
        if gemm.op_type != "Gemm" or len(gemm.input) < 3 or gemm.input[2] not in g.constants:
            continue
        x, w = g.made_by(gemm.input[0], "DequantizeLinear"), g.made_by(gemm.input[1], "DequantizeLinear")
        if x is None or w is None or g.per_tensor(x) is None or w.input[1] not in g.constants:
            continue
        bias = g.constants[gemm.input[2]].astype(np.float32)
        if bias.ndim != 1:
            continue
        weight_scale = g.constants[w.input[1]].astype(np.float32)
        if weight_scale.size > 1:  # per channel: along the output (bias) axis, 0 of W^T, 1 of W
            trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
            if next((a.i for a in w.attribute if a.name == "axis"), 1) != (0 if trans_b else 1):
                continue
        scale = (g.constants[x.input[1]].astype(np.float32) * weight_scale).reshape(-1)
        if scale.size == 1:
            scale = np.full(bias.shape, scale[0], dtype=np.float32)
        if scale.shape != bias.shape or not np.all(scale > 0):
            continue
        quantized = np.clip(np.rint(bias / scale), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        name = f"{gemm.input[2]}_int32"
        inputs = [
            g.add_constant(quantized, name),
            g.add_constant(scale.astype(np.float32), f"{name}_scale"),
            g.add_constant(np.zeros(bias.shape, dtype=np.int32), f"{name}_zero_point"),
        ]
        dequantize = helper.make_node("DequantizeLinear", inputs, [f"{name}_dq"], name=f"{name}_DQ", axis=0)
        graph.node.insert(list(graph.node).index(gemm), dequantize)
        gemm.input[2] = f"{name}_dq"
        count += 1
    return count


def _dequantize_unfused_weights(graph) -> int:
    """Rewrite 4 (exact): a weight DQ feeding a Conv/Gemm that ONNX Runtime will not fuse -> its float value."""
    g = _Graph(graph)
    count = 0

    def reaches_quantize(node) -> bool:  # ONNX Runtime's own test: one path, through Relu/Clip only, to a Q
        while True:
            users = g.consumers.get(node.output[0], [])
            if len(users) != 1 or node.output[0] in g.outputs:
                return False
            if users[0].op_type == "QuantizeLinear":
                return True
            if users[0].op_type not in ("Relu", "Clip"):
                return False
            node = users[0]

    def fuses(node) -> bool:
        # A Conv/Gemm whose output reaches a Q is left alone: ONNX Runtime fuses it (its QDQ propagation may move a
        # DQ over a MaxPool to its input first), and where the weight is float it quantizes it itself, per tensor.
        if reaches_quantize(node):
            return True
        # QGemm may output float, with no bias or a quantized one (rewrite 3).
        dequantize = g.made_by(node.input[0], "DequantizeLinear")
        has_bias = len(node.input) > 2 and node.input[2]
        return (
            node.op_type == "Gemm"
            and dequantize is not None
            and g.per_tensor(dequantize) is not None
            and (not has_bias or g.made_by(node.input[2], "DequantizeLinear") is not None)
        )

    for dequantize in list(graph.node):
        if dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in g.constants:
            continue
        users = g.consumers.get(dequantize.output[0], [])
        if not users or any(u.op_type not in ("Conv", "Gemm") or u.input[0] == dequantize.output[0] for u in users):
            continue  # only weights of convs and Gemms, whose fusion rules are known here
        if all(fuses(u) for u in users):
            continue
        q = g.constants[dequantize.input[0]]
        scale = g.constants.get(dequantize.input[1])
        zero_point = g.constants.get(dequantize.input[2]) if len(dequantize.input) > 2 else np.zeros((), q.dtype)
        if scale is None or zero_point is None:
            continue
        axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        # As DequantizeLinear computes it: float32((q - zp)) * float32(scale).
        value = (q.astype(np.int32) - zero_point.astype(np.int32).reshape(shape)).astype(np.float32) * scale.astype(
            np.float32
        ).reshape(shape)
        name = g.add_constant(value.astype(np.float32), f"{dequantize.output[0]}_float")
        for user in users:
            for i, inp in enumerate(user.input):
                if inp == dequantize.output[0]:
                    user.input[i] = name
        graph.node.remove(dequantize)
        count += 1
    return count


def _remove_unused_constants(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
