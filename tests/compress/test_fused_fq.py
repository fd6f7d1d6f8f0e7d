"""The fused fake quantization (tlcompile/compress/fused_fq.cpp) against NNCF's own CPU functions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nncf")

from tlcompile.compress import fused_fq  # noqa: E402
from tlcompile.compress.quantize import import_nncf  # noqa: E402


@pytest.fixture(scope="module")
def functions():
    import_nncf()
    fused = fused_fq.load()
    if fused is None:
        pytest.skip(f"the fused functions were not built here: {fused_fq.error()}")
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU

    return QuantizedFunctionsCPU, fused_fq.FusedFunctions(QuantizedFunctionsCPU, fused)


def _case(shape, scale_shape, asymmetric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[::7] = 0.0  # exact zeros, as ReLU outputs have
    if asymmetric:
        low = -torch.rand(scale_shape, generator=g) * 2
        rng = torch.rand(scale_shape, generator=g) * 4 + 0.5
        return x, low, rng, 256, 0, 255
    scale = torch.rand(scale_shape, generator=g) * 3 + 0.2
    low = scale * (-128 / 127)
    return x, low, scale - low, 256, -128, 127


CASES = [
    ((32, 16, 14, 14), (1,), "per tensor"),
    ((32, 16, 14, 14), (1, 16, 1, 1), "per channel, activations"),
    ((24, 8, 3, 3), (24, 1, 1, 1), "per channel, conv weights"),
    ((2, 1000), (2, 1), "per channel, classifier"),
    ((7,), (1,), "smaller than a block"),
    ((3, 70000), (1,), "several blocks"),
]


@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize(("shape", "scale_shape", "label"), CASES, ids=[c[2] for c in CASES])
def test_fused_forward_and_input_gradient_are_bit_identical_to_nncfs(functions, shape, scale_shape, label, asymmetric):
    nncf_functions, fused = functions
    x, low, rng, levels, level_low, level_high = _case(shape, scale_shape, asymmetric, seed=len(label))
    assert fused.fused.supported(x, low, rng)
    want = nncf_functions.get("Quantize_forward")(x, low, rng, levels)
    got = fused.get("Quantize_forward")(x, low, rng, levels)
    assert torch.equal(got, want)

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = nncf_functions.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, asymmetric)
    got = fused.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, asymmetric)
    assert torch.equal(got[0], want[0])  # the input gradient
    # NNCF leaves a per-tensor scale's gradient summed over the first dimension only and autograd sums the rest; the
    # fused backward returns it in the scale's own shape. Both sum the same float32 products (|err| <= 1, so each is
    # at most |grad| in size): float32 summation errs by up to ~n * 1e-7 of the sum of magnitudes, the fused one adds
    # in double.
    bound = 1e-6 * float(grad.abs().sum())
    for k in (2, 1) if asymmetric else (2,):
        assert got[k].shape == rng.shape
        torch.testing.assert_close(got[k], want[k].sum_to_size(rng.shape), rtol=0, atol=bound)


@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "asymmetric"])
def test_channels_last_activations_with_one_scale_are_taken_and_keep_their_layout(functions, asymmetric):
    """oneDNN hands some activations to the quantizers in channels-last memory order."""
    nncf_functions, fused = functions
    x, low, rng, levels, level_low, level_high = _case((8, 24, 7, 7), (1,), asymmetric, seed=11)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).contiguous(
        memory_format=torch.channels_last
    )
    assert not x.is_contiguous() and fused.fused.supported(x, low, rng)
    want = nncf_functions.get("Quantize_forward")(x, low, rng, levels)
    got = fused.get("Quantize_forward")(x, low, rng, levels)
    assert torch.equal(got, want) and got.stride() == x.stride()
    want = nncf_functions.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, asymmetric)
    got = fused.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, asymmetric)
    assert torch.equal(got[0], want[0]) and got[0].stride() == x.stride()
    torch.testing.assert_close(got[2], want[2].sum_to_size(rng.shape), rtol=0, atol=1e-6 * float(grad.abs().sum()))


@pytest.mark.parametrize(
    ("shape", "scale_shape", "input_layout", "grad_layout"),
    [
        ((24, 8, 3, 3), (24, 1, 1, 1), torch.contiguous_format, torch.channels_last),  # a conv weight's gradient
        ((8, 24, 4, 4), (1,), torch.channels_last, torch.contiguous_format),  # a pooled activation's gradient
    ],
    ids=["weight, channels-last gradient", "channels-last activation, contiguous gradient"],
)
def test_a_gradient_in_another_layout_is_taken_with_the_same_result(
    functions, shape, scale_shape, input_layout, grad_layout
):
    """In QAT of a channels-last model every conv weight's gradient comes channels-last while the weight is
    contiguous: copied into the weight's layout, it takes the fused pass instead of NNCF's."""
    nncf_functions, fused = functions
    x, low, rng, levels, level_low, level_high = _case(shape, scale_shape, False, seed=12)
    x = x.contiguous(memory_format=input_layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(6)).contiguous(memory_format=grad_layout)
    assert grad.stride() != x.stride()
    want = nncf_functions.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, False)
    calls = []
    original = fused.fused.q_backward
    fused.fused.q_backward = lambda *a: calls.append(a) or original(*a)
    try:
        got = fused.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, False)
    finally:
        del fused.fused.q_backward
    assert len(calls) == 1  # the fused pass, not NNCF's
    assert torch.equal(got[0], want[0]) and got[0].stride() == x.stride()
    torch.testing.assert_close(got[2], want[2].sum_to_size(rng.shape), rtol=0, atol=1e-6 * float(grad.abs().sum()))


def test_tensors_it_does_not_take_go_to_nncfs_functions(functions):
    nncf_functions, fused = functions
    x, low, rng, levels, *_ = _case((4, 6, 5, 5), (1, 6, 1, 1), False, seed=3)
    strided = x[:, :, ::2]  # not dense
    channels_last = x.contiguous(memory_format=torch.channels_last)  # with a scale per channel
    two_dims = torch.ones(4, 6, 1, 1)  # a scale along two dimensions
    for args in (
        (strided, low, rng),
        (channels_last, low, rng),
        (x.double(), low.double(), rng.double()),
        (x, two_dims * low, two_dims * rng),
    ):
        assert not fused.fused.supported(*args)
        assert torch.equal(
            fused.get("Quantize_forward")(*args, levels), nncf_functions.get("Quantize_forward")(*args, levels)
        )


def test_gradients_do_not_depend_on_the_thread_count(functions):
    _, fused = functions
    x, low, rng, levels, level_low, level_high = _case((3, 70000), (1,), False, seed=5)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fused.get("Quantize_backward")(grad, x, low, rng, levels, level_low, level_high, False))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(results[0][::2], results[1][::2], strict=True))


def test_installed_into_nncf_where_it_builds(functions):
    from nncf.torch.quantization import quantize_functions

    assert fused_fq.install()
    assert isinstance(quantize_functions.QuantizedFunctionsCPU, fused_fq.FusedFunctions)
    assert fused_fq.install()  # idempotent: not wrapped twice
    assert not isinstance(quantize_functions.QuantizedFunctionsCPU.nncf_functions, fused_fq.FusedFunctions)


def test_without_a_c_compiler_nncfs_own_functions_stay(functions, tmp_path, monkeypatch):
    """A machine without a C compiler trains with NNCF's functions, and says why the fused ones are not used."""
    from nncf.torch.quantization import quantize_functions

    nncf_functions, _ = functions
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for key, value in {"tried": False, "value": None, "error": None}.items():
        monkeypatch.setattr(fused_fq._LIBRARY, key, value)
    monkeypatch.setattr(quantize_functions, "QuantizedFunctionsCPU", nncf_functions)
    assert fused_fq.load() is None and "no-such-cc" in fused_fq.error()
    assert not fused_fq.install() and quantize_functions.QuantizedFunctionsCPU is nncf_functions
    assert not list((tmp_path / "cache").rglob("*.so*"))  # no half-built library left behind
