"""NNCF's CPU fake quantization, each call one pass over the tensor (``fused_fq.c``), for quantization-aware training.

NNCF's compiled CPU functions compose ATen operations: the backward alone re-runs the forward and makes about ten more
passes over every activation, 45% of a QAT step of the quickstart's MobileNetV3-small on a 2-core AVX-512 AMD EPYC
(torch.profiler: QuantizeSymmetricBackward 77 ms of a 170 ms step). ``fused_fq.c`` does the same arithmetic per
element in one vectorized pass: forward outputs and input gradients bit-identical to NNCF's, the range gradients the
same products summed in another order (tests/compress/test_fused_fq.py compares them).

Plain C without torch headers, called through ctypes: compiled on first use (about a second) by
:mod:`tlcompile.runtime.native`, into ``~/.cache/tlcompile``. Used for
float32 tensors with one scale per tensor (any dense layout) or per channel along one dimension (contiguous);
anything else, a machine without a C compiler, or ``TLCOMPILE_FUSED_FQ=0`` leaves NNCF's own functions in place.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlcompile.runtime import native

SOURCE = Path(__file__).with_name("fused_fq.c")
# No fused multiply-add: each float32 operation rounds as NNCF's separate ATen operations do (the vector width does
# not change a result: the loops are element by element, and the partial sums are explicit lanes). OpenMP: the
# process's own runtime (torch's libgomp.so.1 is loaded first and has the same name).
_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11", *native.x86_flags()]
_F = ctypes.POINTER(ctypes.c_float)


class Kernels:
    """The compiled functions, taking torch tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.tl_fq_forward.restype = None
        lib.tl_fq_backward.restype = None
        lib.tl_fq_block.restype = ctypes.c_int64
        self.block = int(lib.tl_fq_block())  # elements per block: the backward's scratch holds a sum per block

    @staticmethod
    def layout(input_: torch.Tensor, scale: torch.Tensor) -> tuple[int, int] | None:
        """(channels, inner) of the input for this scale shape, or None where the kernels do not take it."""
        if scale.numel() == 1:
            return (1, max(1, input_.numel())) if _dense(input_) else None
        if scale.dim() != input_.dim() or not input_.is_contiguous():
            return None
        dims = [d for d, size in enumerate(scale.shape) if size != 1]
        if len(dims) != 1 or scale.shape[dims[0]] != input_.shape[dims[0]]:
            return None
        return int(scale.shape[dims[0]]), max(1, math.prod(input_.shape[dims[0] + 1 :]))

    def supported(
        self, input_: torch.Tensor, input_low: torch.Tensor, input_range: torch.Tensor
    ) -> tuple[int, int] | None:
        """The input's (channels, inner) where the kernels take these tensors (see :meth:`layout`), else None."""
        if input_low.shape != input_range.shape or not all(
            t.device.type == "cpu" and t.dtype == torch.float32 for t in (input_, input_low, input_range)
        ):
            return None
        return self.layout(input_, input_range)

    @staticmethod
    def _params(input_low: torch.Tensor, input_range: torch.Tensor, levels: int) -> list[torch.Tensor]:
        """low, high, s, zp per channel, by the ATen operations NNCF's q_cpu_forward uses (a scalar divided by a
        tensor is fill + div there; Python's ``scalar / tensor`` would multiply by a reciprocal)."""
        s = torch.full_like(input_range, float(levels - 1)).div_(input_range)
        return [t.contiguous() for t in (input_low, input_low + input_range, s, (-input_low * s).round_())]

    def q_forward(self, layout: tuple[int, int], input_, input_low, input_range, levels: int) -> torch.Tensor:
        """NNCF's Quantize_forward for tensors :meth:`supported` gave ``layout`` (channels, inner) for."""
        channels, inner = layout
        output = torch.empty_like(input_)  # the input's strides (dense)
        low, high, s, zp = self._params(input_low, input_range, levels)
        self.lib.tl_fq_forward(
            _ptr(input_), _ptr(output), ctypes.c_int64(input_.numel()), ctypes.c_int64(channels),
            ctypes.c_int64(inner), _ptr(low), _ptr(high), _ptr(s), _ptr(zp), ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return output

    def q_backward(
        self, layout: tuple[int, int], grad_output, input_, input_low, input_range, levels, level_low, level_high,
        asymmetric,
    ):  # fmt: skip
        """NNCF's Quantize_backward (grad_input, grad_low, grad_range), for tensors :meth:`supported` gave ``layout``
        for and a gradient with the input's strides."""
        channels, inner = layout
        n = input_.numel()
        blocks = max(1, (n + self.block - 1) // self.block)
        grad_input = torch.empty_like(input_)
        grad_range = torch.empty(input_range.shape, dtype=torch.float32)
        grad_low = torch.empty(input_low.shape, dtype=torch.float32)
        range_sums = torch.zeros(blocks * channels, dtype=torch.float64)
        low_sums = torch.zeros(blocks * channels, dtype=torch.float64) if asymmetric else None
        low, high, s, zp = self._params(input_low, input_range, levels)
        rr = torch.ones_like(input_range).div_(input_range).contiguous()  # reverted_range = 1 / input_range
        alpha = np.float32(level_low) / np.float32(level_high)  # NNCF's scalar_t alpha: a float32 division
        self.lib.tl_fq_backward(
            _ptr(grad_output), _ptr(input_), _ptr(grad_input), ctypes.c_int64(n), ctypes.c_int64(channels),
            ctypes.c_int64(inner), _ptr(low), _ptr(high), _ptr(s), _ptr(zp), _ptr(rr), ctypes.c_float(float(alpha)),
            ctypes.c_void_p(range_sums.data_ptr()), ctypes.c_void_p(low_sums.data_ptr() if asymmetric else None),
            _ptr(grad_range), _ptr(grad_low) if asymmetric else None, ctypes.c_int(torch.get_num_threads()),
        )  # fmt: skip
        return [grad_input, grad_low, grad_range]


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill its storage span without gaps or overlaps (contiguous in some order of the dimensions, as a
    channels-last tensor is)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] != 1:
            if t.stride(d) != expected:
                return False
            expected *= t.shape[d]
    return True


def _ptr(t: torch.Tensor) -> Any:
    return ctypes.cast(t.data_ptr(), _F)


_LIBRARY = native.Compiled(SOURCE, _FLAGS, "TLCOMPILE_FUSED_FQ", Kernels)


def load() -> Kernels | None:
    """The kernels (compiled on first use, then from the cache), or None where they cannot be built or
    ``TLCOMPILE_FUSED_FQ=0``; :func:`error` then says why."""
    return _LIBRARY.get()


def error() -> str | None:
    """Why :func:`load` gave None (None when it did not, or was not called)."""
    return _LIBRARY.error


class FusedFunctions:
    """Stands in for NNCF's ``QuantizedFunctionsCPU`` (``.get(name)``): the fused forward and backward where they take
    the tensors, NNCF's own functions otherwise and for every other name."""

    def __init__(self, nncf_functions: Any, fused: Kernels) -> None:
        self.nncf_functions, self.fused = nncf_functions, fused

    def get(self, name: str) -> Any:
        if name == "Quantize_forward":
            return self.forward
        if name == "Quantize_backward":
            return self.backward
        return self.nncf_functions.get(name)

    def forward(self, input_, input_low, input_range, levels):
        layout = self.fused.supported(input_, input_low, input_range)
        if layout is not None:
            return self.fused.q_forward(layout, input_, input_low, input_range, int(levels))
        return self.nncf_functions.get("Quantize_forward")(input_, input_low, input_range, levels)

    def backward(self, grad_output, input_, input_low, input_range, levels, level_low, level_high, is_asymmetric):
        same_kind = (
            grad_output.dtype == input_.dtype
            and grad_output.shape == input_.shape
            and grad_output.device == input_.device
        )
        layout = self.fused.supported(input_, input_low, input_range) if same_kind else None
        if layout is not None and grad_output.stride() != input_.stride():
            # The gradient in another dense layout than the input: a convolution's weight gradient comes channels-last
            # when its input is, a pooled activation's gradient comes back contiguous. One copy into the input's
            # layout (empty_like keeps a dense tensor's strides; supported() took only dense inputs), then the fused
            # pass (NNCF's own backward would make ~10 passes).
            grad_output = torch.empty_like(input_).copy_(grad_output)
        if layout is not None:
            return self.fused.q_backward(
                layout,
                grad_output, input_, input_low, input_range, int(levels), int(level_low), int(level_high),
                bool(is_asymmetric),
            )  # fmt: skip
        return self.nncf_functions.get("Quantize_backward")(
            grad_output, input_, input_low, input_range, levels, level_low, level_high, is_asymmetric
        )


def install() -> bool:
    """Route NNCF's CPU fake quantization (``nncf.torch.quantization.quantize_functions``) through the fused
    functions; returns whether they are in use. Idempotent."""
    from nncf.torch.quantization import quantize_functions

    if isinstance(quantize_functions.QuantizedFunctionsCPU, FusedFunctions):
        return True
    fused = load()
    if fused is None:
        return False
    quantize_functions.QuantizedFunctionsCPU = FusedFunctions(quantize_functions.QuantizedFunctionsCPU, fused)
    return True
