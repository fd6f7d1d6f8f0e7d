"""Dependency floor of the training half: refuse releases with known unsafe loading.

torch < 2.6 defaults ``torch.load`` to full unpickling (CVE-2025-32434 showed even ``weights_only=True`` could be
bypassed before 2.6); onnx < 1.17 has external-data path traversal fixes missing (CVE-2024-27318/27319).
"""

from __future__ import annotations

import re

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
