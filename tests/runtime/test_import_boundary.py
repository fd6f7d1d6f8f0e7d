"""The torch-free half (tlcompile.runtime, tlcompile.evaluate) imports nothing from the training side.

The clinic's box installs plain ``tlcompile`` (no torch); predict, verify, serve and bench run there. Two checks: every
module imported in a fresh interpreter leaves no training module in sys.modules, and no module names one in any
import statement, including those inside functions (what import-linter's contract will see).
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import tlcompile.evaluate
import tlcompile.runtime

FORBIDDEN = (
    "torch",
    "torchvision",
    "tlcompile.data",
    "tlcompile.recipe",
    "tlcompile.models",
    "tlcompile.train",
    "tlcompile.compress",
    "tlcompile.export",
    "tlcompile.pipeline",
    "tlcompile.build",
)


def _modules() -> list[str]:
    names = []
    for package in (tlcompile.runtime, tlcompile.evaluate):
        names.append(package.__name__)
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return names


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_runtime_and_evaluate_modules_load_no_training_module():
    modules = _modules()
    assert "tlcompile.runtime.backends" in modules and "tlcompile.runtime.bench" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "tlcompile.runtime.serve" in loaded
    assert [m for m in loaded if _forbidden(m)] == []


def test_no_import_of_the_training_side_anywhere_in_the_source():
    offenders = []
    for package in (tlcompile.runtime, tlcompile.evaluate):
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                else:
                    continue
                offenders += [f"{path.name}:{node.lineno}: {n}" for n in names if _forbidden(n)]
    assert offenders == []
