"""Nothing is sent to anyone unasked, nor written into the user's home: OpenVINO's converter and NNCF send usage
events (openvino-telemetry, to Google Analytics) unless the user opted out, each event forked the build's process,
``import openvino`` alone wrote a client id and a run counter into ~/intel, and MLflow sends usage events of its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import tlcompile

# In a fresh interpreter: the library's consent singleton and its checker are process-wide, so a test in this process
# after any other export would prove nothing. Every send the library attempts is counted instead of made.
_SCRIPT = textwrap.dedent(
    """
    import sys
    from openvino_telemetry.backend.backend_ga4 import GA4Backend
    SENT = []
    GA4Backend.send = lambda self, message: SENT.append(message)
    if sys.argv[1] == "library":  # what the libraries do on their own: shows the counts can be more than 0
        import openvino as ov
    else:
        from tlcompile.compat import import_openvino
        ov = import_openvino()
    ov.save_model(ov.convert_model(sys.argv[2]), sys.argv[3])  # as the export stage converts an ONNX file
    if sys.argv[1] == "tlcompile":  # and a session, NNCF's events and the MLflow client of recipe tracking.mlflow
        from tlcompile.runtime.inference import open_session
        open_session(sys.argv[3], "openvino").run(__import__("numpy").zeros((1, 3, 4, 4), "float32"))
        from tlcompile.compress.quantize import import_nncf
        import_nncf()
        from nncf.telemetry.wrapper import NNCFTelemetry
        NNCFTelemetry().send_event("nncf", "test", "label")  # as NNCF's tracked functions do (stubbed under pytest)
        from tlcompile.tracking import _client
        _client(sys.argv[3] + ".mlruns")
    else:
        import mlflow  # noqa: F401
    from mlflow.telemetry.client import get_telemetry_client
    print("SENT", len(SENT), "MLFLOW", get_telemetry_client() is not None)
    """
)


def _onnx_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(tmp_path: Path, model: Path, which: str) -> tuple[int, bool, list[str]]:
    """(openvino-telemetry events sent, whether MLflow set up its telemetry client, files written under HOME) for an
    OpenVINO conversion and an MLflow import (for tlcompile: also a session, an NNCF event and a tracking client)."""
    home = tmp_path / which
    home.mkdir()
    # No consent file in HOME and none of the variables that tell the libraries they run in CI or under pytest: their
    # default is then to send.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TLCOMPILE_NUM_THREADS")} | {"HOME": str(home)}
    # tlcompile's compiled kernels stay where they are cached (else NNCF's import compiles fused_fq.c again, ~1 s)
    env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    args = [sys.executable, "-c", _SCRIPT, which, str(model), str(tmp_path / f"{which}.xml")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [x.split() for x in done.stdout.splitlines() if x.startswith("SENT ")]
    assert line, done.stdout
    return int(line[-1][1]), line[-1][3] == "True", sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def test_openvino_nncf_and_mlflow_send_nothing_and_write_nothing_into_home(tmp_path):
    model = _onnx_model(tmp_path / "m.onnx")
    sent, mlflow_client, written = _run(tmp_path, model, "library")
    assert sent > 0 and mlflow_client and "intel/openvino_ga_cid" in written  # what the libraries do on their own
    sent, mlflow_client, written = _run(tmp_path, model, "tlcompile")
    assert sent == 0 and not mlflow_client and not [f for f in written if f.startswith("intel")], written


def test_every_import_of_openvino_declines_its_telemetry_first():
    """``import openvino`` initialises the telemetry: tlcompile imports it only through compat.import_openvino."""
    root = Path(tlcompile.__file__).parent
    direct = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "openvino" or n.startswith("openvino.") for n in names):
                direct.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert len(direct) == 1 and direct[0].startswith("tlcompile/compat.py:"), direct  # import_openvino's own
