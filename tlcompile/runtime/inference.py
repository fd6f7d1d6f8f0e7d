"""Inference sessions on OpenVINO and ONNX Runtime behind one small interface (never imports torch).

A session takes normalised float32 NCHW input and returns logits, and says what really ran: the thread
count and the execution precision read back from the runtime, not what was asked for.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tlcompile.compat import import_openvino
from tlcompile.errors import RuntimeBackendError, TlcompileError, missing_dependency
from tlcompile.runtime.backends import FILE_RUNTIMES, RUNTIMES, backend, backend_for_format, format_of
from tlcompile.runtime.safefiles import check_onnx_external_data
from tlcompile.runtime.threads import default_threads

if TYPE_CHECKING:
    from tlcompile.runtime.preprocess import LazyInputs

# Ops whose runtime precision says what the heavy compute ran in.
_COMPUTE_OPS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
_OV_PRECISION = {"auto": None, "f32": "f32", "bf16": "bf16", "f16": "f16"}


class InferenceSession(Protocol):
    runtime: str
    threads: int
    exec_precision: str

    def run(self, x: np.ndarray) -> np.ndarray: ...


def check_threads(threads: int | None, source: str = "--threads") -> int | None:
    """``threads`` as given (None: the default), refused with one line above this machine's logical CPUs: more
    threads than CPUs only take turns on them, and a runtime asked for 100,000 threads starts them all (a 2-core box
    ran out of memory)."""
    if threads is None:
        return None
    cpus = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise TlcompileError(
            f"{source} {threads!r} is out of range; valid: a whole number of threads from 1 to {cpus} "
            f"(this machine's logical CPUs)"
        )
    return threads


@dataclass
class OpenVINOSession:
    path: Path
    threads: int
    precision: str = "auto"
    device: str = "CPU"
    hint: str = "LATENCY"
    # Reshape to a static batch before compiling: OpenVINO picks faster kernels for static shapes (bench rows);
    # None keeps the exported dynamic batch axis (accuracy evaluation in batches).
    static_batch: int | None = None
    runtime: str = "openvino"
    exec_precision: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        threads: int,
        precision: str = "auto",
        device: str = "CPU",
        hint: str = "LATENCY",
        static_batch: int | None = None,
        busy_wait: bool = True,  # noqa: ARG003 - OpenVINO's CPU threads do not hold a core between requests
    ) -> OpenVINOSession:
        return cls(path=path, threads=threads, precision=precision, device=device, hint=hint, static_batch=static_batch)

    def __post_init__(self) -> None:
        try:
            ov = import_openvino()
        except ImportError as err:
            raise missing_dependency("openvino", None, err) from err
        if self.precision not in _OV_PRECISION:
            raise RuntimeBackendError(f"precision '{self.precision}' is not valid; valid: {', '.join(_OV_PRECISION)}")
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.hint.upper()}
        if self.device.upper().startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        if _OV_PRECISION[self.precision]:
            config["INFERENCE_PRECISION_HINT"] = _OV_PRECISION[self.precision]
        try:
            model = core.read_model(str(self.path))
            if self.static_batch:
                shape = list(model.inputs[0].get_partial_shape())
                model.reshape([self.static_batch, *[d.get_length() for d in shape[1:]]])
            self._compiled = core.compile_model(model, self.device, config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses with long C++ messages
            raise RuntimeBackendError(
                f"OpenVINO could not load '{self.path}' on {self.device}: {_ov_message(err)}"
            ) from err
        self._request = self._compiled.create_infer_request()
        self._tensor = ov.Tensor
        # run() hands the caller's array to the request without a copy when it is exactly what a static-shape
        # model takes (bench rows: static batch); the request's own input tensor is put back after each call.
        port = self._compiled.input(0)
        static = port.get_partial_shape().is_static and port.get_element_type().is_static()
        self._input_dtype = port.get_element_type().to_dtype() if static else None
        self._input_shape = tuple(port.get_shape()) if static else None
        self._own_input = self._request.get_input_tensor(0) if static else None
        self.properties = {
            "inference_precision_hint": _ov_type_name(self._compiled.get_property("INFERENCE_PRECISION_HINT")),
            "num_threads": int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
            if "INFERENCE_NUM_THREADS" in config
            else 0,
            "num_streams": int(self._compiled.get_property("NUM_STREAMS")),
            "performance_hint": str(self._compiled.get_property("PERFORMANCE_HINT")),
        }
        self.threads = self.properties["num_threads"] or self.threads
        self.exec_precision = self._runtime_precision()

    def close(self) -> None:
        """Destroy the compiled model now (not whenever the garbage collector does) and repair the thread's
        alternate signal stack that OpenVINO may have left dangling (see :mod:`tlcompile.runtime.sigstack`)."""
        for name in ("_own_input", "_request", "_compiled"):
            self.__dict__.pop(name, None)
        from tlcompile.runtime.sigstack import repair_signal_stack

        repair_signal_stack()

    def __del__(self) -> None:
        if "_compiled" in self.__dict__:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at interpreter exit the imports may be gone; nothing to repair then
                pass

    def _runtime_precision(self) -> str:
        """Most common precision of the compute ops in the compiled (runtime) graph, e.g. 'u8', 'bf16', 'f32'."""
        counts: Counter[str] = Counter()
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" in info and "runtimePrecision" in info and info["layerType"].astype(str) in _COMPUTE_OPS:
                counts[info["runtimePrecision"].astype(str).lower()] += 1
        if not counts:
            return self.properties["inference_precision_hint"].lower()
        return counts.most_common(1)[0][0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x``: a new array the caller owns (the next call never overwrites it).

        The per-call cost is what a latency yardstick on a ~2 ms model notices (benchmark_app times only the request,
        with its input tensor filled beforehand). ``infer({0: x})`` copied the input into the request's tensor,
        went through the Python data dispatcher, and built a dict of copied outputs that was then thrown away
        before the output was copied again: ~130 us per call on a 2-core Xeon, where a bare ``infer()`` costs
        ~45 us (now ~60 us in all). Here a float32, C-contiguous, writeable array of the compiled shape is wrapped in
        place (``shared_memory=True``: no copy, as benchmark_app's preallocated tensor), the request runs with no
        inputs to dispatch, and the one output is copied once. It stays a synchronous ``infer()``, as
        benchmark_app's ``-api sync``: the graph then runs on the calling thread; start_async + wait runs it on
        OpenVINO's pinned stream thread instead, which on a loaded 2-core box measured 3x faster than
        benchmark_app, a yardstick off the other way.
        The wrapper is made anew each call and the request's own tensor is put back afterwards: the request never
        keeps a view of a caller's buffer that may change or be freed later. Anything else (dynamic-shape models,
        other dtypes or shapes, strided or read-only arrays) takes the copying path, which casts and checks as
        before.
        """
        request = self._request
        if (
            self._input_shape is not None
            and type(x) is np.ndarray
            and x.dtype == self._input_dtype
            and x.shape == self._input_shape
            and x.flags.c_contiguous
            and x.flags.writeable
            and x.flags.aligned
        ):
            request.set_input_tensor(self._tensor(x, shared_memory=True))
            try:
                request.infer()
                return request.get_output_tensor(0).data.copy()
            finally:
                request.set_input_tensor(self._own_input)
        try:
            request.infer({0: x})
        except Exception:
            # The dispatcher resizes the request's tensor to the input before the model refuses a wrong shape;
            # give it back the compiled shape so that the next call (and the restore above) still fits.
            if self._own_input is not None and tuple(self._own_input.shape) != self._input_shape:
                self._own_input.shape = list(self._input_shape)
            raise
        return request.get_output_tensor(0).data.copy()

    def throughput(self, x: np.ndarray, *, seconds: float) -> dict[str, float]:
        """Images/s with as many parallel requests as the device asks for (use with hint='THROUGHPUT')."""
        import time

        ov = import_openvino()

        jobs = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(self._compiled, jobs)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            queue.start_async({0: x})
            done += 1
        queue.wait_all()
        elapsed = time.perf_counter() - start
        return {"fps": done * x.shape[0] / elapsed, "requests": jobs, "streams": self.properties["num_streams"]}


def _ov_message(err: BaseException) -> str:
    """OpenVINO's first line is a source location ("Exception from src/..."); the reason is the last real line."""
    lines = [
        line.strip()
        for line in str(err).splitlines()
        if line.strip() and not line.strip().startswith(("Exception from", "Check "))
    ]
    return lines[-1][:300] if lines else str(err)[:300]


def _ov_type_name(value: Any) -> str:
    """OpenVINO element types print as "<Type: 'float32'>"; ``to_string()`` gives the short name ('f32')."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


@dataclass
class OnnxRuntimeSession:
    path: Path
    threads: int
    runtime: str = "onnxruntime"
    exec_precision: str = ""
    busy_wait: bool = True

    @classmethod
    def open(cls, path: Path, *, threads: int, busy_wait: bool = True, **_: Any) -> OnnxRuntimeSession:
        """ORT's CPU provider runs the graph as stored: precision, device, hint and batch do not apply."""
        return cls(path=path, threads=threads, busy_wait=busy_wait)

    def __post_init__(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise missing_dependency("onnxruntime", None, err) from err
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.threads)
        opts.inter_op_num_threads = 1
        if not self.busy_wait:
            # ORT's pool threads spin after each run, waiting for the next: a core held for nothing while predict's
            # worker threads decode the next photos (2 workers on 2 cores: 99 -> 136 photos/s measured; back-to-back
            # runs are as fast either way). The bench keeps the default, as ORT's own tools measure.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise RuntimeBackendError(f"ONNX Runtime could not load '{self.path}': {str(err).splitlines()[0]}") from err
        self._input = self._session.get_inputs()[0].name
        if not self.exec_precision:
            self.exec_precision = _onnx_precision(self.path)

    def run(self, x: np.ndarray) -> np.ndarray:
        # Already lean: ORT wraps a C-contiguous float32 array without copying it and returns a fresh output array.
        # Measured per call on a ~0.3 ms model (2-core Xeon): run_with_ort_values +38 us, I/O binding +10 us,
        # named outputs instead of None +0 us; so this stays as it is.
        return self._session.run(None, {self._input: x})[0]


def _onnx_precision(path: Path) -> str:
    """'int8' when the graph carries quantized ops, else 'f32' (ORT's CPU provider runs float graphs in f32).

    The edge install has no `onnx` package; op types are plain strings in the protobuf, so a byte scan of the
    model file finds them without parsing.
    """
    data = Path(path).read_bytes()
    return (
        "int8"
        if any(op in data for op in (b"QuantizeLinear", b"QLinearConv", b"ConvInteger", b"MatMulInteger"))
        else "f32"
    )


def open_session(
    path: str | Path,
    runtime: str,
    *,
    threads: int | None = None,
    precision: str = "auto",
    device: str = "CPU",
    hint: str = "LATENCY",
    static_batch: int | None = None,
    busy_wait: bool = True,
) -> InferenceSession:
    """Open a model file on a runtime: .xml on openvino, .onnx on onnxruntime (openvino also reads .onnx).
    ``busy_wait=False``: the runtime's threads sleep between runs instead of spinning (predict and serve, whose own
    threads need the cores between two photos' inferences).

    The runtime's row in :mod:`tlcompile.runtime.backends` names its session class, imported here (not before).
    """
    path = Path(path)
    threads = threads or default_threads()
    if not path.is_file():
        raise RuntimeBackendError(f"model file '{path}' does not exist")
    if format_of(path) == "onnx":  # external data outside the model's folder is refused
        check_onnx_external_data(path)
    row = backend(runtime) if runtime in RUNTIMES else None
    if row is None or not row.opens_files:
        raise RuntimeBackendError(f"runtime '{runtime}' cannot open files; valid here: {', '.join(FILE_RUNTIMES)}")
    if not row.any_file and format_of(path) not in row.reads:
        wanted = " or ".join(backend_for_format(f).suffix for f in row.reads)
        raise RuntimeBackendError(f"{row.name} needs an {wanted} file, got '{path.name}'")
    return row.session_class().open(
        path,
        threads=threads,
        precision=precision,
        device=device,
        hint=hint,
        static_batch=static_batch,
        busy_wait=busy_wait,
    )


def predict_logits(session: InferenceSession, x: np.ndarray | LazyInputs, batch_size: int = 32) -> np.ndarray:
    """Logits for many inputs through a session, in batches (models are exported with a dynamic batch axis)."""
    outs = [session.run(np.ascontiguousarray(x[i : i + batch_size])) for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(outs, axis=0)
