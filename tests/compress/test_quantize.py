"""NNCF INT8: BatchNorm folding, PTQ with per-tensor activations, config + state_dict round trip, FP32 fallback."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.compress.conftest import settled
from tlcompile.compress.quantize import (
    compute_layers,
    fold_batchnorm,
    keep_fp32_scope,
    layer_sensitivity,
    load_quantized,
    quantize_ptq,
    quantizer_hooks,
    quantizer_summary,
    save_quantized,
)
from tlcompile.errors import CompressionError
from tlcompile.models import get_model
from tlcompile.train import loop

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("arch", "norms"), [("cbr_small", 4), ("mobilenet_v3_small", 34), ("resnet18", 20)])
def test_fold_batchnorm_keeps_the_function_and_removes_every_conv_bn_pair(arch, norms, calibration_inputs):
    model = settled(arch, calibration_inputs)
    with torch.no_grad():
        before = model(X)
    folded = fold_batchnorm(model)
    assert len(folded) == norms
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    with torch.no_grad():
        # Exact in real arithmetic; float32 rounding through a random deep net stays a tiny fraction of the logits.
        assert (model(X) - before).abs().max() <= 1e-2 * before.abs().max()


def _ptq(arch, tiny_data, calibration_inputs, images: int = 16, **kwargs):
    model = settled(arch, calibration_inputs)
    fold_batchnorm(model)
    x, _ = tiny_data.subset("train")
    return model, quantize_ptq(model, x[:images], tiny_data.spec, device=torch.device("cpu"), **kwargs)


def test_ptq_round_trips_through_nncf_config_and_state_dict(tmp_path, tiny_data, calibration_inputs):
    base, q = _ptq("cbr_small", tiny_data, calibration_inputs)
    files = save_quantized(q, tmp_path, "int8")
    config = json.loads(files["nncf_config"].read_text())  # plain JSON, nothing pickled
    assert config["compression_state"]
    fresh = get_model("cbr_small", num_classes=2).eval()
    fold_batchnorm(fresh)
    rebuilt = load_quantized(fresh, files["nncf_config"], files["state_dict"], device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(rebuilt(X), q(X))
        assert not torch.equal(q(X), base(X))  # it really is quantized
    summary = quantizer_summary(rebuilt)
    assert summary == {"weight_quantizers": 5, "activation_quantizers": 6, "per_channel_activations": 0}


def test_a_state_dict_from_another_model_is_refused(tmp_path, tiny_data, calibration_inputs):
    _, q = _ptq("cbr_small", tiny_data, calibration_inputs)
    files = save_quantized(q, tmp_path, "int8")
    other = get_model("cbr_tiny", num_classes=2).eval()
    fold_batchnorm(other)
    with pytest.raises(CompressionError, match="cannot rebuild the int8 model"):
        load_quantized(other, files["nncf_config"], files["state_dict"], device=torch.device("cpu"))


def test_activations_are_quantized_per_tensor_even_before_depthwise_convs(tiny_data, calibration_inputs):
    # NNCF's default puts per-channel quantizers before depthwise convs, which ONNX Runtime cannot fuse.
    _, q = _ptq("mobilenet_v3_small", tiny_data, calibration_inputs, images=4)
    summary = quantizer_summary(q)
    assert summary["per_channel_activations"] == 0 and summary["activation_quantizers"] > 20


def test_keep_fp32_leaves_the_named_block_unquantized(tiny_data, calibration_inputs):
    model = settled("cbr_small", calibration_inputs)
    fold_batchnorm(model)
    scope = keep_fp32_scope(model, ["layer1"], ["fc/linear/0"])
    x, _ = tiny_data.subset("train")
    q = quantize_ptq(model, x[:16], tiny_data.spec, device=torch.device("cpu"), ignored_scope=scope)
    names = [name for name, _ in quantizer_hooks(q)]
    assert not any("layer1/conv" in n for n in names)  # no weight quantizer on layer1
    assert not any(n.startswith("pre_hooks.fc/") for n in names)  # the exact node kept too
    assert any("layer2/conv" in n for n in names)
    with pytest.raises(CompressionError, match="quantize.keep_fp32: 'nope'"):
        keep_fp32_scope(model, ["nope"])


def test_layer_sensitivity_ranks_every_quantized_layer_and_restores_the_quantizers(tiny_data, calibration_inputs):
    base, q = _ptq("cbr_small", tiny_data, calibration_inputs)
    x, _ = tiny_data.subset("train")
    spec, cpu = tiny_data.spec, torch.device("cpu")
    layers = compute_layers(q, torch.zeros(1, 3, 32, 32))
    assert set(layers) == {
        "features/layer1/conv/conv2d/0",
        "features/layer2/conv/conv2d/0",
        "features/layer3/conv/conv2d/0",
        "features/layer4/conv/conv2d/0",
        "fc/linear/0",
    }
    # Each layer owns its weight quantizer and the activation quantizer feeding it (through the max-pool).
    assert layers["features/layer2/conv/conv2d/0"] == sorted(
        ["pre_hooks.features/layer2/conv/conv2d/0__1.0", "post_hooks.features/layer1/relu/relu_/0__0.0"]
    )
    assert "post_hooks.x__0.0" in layers["features/layer1/conv/conv2d/0"]  # the network input
    before = loop.predict(q, x, spec, device=cpu)
    ranking = layer_sensitivity(q, loop.predict(base, x, spec, device=cpu), x, spec, device=cpu)
    assert [r["layer"] for r in ranking] and {r["layer"] for r in ranking} == set(layers)
    scores = [r["error_removed"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert all(q_.is_enabled_quantization() for _, q_ in quantizer_hooks(q))
    assert (loop.predict(q, x, spec, device=cpu) == before).all()


def test_a_model_without_batchnorm_folds_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fold_batchnorm(model) == []


def test_calibration_batches_are_equal_sized_and_keep_every_image_in_order(tiny_data):
    from tlcompile.compress.calibration import equal_batches

    x, _ = tiny_data.subset("train")
    images = x[:31]
    batches = equal_batches(images, tiny_data.spec, batch_size=12, device=torch.device("cpu"))
    assert [len(b) for b in batches] == [11, 10, 10]  # ceil(31 / 12) = 3 batches, sizes within one
    whole = next(
        loop.iterate_batches(images, images[:, 0, 0, 0], tiny_data.spec, batch_size=31, device=torch.device("cpu"))
    )[0]
    assert torch.equal(torch.cat(batches), whole)


def test_batched_calibration_gives_the_statistics_of_one_image_per_item(tiny_data, calibration_inputs, monkeypatch):
    """Batches only make statistics collection faster: activation ranges (mean of per-image minima / maxima) and fast
    bias correction's channel means come out as with one image per NNCF item, up to float summation order."""
    from tlcompile.compress import quantize

    _, batched = _ptq("cbr_small", tiny_data, calibration_inputs, images=32)
    monkeypatch.setattr(quantize, "CALIBRATION_BATCH", 1)
    _, single = _ptq("cbr_small", tiny_data, calibration_inputs, images=32)
    a, b = batched.state_dict(), single.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-4, atol=1e-6), name
