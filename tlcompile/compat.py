"""Dependency floor of the training half: refuse releases with known unsafe loading; and no vendor telemetry.

torch < 2.6 defaults ``torch.load`` to full unpickling (CVE-2025-32434 showed even ``weights_only=True`` could be
bypassed before 2.6); onnx < 1.17 has external-data path traversal fixes missing (CVE-2024-27318/27319).

OpenVINO's model converter and NNCF send usage events to Google Analytics (``openvino-telemetry``) unless the user has
opted out, ``import openvino`` alone writes a client id and a run counter into ``~/intel``, and MLflow sends usage
events of its own: every ``import openvino`` goes through :func:`import_openvino`, and NNCF and MLflow are imported
after :func:`decline_vendor_telemetry`, which declines all three.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from tlcompile.errors import MissingDependencyError

FLOORS = {"torch": (2, 6), "onnx": (1, 17)}


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.14.1+cpu' -> (2, 14, 1); stops at the first non-numeric part."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def check_floor(package: str, version: str) -> None:
    floor = FLOORS[package]
    if version_tuple(version) < floor:
        want = ".".join(map(str, floor))
        raise MissingDependencyError(
            f"{package} {version} is older than {want}, a release with known unsafe model loading; "
            f"upgrade it: pip install '{package}>={want}'"
        )


def require_safe_versions() -> None:
    """Check every installed package that has a floor (missing optional ones are not checked here)."""
    import importlib.metadata as md

    for package in FLOORS:
        try:
            version = md.version(package)
        except md.PackageNotFoundError:
            continue
        check_floor(package, version)


@functools.cache  # once per process: what it patches stays patched, and every import point calls it
def decline_vendor_telemetry() -> None:
    """Decline vendor telemetry for this process: OpenVINO's model converter (``ov.convert_model``) and NNCF send
    nothing, whatever the consent file in the user's home says, and nothing is written there; MLflow imported after
    this call sends none either (``MLFLOW_DISABLE_TELEMETRY``, its documented switch, read when it is imported).

    A build reads patient images and a clinic box decides on them: neither reaches out to anyone unasked, nor writes
    into the user's home. Each event the converter sent also forked the build's process (the sender's way of bounding
    a send by a timeout): about 4 forks per conversion, ~12 s of CPU over the test suite on a 2-core AVX-512 AMD EPYC.
    Every (re)initialisation of the library's singleton asks ``OptInChecker.check``, so declining there holds when
    ``import openvino``, the converter or NNCF (re)initialise it; an instance made before this call is told too. A
    missing package has nothing to decline."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return

    def declined(self: object, *args: object, **kwargs: object) -> ConsentCheckResult:
        return ConsentCheckResult.DECLINED

    OptInChecker.check = declined  # type: ignore[method-assign]
    made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)  # the metaclass's name-mangled singleton
    if made is not None:
        made.consent = False


def import_openvino() -> Any:
    """``import openvino``, its telemetry declined first (the import itself initialises it); ImportError as usual."""
    decline_vendor_telemetry()
    import openvino

    return openvino
