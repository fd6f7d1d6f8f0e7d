"""The build compiles NNCF's CPU kernels in the background on a machine's first quantization, and only then."""

from __future__ import annotations

import pytest

from tlcompile.compress import quantize


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(quantize, "_KERNEL_BUILD", {})
    folder = quantize._kernel_folder()
    assert str(folder).startswith(str(tmp_path))
    return folder


def test_built_or_being_built_kernels_start_nothing(kernel_cache, monkeypatch):
    monkeypatch.setattr(quantize, "_BUILD_KERNELS", "raise SystemExit('must not run')")
    kernel_cache.mkdir(parents=True, exist_ok=True)
    (kernel_cache / "lock").touch()  # another build is compiling them
    assert quantize.start_kernel_build() is False
    (kernel_cache / "lock").unlink()
    (kernel_cache / "quantized_functions_cpu.so").touch()
    assert quantize.start_kernel_build() is False
    assert quantize._KERNEL_BUILD == {}


def test_missing_kernels_are_built_once_and_quantization_waits(kernel_cache, monkeypatch, tmp_path):
    marker = tmp_path / "compiled"
    # Stands in for the compile (a minute): proves the process runs, with one job, and that import_nncf waits for it.
    monkeypatch.setattr(
        quantize,
        "_BUILD_KERNELS",
        f"import os, time; time.sleep(0.5); open({str(marker)!r}, 'w').write(os.environ['MAX_JOBS'])",
    )
    assert quantize.start_kernel_build() is True
    assert quantize.start_kernel_build() is False  # one per build process
    quantize.import_nncf()
    assert marker.read_text() == "1"
    assert quantize._KERNEL_BUILD["process"].returncode == 0
