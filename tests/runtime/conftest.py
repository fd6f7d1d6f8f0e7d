"""Helpers of the bundle, predict and serve tests; their shared tiny build (``tiny_build``) is in tests/conftest.py."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FEW_RISE_MASKS
from tlcompile.runtime import pinning

# The [train] extras: a test's subprocess makes them unimportable to prove the runtime half needs none of them.
TRAIN_ONLY_MODULES = ("torch", "torchvision", "nncf", "torch_pruning", "onnx", "onnxscript", "sklearn", "matplotlib")


@pytest.fixture
def bundle_copy(tiny_build, tmp_path) -> Path:
    """A private copy of the bundle that a test may damage."""
    return Path(shutil.copytree(tiny_build.bundle, tmp_path / "bundle"))


def _write_fundus_images(folder: Path, n: int, *, seed: int = 7, size: int = 96) -> list[Path]:
    """``n`` synthetic fundus photographs as PNG files (camera-like: the field of view on black)."""
    from tlcompile.data.synthetic import generate

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = generate(n, seed=seed, size=size)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img_{seed}_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _write_corrupt_images(folder: Path, stem: str = "bad") -> list[Path]:
    """Two files a camera folder can hold that no decoder reads: a PNG cut off mid-stream and bytes named .jpg."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(buffer, format="PNG")
    truncated = folder / f"{stem}_truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    garbage = folder / f"{stem}_garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return [truncated, garbage]


# Runs first in the subprocess: an import finder that refuses every [train] module, as on a box where they are
# not installed, and records each attempt, so a test can also show that the runtime never even tries them.
_BLOCK_TRAIN_MODULES = """
import atexit, sys
BLOCKED, ATTEMPTS = {blocked!r}, []
class BlockTrainModules:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed on this box)", name=name)
        return None
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.meta_path.insert(0, BlockTrainModules())
atexit.register(lambda: print("ATTEMPTED:" + ",".join(sorted(set(ATTEMPTS)))))
"""


def _run_cli(*args: str, block_train_modules: bool = False, timeout: float = 120) -> Any:
    """Run ``tlcompile ARGS`` in a fresh interpreter; with ``block_train_modules`` no [train] extra can be imported
    and stdout ends with ``ATTEMPTED:<modules the run tried to import>``."""
    import subprocess

    prelude = _BLOCK_TRAIN_MODULES.format(blocked=TRAIN_ONLY_MODULES) if block_train_modules else ""
    # verify's candidate bench with the short rounds tests/conftest.py gives the in-process tests (~2 s a verify less)
    # and the tests' RISE heatmaps of FEW_RISE_MASKS masks (see tests/conftest.py)
    rounds = (
        f"from tlcompile.runtime import pinning\npinning.DEFAULT_ROUND_SECONDS = {pinning.DEFAULT_ROUND_SECONDS!r}\n"
        f"pinning.DEFAULT_ITERATIONS = {pinning.DEFAULT_ITERATIONS!r}\n"
        f"from tlcompile.runtime import explain\nexplain.RISE_MASKS = {FEW_RISE_MASKS!r}\n"
    )
    code = prelude + rounds + "from tlcompile.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def quick_retries(monkeypatch):
    """serve retries a file that looks cut off after it stays unchanged RETRY_MIN_WAIT s again (0.5 s, three times):
    1.5 s of waiting per such file for the tests that only count the retries and records (--settle 0 everywhere)."""
    from tlcompile.runtime import serve

    monkeypatch.setattr(serve, "RETRY_MIN_WAIT", 0.05)


@pytest.fixture
def fundus_images():
    return _write_fundus_images


@pytest.fixture
def corrupt_images():
    return _write_corrupt_images


@pytest.fixture
def run_cli():
    return _run_cli
