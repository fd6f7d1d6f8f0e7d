"""The runtimes tlcompile measures and ships, in one table: what each is called, which export format it reads, the
files a model of that format is made of, and how a model file is opened on it.

Every other module reads this table (recipes, exports, the build's bench rows, bundles, ``tlcompile bench``, the
clinic-box runtime), so adding a runtime is a row here plus its session class. Importing this module loads no
runtime package: :func:`tlcompile.runtime.inference.open_session` imports the row's session class (and with it
openvino / onnxruntime) when a model is opened.

Never imports torch (the ``torch`` row describes the build's eager bench rows; it opens no files).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlcompile.errors import RuntimeBackendError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Backend:
    """One runtime."""

    name: str  # runtime name in recipes, report.json rows, bundle.json, the CLI: 'openvino'
    label: str  # how people write it: 'OpenVINO'
    format: str  # the export format a build measures it on (report.json 'format', bundle model.format): 'openvino'
    suffixes: tuple[str, ...]  # the format's files: the entry file's suffix first, then companions written beside it
    package: str  # the Python package that runs it (imported only when a model is opened)
    shippable: bool  # may be a bundle candidate: runs on the clinic's box, torch-free
    # Formats it opens, preferred first: OpenVINO runs its IR and also ONNX; ONNX Runtime only ONNX.
    reads: tuple[str, ...] = ()
    # "module:Class" of its InferenceSession (a classmethod ``open``); None: opens no model files (torch eager rows).
    session: str | None = None
    # The runtime itself tells what a file is (OpenVINO reads IR, ONNX and more); else only files of ``reads`` open.
    any_file: bool = False
    devices: bool = False  # takes a device (CPU, GPU, NPU, AUTO); others always run on the CPU

    @property
    def suffix(self) -> str:
        """The entry file's suffix: '.xml', '.onnx', '.pt'."""
        return self.suffixes[0]

    @property
    def opens_files(self) -> bool:
        return self.session is not None

    def model_files(self, path: str | Path) -> list[Path]:
        """The file(s) making up the model whose entry file is ``path``: x.xml -> x.xml, x.bin; x.onnx -> x.onnx."""
        path = Path(path)
        return [path, *(path.with_suffix(s) for s in self.suffixes[1:])]

    def size_bytes(self, path: str | Path) -> int:
        """Bytes on disk of the model (entry file plus the companions that exist)."""
        files = self.model_files(path)
        return files[0].stat().st_size + sum(f.stat().st_size for f in files[1:] if f.is_file())

    def file_for(self, files: dict[str, Path]) -> Path | None:
        """The model file this runtime would run out of ``{format: path}`` (its own format first), or None."""
        return next((files[f] for f in self.reads if files.get(f) is not None), None)

    def session_class(self) -> Any:
        if self.session is None:
            valid = ", ".join(FILE_RUNTIMES)
            raise RuntimeBackendError(f"runtime '{self.name}' cannot open files; valid here: {valid}")
        module, _, cls = self.session.partition(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="openvino",
        label="OpenVINO",
        format="openvino",
        suffixes=(".xml", ".bin"),
        package="openvino",
        shippable=True,
        reads=("openvino", "onnx"),
        session="tlcompile.runtime.inference:OpenVINOSession",
        any_file=True,
        devices=True,
    ),
    Backend(
        name="onnxruntime",
        label="ONNX Runtime",
        format="onnx",
        suffixes=(".onnx",),
        package="onnxruntime",
        shippable=True,
        reads=("onnx",),
        session="tlcompile.runtime.inference:OnnxRuntimeSession",
    ),
    # The build's eager reference rows: the in-memory torch module (weights saved as .pt), never shipped.
    Backend(
        name="torch",
        label="PyTorch",
        format="torch",
        suffixes=(".pt",),
        package="torch",
        shippable=False,
        reads=("torch",),
    ),
)

RUNTIMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)  # ('openvino', 'onnxruntime', 'torch')
FORMATS: tuple[str, ...] = tuple(b.format for b in BACKENDS)  # ('openvino', 'onnx', 'torch')
FILE_RUNTIMES: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.opens_files)  # what bench / open_session run
SHIPPABLE_RUNTIMES: tuple[str, ...] = tuple(b.name for b in BACKENDS if b.shippable)  # bundle candidates' runtimes
# Entry-file suffixes of the formats a runtime session opens: what `tlcompile bench` takes as a model file.
MODEL_SUFFIXES: tuple[str, ...] = tuple(b.suffix for b in BACKENDS if b.opens_files)  # ('.xml', '.onnx')

_BY_NAME = {b.name: b for b in BACKENDS}
_BY_FORMAT = {b.format: b for b in BACKENDS}
_BY_SUFFIX = {b.suffix: b for b in BACKENDS}


def backend(runtime: str) -> Backend:
    """The row of a runtime name; a clear error for any other name."""
    try:
        return _BY_NAME[runtime]
    except KeyError:
        raise RuntimeBackendError(f"runtime '{runtime}' is not valid; valid: {', '.join(RUNTIMES)}") from None


def backend_for_format(fmt: str) -> Backend:
    """The runtime a build measures an export format on: 'onnx' -> onnxruntime, 'openvino' -> openvino."""
    try:
        return _BY_FORMAT[fmt]
    except KeyError:
        raise RuntimeBackendError(f"format '{fmt}' is not valid; valid: {', '.join(FORMATS)}") from None


def backend_for_file(path: str | Path) -> Backend | None:
    """The row whose format's entry file has ``path``'s suffix (x.xml -> openvino, x.onnx -> onnxruntime), or None."""
    return _BY_SUFFIX.get(Path(path).suffix)


def format_of(path: str | Path) -> str | None:
    """The export format of a model entry file by its suffix ('openvino', 'onnx', 'torch'), or None."""
    row = backend_for_file(path)
    return row.format if row else None


def model_files(path: str | Path) -> list[Path]:
    """The file(s) making up the model whose entry file is ``path`` (x.xml -> x.xml, x.bin); unknown suffix: [path]."""
    row = backend_for_file(path)
    return row.model_files(path) if row else [Path(path)]


def size_bytes(path: str | Path) -> int:
    """Bytes on disk of a model: its entry file plus the companions that exist (x.xml + x.bin)."""
    row = backend_for_file(path)
    return row.size_bytes(path) if row else Path(path).stat().st_size
