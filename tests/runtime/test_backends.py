"""The backend table: one row per runtime, and everything else agrees with it."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args, get_origin

import pytest

from tlcompile.errors import RuntimeBackendError
from tlcompile.runtime.backends import (
    BACKENDS,
    FILE_RUNTIMES,
    FORMATS,
    MODEL_SUFFIXES,
    RUNTIMES,
    SHIPPABLE_RUNTIMES,
    backend,
    backend_for_file,
    backend_for_format,
    format_of,
    model_files,
    size_bytes,
)


def test_rows_and_lookups():
    assert RUNTIMES == ("openvino", "onnxruntime", "torch")
    assert FORMATS == ("openvino", "onnx", "torch")
    assert FILE_RUNTIMES == SHIPPABLE_RUNTIMES == ("openvino", "onnxruntime")
    assert MODEL_SUFFIXES == (".xml", ".onnx")
    for row in BACKENDS:
        assert backend(row.name) is row and backend_for_format(row.format) is row
        assert backend_for_file(f"model{row.suffix}") is row and format_of(f"x{row.suffix}") == row.format
    assert backend_for_format("onnx").name == "onnxruntime" and backend("onnxruntime").format == "onnx"
    assert backend_for_format("openvino").suffix == ".xml" and backend_for_format("torch").suffix == ".pt"
    assert backend_for_file("x.bin") is None and format_of("x.txt") is None
    with pytest.raises(RuntimeBackendError, match="runtime 'tflite' is not valid; valid: openvino, onnxruntime, torch"):
        backend("tflite")
    with pytest.raises(RuntimeBackendError, match="format 'tflite' is not valid"):
        backend_for_format("tflite")


def test_which_file_a_runtime_runs():
    files = {"onnx": "m.onnx", "openvino": "m.xml"}
    assert backend("openvino").file_for(files) == "m.xml"  # its IR first
    assert backend("openvino").file_for({"onnx": "m.onnx"}) == "m.onnx"  # OpenVINO also reads ONNX
    assert backend("onnxruntime").file_for({"openvino": "m.xml"}) is None


def test_model_files_and_size(tmp_path):
    xml, onnx = tmp_path / "int8.xml", tmp_path / "fp32.onnx"
    assert model_files(xml) == [xml, tmp_path / "int8.bin"] and model_files(onnx) == [onnx]
    xml.write_bytes(b"x" * 10)
    assert size_bytes(xml) == 10  # the .bin is not there (yet): the .xml alone
    (tmp_path / "int8.bin").write_bytes(b"x" * 32)
    onnx.write_bytes(b"x" * 7)
    assert size_bytes(xml) == backend("openvino").size_bytes(xml) == 42 and size_bytes(onnx) == 7


def test_torch_rows_open_no_files(tmp_path):
    from tlcompile.runtime.inference import open_session

    path = tmp_path / "fp32.pt"
    path.write_bytes(b"weights")
    with pytest.raises(
        RuntimeBackendError, match="runtime 'torch' cannot open files; valid here: openvino, onnxruntime"
    ):
        open_session(path, "torch")
    with pytest.raises(RuntimeBackendError, match="onnxruntime needs an .onnx file, got 'fp32.pt'"):
        open_session(path, "onnxruntime")


def test_the_recipe_lists_the_table():
    """pydantic needs Literal types in recipe.py; they must name exactly the table's runtimes and formats."""
    from tlcompile.recipe import BenchConfig, BundleConfig, ExportConfig

    def literal(model, field):  # Literal[...] or list[Literal[...]] -> its values
        annotation = model.model_fields[field].annotation
        return set(get_args(get_args(annotation)[0]) if get_origin(annotation) is list else get_args(annotation))

    assert literal(BenchConfig, "runtimes") == set(RUNTIMES)
    assert literal(ExportConfig, "formats") == {backend(r).format for r in FILE_RUNTIMES}
    assert literal(BundleConfig, "runtime") == {"auto", *SHIPPABLE_RUNTIMES}


def test_importing_the_table_loads_no_runtime():
    code = (
        "import sys; import tlcompile.runtime.backends; "
        "print(sorted(m for m in ('openvino', 'onnxruntime', 'numpy', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
