"""Safe loading: crafted pickles refused, ONNX external data confined, atomic writes, dependency floor."""

from __future__ import annotations

import os
import pickle

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tlcompile.checkpoint import load_state, save_state
from tlcompile.compat import check_floor, version_tuple
from tlcompile.errors import MissingDependencyError, ModelError, UnsafeFileError
from tlcompile.io import atomic_write_bytes, atomic_write_with
from tlcompile.runtime.inference import open_session
from tlcompile.runtime.safefiles import check_onnx_external_data


class _Payload:
    """A pickle whose loading would create a file: proves the payload never runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    for path in (evil, raw):
        with pytest.raises(UnsafeFileError, match="refused"):
            load_state(path)
    assert not marker.exists()


def test_state_dict_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_state(tmp_path / "a.pt", state)
    save_file(state, str(tmp_path / "a.safetensors"))
    for name in ("a.pt", "a.safetensors"):
        assert torch.equal(load_state(tmp_path / name)["w"], state["w"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match="bad.safetensors"):
        load_state(tmp_path / "bad.safetensors")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:50])
    with pytest.raises(ModelError, match="trunc.pt"):
        load_state(tmp_path / "trunc.pt")


def _onnx_with_external(folder, location: str):
    """A one-Add ONNX model whose initializer lives in external data at ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(np.float32(42).tobytes())
    path = _onnx_with_external(tmp_path / "model", location)
    with pytest.raises(UnsafeFileError, match="refused"):
        open_session(path, "onnxruntime")


def test_onnx_external_data_symlink_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(np.float32(42).tobytes())
    path = _onnx_with_external(tmp_path / "model", "weights.bin")
    (tmp_path / "model" / "weights.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(UnsafeFileError, match="symlink"):
        check_onnx_external_data(path)


def test_onnx_external_data_inside_the_folder_is_fine(tmp_path):
    path = _onnx_with_external(tmp_path / "model", "weights.bin")
    (tmp_path / "model" / "weights.bin").write_bytes(np.float32(1.5).tobytes())
    assert check_onnx_external_data(path) == [(tmp_path / "model" / "weights.bin").resolve()]
    onnx.checker.check_model(str(path))
    out = open_session(path, "onnxruntime").run(np.array([1.0], np.float32))
    assert out.tolist() == [2.5]


def test_atomic_writes_keep_the_previous_file_on_a_crash(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_bytes(path, b"old")

    def crash(tmp):
        tmp.write_bytes(b"half-writ")
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(path, crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind


def test_dependency_floor():
    assert version_tuple("2.14.1+cpu") == (2, 14, 1) and version_tuple("1.17.0rc1") == (1, 17, 0)
    check_floor("torch", torch.__version__)
    check_floor("onnx", onnx.__version__)
    with pytest.raises(MissingDependencyError, match=r"torch 2.5.1 is older than 2.6.*pip install 'torch>=2.6'"):
        check_floor("torch", "2.5.1")
    with pytest.raises(MissingDependencyError, match="onnx 1.16.2 is older than 1.17"):
        check_floor("onnx", "1.16.2")
