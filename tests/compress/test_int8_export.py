"""INT8 export: OpenVINO runs it in int8, ONNX Runtime loads the QDQ file and fuses it into QLinear kernels, and the
u8 / pre-quantized-weight rewrite is exact."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.compress.conftest import settled
from tlcompile.compress.quantize import fold_batchnorm, quantize_ptq
from tlcompile.errors import ExportError
from tlcompile.export.exporters import export_onnx
from tlcompile.export.int8 import export_int8, finalize_qdq, qdq_export_mode
from tlcompile.runtime.inference import open_session, predict_logits
from tlcompile.runtime.preprocess import to_input


def _int8(arch, tiny_data, calibration_inputs):
    model = settled(arch, calibration_inputs)
    fold_batchnorm(model)
    x, _ = tiny_data.subset("train")
    return quantize_ptq(model, x[:16], tiny_data.spec, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def cbr_int8(tiny_data, calibration_inputs):
    return _int8("cbr_small", tiny_data, calibration_inputs)


def _inputs(tiny_data):
    x, _ = tiny_data.subset("val")
    return to_input(x, tiny_data.spec)


def _ort_ops(path, tmp_path) -> Counter:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize(
    ("arch", "convs"),
    [
        ("cbr_small", 4),
        pytest.param("mobilenet_v2", 52, marks=pytest.mark.slow),  # depthwise convs and residual adds
    ],
)
def test_int8_onnx_is_u8s8_qdq_that_onnxruntime_runs_as_qlinear_kernels(
    arch, convs, tmp_path, tiny_data, calibration_inputs, request
):
    q = request.getfixturevalue("cbr_int8") if arch == "cbr_small" else _int8(arch, tiny_data, calibration_inputs)
    path = tmp_path / "int8.onnx"
    info = export_int8(q, path, "onnx", image_size=32)
    assert info["weights_prequantized"] == convs + 1  # every conv and the classifier
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    inits.update(
        {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    )
    for node in graph.node:
        if node.op_type == "QuantizeLinear":  # only activations are quantized at run time, all as uint8
            assert node.input[0] not in inits and inits[node.input[2]].dtype == np.uint8
    constant_dq = Counter(
        inits[n.input[0]].dtype.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    )
    assert constant_dq == {"int8": convs + 1, "int32": 1}  # int8 weights; the classifier's bias as int32 (QGemm)
    ops = _ort_ops(path, tmp_path)
    assert (
        ops["QLinearConv"] == convs and ops["Conv"] == 0 and ops.get("FusedConv", 0) == 0
    )  # no conv fell back to float
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0
    if arch == "mobilenet_v2":
        assert ops["QLinearAdd"] == 10
    if arch != "cbr_small":
        return  # a random 52-layer net amplifies single rounding steps: parity is checked on cbr_small (and in builds)
    # Parity with the fake-quantized torch model on real images.
    inputs = _inputs(tiny_data)
    with torch.no_grad():
        reference = q(torch.from_numpy(inputs)).numpy()
    logits = predict_logits(open_session(path, "onnxruntime", threads=1), inputs)
    tolerance = 0.1 * np.abs(reference).max() + 1e-3  # int32 bias rounding in the fused kernels vs fake-quant float
    assert np.abs(logits - reference).max() <= tolerance
    # Images whose two logits differ by more than the tolerance cannot flip class.
    clear = np.abs(reference[:, 1] - reference[:, 0]) > 2 * tolerance
    assert (logits.argmax(1) == reference.argmax(1))[clear].all()


@pytest.mark.parametrize(
    ("arch", "counts"),
    [
        ("cbr_small", {"activations_to_uint8": 1, "weights_prequantized": 5}),  # the signed network input; 4 convs + fc
        pytest.param(
            "mobilenet_v2", {"activations_to_uint8": 28, "weights_prequantized": 53}, marks=pytest.mark.slow
        ),  # residuals
    ],
)
def test_the_uint8_and_weight_rewrite_is_exact(arch, counts, tmp_path, tiny_data, calibration_inputs, request):
    q = request.getfixturevalue("cbr_int8") if arch == "cbr_small" else _int8(arch, tiny_data, calibration_inputs)
    raw = tmp_path / "raw.onnx"
    with qdq_export_mode(q):
        export_onnx(q, raw, image_size=32, opset=17)
    final = tmp_path / "final.onnx"
    shutil.copy(raw, final)
    assert finalize_qdq(final, for_onnxruntime=False) == counts
    assert final.stat().st_size < 0.45 * raw.stat().st_size  # int8 weights on disk
    # Executed literally (no fusion), both graphs compute the same numbers: the rewrite changes no value.
    inputs = _inputs(tiny_data)
    a, b = (_literal(p, inputs) for p in (raw, final))
    np.testing.assert_array_equal(a, b)
    # The rewrites for ONNX Runtime add only the int32 rounding of the classifier's bias.
    shutil.copy(raw, final)
    assert finalize_qdq(final) == {**counts, "gemm_bias_int32": 1, "weights_dequantized": 0}
    np.testing.assert_allclose(_literal(final, inputs), a, rtol=0, atol=1e-3 * np.abs(a).max())


def _literal(path, inputs):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": inputs})[0]


def test_mobilenet_v3_dequantizes_no_weight_at_run_time(tmp_path, tiny_data, calibration_inputs):
    """NNCF quantizes MobileNetV3 after Conv+HardSwish; ONNX Runtime has no int8 HardSwish, so 18 of the 34 quantized
    convs cannot become QLinearConv. Their weights used to stay behind a DequantizeLinear, which ONNX Runtime runs at
    every call (it never constant-folds one) before a generic float conv: the int8 file ran 3-4x slower than FP32.
    They are stored dequantized now (bit-identical floats), and the classifier runs as QGemm."""
    q = _int8("mobilenet_v3_small", tiny_data, calibration_inputs)
    raw = tmp_path / "raw.onnx"
    with qdq_export_mode(q):
        export_onnx(q, raw, image_size=32, opset=18)
    exact, path = tmp_path / "exact.onnx", tmp_path / "int8.onnx"
    shutil.copy(raw, exact)
    shutil.copy(raw, path)
    finalize_qdq(exact, for_onnxruntime=False)
    info = finalize_qdq(path)
    assert info == {
        "activations_to_uint8": 46,
        "weights_prequantized": 36,
        "gemm_bias_int32": 2,
        "weights_dequantized": 18,
    }
    ops = _ort_ops(path, tmp_path)
    # Every conv whose output NNCF quantizes is fused (ReLU blocks, depthwise included, and the projections); the 18
    # Conv+HardSwish and the 18 squeeze-excitation convs (float in the torch model too) run as float convs.
    assert ops["QLinearConv"] == 16 and ops["Conv"] + ops.get("FusedConv", 0) == 36
    assert ops["QGemm"] == 2 and ops["Gemm"] == 0
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    constants = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    # Executed literally, only the classifier's int32 bias rounding (half a step of s_x * s_w) tells the two apart.
    inputs = _inputs(tiny_data)
    a, b = _literal(exact, inputs), _literal(path, inputs)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * np.abs(a).max())


def test_int8_openvino_runs_int8_kernels_and_agrees_with_torch(tmp_path, tiny_data, cbr_int8):
    q = cbr_int8
    path = tmp_path / "int8.xml"
    export_int8(q, path, "openvino", image_size=32)
    session = open_session(path, "openvino", threads=1, precision="f32")
    assert session.exec_precision in ("u8", "i8")  # read back from the compiled model: int8 kernels ran
    inputs = _inputs(tiny_data)
    with torch.no_grad():
        reference = q(torch.from_numpy(inputs)).numpy()
    logits = predict_logits(session, inputs)
    tolerance = 0.1 * np.abs(reference).max() + 1e-3
    assert np.abs(logits - reference).max() <= tolerance
    assert path.with_suffix(".bin").stat().st_size < 0.3 * 4 * sum(p.numel() for p in q.parameters())  # int8 weights


@pytest.mark.parametrize("first", ["onnx", "openvino"])
def test_both_formats_from_one_trace_are_the_files_two_traces_give(first, tmp_path, cbr_int8, monkeypatch):
    """With a ``trace`` path, the second format reads the QDQ trace the first one made instead of tracing the model
    again, and the files are byte for byte those of separate exports."""
    from tlcompile.export import int8

    formats = [first, "openvino" if first == "onnx" else "onnx"]
    suffix = {"onnx": ".onnx", "openvino": ".xml"}
    apart, shared = tmp_path / "apart", tmp_path / "shared"
    apart.mkdir(), shared.mkdir()
    for fmt in formats:
        export_int8(cbr_int8, apart / f"int8{suffix[fmt]}", fmt, image_size=32)
    traced = []
    trace_qdq = int8._trace_qdq
    monkeypatch.setattr(int8, "_trace_qdq", lambda *a, **k: traced.append(a[1]) or trace_qdq(*a, **k))
    for fmt in formats:
        export_int8(cbr_int8, shared / f"int8{suffix[fmt]}", fmt, image_size=32, trace=tmp_path / "int8.qdq.onnx")
    assert len(traced) == 1
    for name in ("int8.onnx", "int8.bin"):
        assert (shared / name).read_bytes() == (apart / name).read_bytes(), name

    def numbered(xml: Path) -> str:  # OpenVINO numbers the names it makes up from a counter of the process
        return re.sub(r"_\d+\b", "_N", xml.read_text())

    assert numbered(shared / "int8.xml") == numbered(apart / "int8.xml")


def test_a_model_without_quantizers_is_not_exported_as_int8(tmp_path):
    from tlcompile.models import get_model

    with pytest.raises(ExportError, match="no NNCF quantizers"):
        export_int8(get_model("cbr_small", num_classes=2).eval(), tmp_path / "x.onnx", "onnx", image_size=32)
