"""The depthwise weight gradient of tlcompile.train.depthwise: the same gradient as autograd's in float64, for every
geometry it takes, and the training step's forward pass unchanged where it is switched on."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tlcompile.train import loop
from tlcompile.train.depthwise import depthwise_weight_grad, fast_depthwise_grad, for_training, worth_it


def backward_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``tensor`` was computed through."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def reference_grads(x, weight, bias, grad_out, stride, padding, dilation):
    """(d/dx, d/dweight, d/dbias) of F.conv2d by autograd in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    out = F.conv2d(x64, w64, b64, stride, padding, dilation, weight.shape[0])
    out.backward(grad_out.double())
    return x64.grad, w64.grad, None if b64 is None else b64.grad


# (channels, input (H, W), kernel (kh, kw), stride, padding, dilation): odd and even sizes, non-square maps and
# filters, no padding, dilation, a filter larger than the map, and maps larger than the mode routes here (the
# function is exact on any).
GEOMETRIES = [
    (24, (4, 4), (5, 5), (1, 1), (2, 2), (1, 1)),
    (16, (7, 7), (5, 5), (2, 2), (2, 2), (1, 1)),
    (8, (7, 5), (5, 3), (1, 2), (2, 1), (1, 1)),
    (8, (9, 9), (7, 7), (1, 1), (3, 3), (1, 1)),
    (8, (6, 6), (5, 5), (1, 1), (0, 0), (1, 1)),
    (8, (8, 8), (5, 5), (1, 1), (4, 4), (2, 2)),
    (8, (3, 3), (5, 5), (1, 1), (2, 2), (1, 1)),
    (8, (28, 28), (5, 5), (1, 1), (2, 2), (1, 1)),
    (8, (30, 24), (5, 5), (2, 2), (2, 2), (1, 1)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"c{g[0]}-{g[1][0]}x{g[1][1]}-k{g[2][0]}x{g[2][1]}")
def test_weight_grad_matches_float64_autograd(geometry, channels_last):
    channels, (h, w), kernel, stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(h * 31 + w)
    x = torch.randn(5, channels, h, w, generator=g)
    weight = torch.randn(channels, 1, *kernel, generator=g)
    out_shape = F.conv2d(x, weight, None, stride, padding, dilation, channels).shape
    grad_out = torch.randn(out_shape, generator=g)
    _, expected, _ = reference_grads(x, weight, None, grad_out, stride, padding, dilation)
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    got = depthwise_weight_grad(x, weight, grad_out, stride, padding, dilation)
    assert got.shape == weight.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_worth_it_is_for_larger_filters_on_small_maps():
    assert worth_it((4, 4), (5, 5)) and worth_it((7, 7), (5, 5)) and worth_it((9, 9), (7, 7))
    assert not worth_it((14, 14), (5, 5))  # the product would cost more than it saves
    assert not worth_it((4, 4), (3, 3))  # oneDNN's own 3x3 kernel


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_mode_keeps_forward_and_input_grad_and_gives_the_weight_grad(with_bias, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 12, 7, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(12, 1, 5, 5, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g, requires_grad=True) if with_bias else None
    plain = F.conv2d(x, weight, bias, 1, 2, 1, 12)
    with fast_depthwise_grad():
        routed = F.conv2d(x, weight, bias, stride=1, padding=2, groups=12)
    assert "_DepthwiseConv2dBackward" in backward_nodes(routed)
    assert torch.equal(routed, plain)  # the forward pass is the same call
    grad_out = torch.randn(plain.shape, generator=g)
    expected = reference_grads(x.detach(), weight.detach(), bias, grad_out, (1, 1), (2, 2), (1, 1))
    plain_grads = torch.autograd.grad(plain, [x, weight] + ([bias] if with_bias else []), grad_out)
    routed_grads = torch.autograd.grad(routed, [x, weight] + ([bias] if with_bias else []), grad_out)
    assert torch.equal(routed_grads[0], plain_grads[0])  # the input gradient: oneDNN's, as before
    for got, want in zip(routed_grads[1:], expected[1:], strict=False):
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_mode_leaves_other_convolutions_alone():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 6, 6, generator=g)
    cases = {
        "3x3 depthwise (oneDNN's own kernel)": (x, torch.randn(8, 1, 3, 3, requires_grad=True), {"groups": 8}),
        "dense": (x, torch.randn(4, 8, 5, 5, requires_grad=True), {}),
        "grouped, not depthwise": (x, torch.randn(8, 2, 5, 5, requires_grad=True), {"groups": 4}),
        "channel multiplier 2": (x, torch.randn(16, 1, 5, 5, requires_grad=True), {"groups": 8}),
        "frozen weight": (x, torch.randn(8, 1, 5, 5), {"groups": 8}),
        "a map past worth_it": (torch.randn(2, 8, 14, 14), torch.randn(8, 1, 5, 5, requires_grad=True), {"groups": 8}),
        "float64": (x.double(), torch.randn(8, 1, 5, 5, dtype=torch.float64, requires_grad=True), {"groups": 8}),
        "'same' padding": (x, torch.randn(8, 1, 5, 5, requires_grad=True), {"groups": 8, "padding": "same"}),
    }
    for name, (inp, weight, kwargs) in cases.items():
        with fast_depthwise_grad():
            out = F.conv2d(inp, weight, **kwargs)
        assert "_DepthwiseConv2dBackward" not in backward_nodes(out), name
    weight = torch.randn(8, 1, 5, 5, requires_grad=True)
    with fast_depthwise_grad(), torch.no_grad():
        assert F.conv2d(x, weight, groups=8).grad_fn is None
    with fast_depthwise_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_DepthwiseConv2dBackward" not in backward_nodes(F.conv2d(x, weight, groups=8))


def test_training_step_of_a_quantized_mobilenet_under_nncf():
    """QAT: NNCF's own function mode fake-quantizes the weight first, and the depthwise layers below it take the
    quantized weight; the loss is the same and every parameter's gradient agrees with the plain step's."""
    from tlcompile.compress.quantize import fold_batchnorm, quantize_ptq
    from tlcompile.models import get_model
    from tlcompile.runtime.preprocess import PreprocessSpec

    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", num_classes=2)
    fold_batchnorm(model.eval())
    images = np.random.default_rng(0).integers(0, 256, size=(8, 48, 48, 3), dtype=np.uint8)
    qmodel = quantize_ptq(model, images, PreprocessSpec(size=48), device=torch.device("cpu"))
    qmodel.train()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 1, 0])

    def step(fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        qmodel.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout mask
        if fast:
            with fast_depthwise_grad():
                loss = F.cross_entropy(qmodel(x), y)
            assert "_DepthwiseConv2dBackward" in backward_nodes(loss)
        else:
            loss = F.cross_entropy(qmodel(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in qmodel.parameters() if p.grad is not None]

    plain_loss, plain_grads = step(False)
    fast_loss, fast_grads = step(True)
    assert torch.equal(fast_loss, plain_loss)
    assert len(fast_grads) == len(plain_grads)
    for got, want in zip(fast_grads, plain_grads, strict=True):
        scale = float(want.abs().max()) or 1.0
        assert float((got - want).abs().max()) <= 1e-4 * scale


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(x).mean((2, 3)))


@pytest.mark.parametrize("setting", [None, "0", "1"])
def test_train_one_epoch_takes_the_path_only_when_asked(monkeypatch, setting):
    """The training loop's step takes the depthwise weight gradient from depthwise_weight_grad, and the optimizer its
    fused update, with TLCOMPILE_FAST_TRAINING=1 only."""
    from tlcompile.train import depthwise

    if setting is None:
        monkeypatch.delenv(loop.FAST_TRAINING_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(loop.FAST_TRAINING_VARIABLE, setting)
    calls = []
    original = depthwise.depthwise_weight_grad
    monkeypatch.setattr(depthwise, "depthwise_weight_grad", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = _Tiny()
    optimizer = loop.make_optimizer(model.parameters(), name="adamw", lr=1e-2)
    assert optimizer.defaults["fused"] is (True if setting == "1" else None)
    batches = [(torch.randn(3, 4, 6, 6), torch.tensor([0, 1, 1]))] * 2
    loop.train_one_epoch(model, iter(batches), optimizer, None, torch.nn.functional.cross_entropy)
    assert len(calls) == (2 if setting == "1" else 0)
    nothing = type(contextlib.nullcontext())
    assert isinstance(for_training(torch.device("cpu"), "bf16", enabled=True), nothing)
    assert isinstance(for_training(torch.device("meta"), "none", enabled=True), nothing)
    assert isinstance(for_training(torch.device("cpu"), "none", enabled=False), nothing)


def test_a_bad_value_of_the_variable_is_refused(monkeypatch):
    from tlcompile.errors import TrainError

    monkeypatch.setenv(loop.FAST_TRAINING_VARIABLE, "yes")
    with pytest.raises(
        TrainError, match=r"^environment variable TLCOMPILE_FAST_TRAINING='yes' is not valid; valid: 0 or 1$"
    ):
        loop.fast_training()
