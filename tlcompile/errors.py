"""Exceptions that tlcompile raises for problems a user can fix.

The CLI catches :class:`TlcompileError` and prints ``str(err)`` as one line (no traceback).
Every message names the bad value, where it came from (recipe key, file, line) and what is valid.
Anything else that escapes is a bug in tlcompile and is shown with its traceback.
"""

from __future__ import annotations


class TlcompileError(Exception):
    """Base class: a problem the user can fix; printed as one line by the CLI."""

    exit_code = 2


class RecipeError(TlcompileError):
    """The recipe (YAML or a --set override) is invalid."""


class DataError(TlcompileError):
    """A dataset is missing, unreadable or inconsistent."""


class ModelError(TlcompileError):
    """An unknown model, or weights that do not fit the model."""


class WeightsNotFoundError(ModelError):
    """Pretrained weights are needed but not on disk (nothing is downloaded at run time)."""


class UnsafeFileError(TlcompileError):
    """A file would need unsafe loading (a pickle with code, a path escaping its folder)."""


class TrainError(TlcompileError):
    """Training could not proceed (e.g. the loss became NaN)."""


class CompressionError(TlcompileError):
    """Pruning or quantization cannot be applied to this model as configured."""


class ExportError(TlcompileError):
    """Export to ONNX/OpenVINO failed or the exported model disagrees with torch."""


class RuntimeBackendError(TlcompileError):
    """An inference runtime (OpenVINO, ONNX Runtime) is missing or failed to run a model."""


class BundleError(TlcompileError):
    """A deployment bundle is missing files, has bad hashes, or fails its golden samples."""


class ClusterError(TlcompileError):
    """A Ray cluster (``tlcompile sweep --address``) cannot be reached or joined."""


class MissingDependencyError(TlcompileError):
    """An optional dependency is not installed; the message names the extra to install."""


def missing_dependency(
    package: str, extra: str | None = "train", err: BaseException | None = None
) -> MissingDependencyError:
    """Build the error for an import that failed; use as ``raise missing_dependency("torch") from err``.

    ``extra=None`` for the core dependencies (the runtime half), which plain ``pip install tlcompile`` brings.
    """
    how = f"pip install 'tlcompile[{extra}]'" if extra else "pip install tlcompile"
    return MissingDependencyError(
        f"this needs '{package}', which is not installed; install it with: {how}" + (f" ({err})" if err else "")
    )
