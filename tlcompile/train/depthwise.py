"""The weight gradient of depthwise convolutions with larger filters on small maps, on the CPU.

oneDNN has a specialised kernel for the weight gradient of a depthwise convolution (one filter per channel) with 3x3
filters. The 5x5 filters of MobileNetV3 and EfficientNet take a generic path: in NCHW an im2col and one tiny
matrix product per channel, in channels-last (the layout training runs in: batches are permuted from the images' HWC
bytes) a direct kernel that is slow where the map is small. In the quickstart's mobilenet_v3_small at 112 px, the 5x5
filters over the 576 channels of the 4x4 last stage take 2.1 ms a call in channels-last with AVX-512 and 6.2 ms with
oneDNN limited to AVX2, for 15 MFLOP (2-core Xeon, batch 32; 5.7 ms in NCHW).

On a small map the same gradient is one batched matrix product and one plain one. For each channel c, the
correlation of every input position P with every output position L over the batch, ``M[c] = X[c]^T G[c]``
((C, P, N) x (C, N, L)), holds every product the gradient sums; tap k of the filter is the sum of the entries (P, L)
where input P feeds output L through tap k: M times a fixed 0/1 matrix of the layer's geometry (rows P*L, columns
taps). The layer above: 0.45 ms in either ISA from channels-last, most of it the copies to channel-major (0.09 ms
from NCHW). M has P*L entries against L*taps for the direct sum, so this is done only for maps of at most
:data:`MAX_POSITIONS_PER_TAP` input positions per tap.

:class:`fast_depthwise_grad` switches it on around a training step's forward pass (:func:`for_training`, used by
:func:`tlcompile.train.loop.train_one_epoch`). It changes no forward result and no input gradient, only the order in
which the weight gradient's products are summed (the last bits of float32 sums). It is off unless
``TLCOMPILE_FAST_TRAINING=1`` (:func:`tlcompile.train.loop.fast_training`): over 20 quickstart seeds, models trained
with it and the fused optimizer update averaged a 0.3 pp lower fp32 test AUC, which reads as trajectory noise but was
not shown to be.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Where the product pays (2-core Xeon, channels-last and NCHW, AVX-512 and oneDNN limited to AVX2; oneDNN's time /
# the product's from channels-last): 5x5 filters on 4x4 maps 5-14x, on 7x7 maps 1.3-2.5x, 7x7 filters on 7x7 maps
# 1.3-3x; 5x5 on 14x14 maps is 2-3x slower in channels-last.
MAX_POSITIONS_PER_TAP = 2
# oneDNN's own kernel for 3x3 filters is as fast as the product or faster: left to it.
SPECIALISED_TAPS = 9


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@functools.lru_cache(maxsize=64)
def _tap_selector(
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The 0/1 matrix (P*L, taps) with a 1 where input position P feeds output position L through the tap."""
    (h, w), (oh, ow), (kh, kw) = in_hw, out_hw, kernel
    oy, ox, ty, tx = torch.meshgrid(*(torch.arange(n) for n in (oh, ow, kh, kw)), indexing="ij")
    iy = oy * stride[0] - padding[0] + ty * dilation[0]
    ix = ox * stride[1] - padding[1] + tx * dilation[1]
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    selector = torch.zeros(h * w, oh * ow, kh * kw)
    selector[(iy * w + ix)[inside], (oy * ow + ox)[inside], (ty * kw + tx)[inside]] = 1.0
    return selector.reshape(h * w * oh * ow, kh * kw)


def worth_it(in_hw: tuple[int, int], kernel: tuple[int, int]) -> bool:
    """Whether the product is the faster way to a depthwise layer's weight gradient, for this map and filter size."""
    taps = kernel[0] * kernel[1]
    return taps > SPECIALISED_TAPS and in_hw[0] * in_hw[1] <= MAX_POSITIONS_PER_TAP * taps


def depthwise_weight_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """d(loss)/d(weight) of ``conv2d(x, weight, groups=C)``, a depthwise layer (``weight`` (C, 1, kh, kw)), given
    d(loss)/d(output); ``x`` (N, C, H, W) and ``grad_out`` (N, C, OH, OW) in float32, in any memory format."""
    n, c, h, w = x.shape
    oh, ow = grad_out.shape[2:]
    kernel = (weight.shape[2], weight.shape[3])
    # Both copied channel-major, so the batched product gets plain matrices whatever the memory format (a
    # channels-last x viewed as (C, P, N) has no unit stride, and bmm would copy it a matrix at a time).
    x_by_channel = x.transpose(0, 1).reshape(c, n, h * w).contiguous()
    grad_by_channel = grad_out.transpose(0, 1).reshape(c, n, oh * ow).contiguous()
    products = torch.bmm(x_by_channel.transpose(1, 2), grad_by_channel)  # (C, P, L), summed over the batch
    selector = _tap_selector((h, w), (oh, ow), kernel, stride, padding, dilation).to(x.device, x.dtype)
    return (products.reshape(c, h * w * oh * ow) @ selector).reshape(weight.shape)


class _DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d`` of a depthwise layer, whose weight gradient comes from :func:`depthwise_weight_grad` and input
    gradient from oneDNN as before."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            groups, only_input = weight.shape[0], [True, False, False]
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups, only_input
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, weight, grad_out, stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class fast_depthwise_grad(TorchFunctionMode):  # noqa: N801 - a context manager, named like torch.no_grad
    """Within it, ``F.conv2d`` of a depthwise layer (one filter per channel) on the CPU in float32 whose weight needs
    a gradient, where :func:`worth_it`, is :class:`_DepthwiseConv2d`; every other call runs as it would. Under NNCF's
    quantization-aware training, NNCF's own function mode (entered inside the model's forward, so above this one)
    fake-quantizes the weight first and this one receives the quantized weight."""

    def __torch_function__(self, func, _types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = dict(zip(_CONV2D_ARGS, args, strict=False)) | kwargs
            x, weight, groups = call["input"], call["weight"], call.get("groups", 1)
            padding = call.get("padding", 0)
            if (
                groups > 1
                and weight.dim() == 4
                and weight.shape[0] == groups
                and weight.shape[1] == 1
                and weight.requires_grad
                and torch.is_grad_enabled()
                and x.device.type == "cpu"
                and x.dtype == weight.dtype == torch.float32
                and x.dim() == 4
                and x.shape[1] == groups
                and not isinstance(padding, str)
                and not torch.is_autocast_enabled("cpu")
                and worth_it((x.shape[2], x.shape[3]), (weight.shape[2], weight.shape[3]))
            ):
                return _DepthwiseConv2d.apply(
                    x,
                    weight,
                    call.get("bias"),
                    _pair(call.get("stride", 1)),
                    _pair(padding),
                    _pair(call.get("dilation", 1)),
                )
        return func(*args, **kwargs)


def for_training(device: torch.device, amp: str, *, enabled: bool) -> contextlib.AbstractContextManager:
    """What a training step's forward pass runs in: :class:`fast_depthwise_grad` where ``enabled``, on the CPU in
    float32 (no autocast); otherwise nothing (a GPU's own kernels are not this slow)."""
    if not enabled or device.type != "cpu" or amp in ("bf16", "fp16"):
        return contextlib.nullcontext()
    return fast_depthwise_grad()
