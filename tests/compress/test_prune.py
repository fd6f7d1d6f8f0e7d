"""Structured channel pruning (torch-pruning), the JSON channel plan, BatchNorm adaptation, NNCF magnitude pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.compress.conftest import settled
from tlcompile.compress.calibration import calibration_indices, input_batches
from tlcompile.compress.prune import (
    ChannelPruner,
    adapt_batchnorm,
    apply_channel_plan,
    build_pruned_model,
    channel_plan,
    compressed_weight_bytes,
    magnitude_schedule,
    pruned_widths,
    resolve_layers,
    start_magnitude_pruning,
    strip_magnitude_pruning,
    weight_sparsity,
)
from tlcompile.errors import CompressionError
from tlcompile.models import count_macs, count_params, get_model, list_models
from tlcompile.recipe import PruneConfig

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _prune(model, **cfg):
    pruner = ChannelPruner(model, PruneConfig(**cfg), torch.zeros(1, 3, 32, 32))
    for _ in range(pruner.cfg.steps):
        pruner.step()
    return model


@pytest.mark.parametrize("arch", ["cbr_small", "mobilenet_v3_small"])  # plain convs; depthwise + squeeze-excitation
def test_channels_are_physically_removed_and_the_plan_rebuilds_the_model(arch):
    torch.manual_seed(0)
    model = get_model(arch, num_classes=2).eval()
    before = channel_plan(model)
    params, macs = count_params(model), count_macs(model, 32)
    _prune(model, ratio=0.5, steps=2, round_to=None)
    after = channel_plan(model)
    # Halving in and out channels leaves about a quarter of the weights and MACs (biases/BN/head keep a little more).
    assert 0.2 < count_params(model) / params < 0.35
    assert 0.2 < count_macs(model, 32) / macs < 0.35
    widths = pruned_widths(before, after)
    assert widths and all(new < old for old, new in widths.values())
    assert model.get_classifier().out_features == 2  # the classes are never pruned
    # architecture.json + state_dict -> the same function, exactly (no pickled module involved).
    plan = json.loads(json.dumps(after))
    rebuilt = build_pruned_model(plan, model.state_dict()).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), model(X))


def test_iterative_steps_reach_the_ratio_gradually():
    model = get_model("cbr_small", num_classes=2).eval()
    pruner = ChannelPruner(model, PruneConfig(ratio=0.5, steps=2, round_to=None), torch.zeros(1, 3, 32, 32))
    widths = []
    for _ in range(2):
        pruner.step()
        widths.append(model.features.layer2.conv.out_channels)
    assert widths == [48, 32]  # 64 -> 25% removed -> 50% removed


def test_keep_and_layer_ratios_and_round_to():
    model = get_model("cbr_small", num_classes=2).eval()
    _prune(model, ratio=0.5, steps=1, keep=["layer1"], layer_ratios={"features.layer3.conv": 0.25}, round_to=8)
    assert model.features.layer1.conv.out_channels == 32  # kept whole
    assert model.features.layer3.conv.out_channels == 96  # its own ratio: 128 * 0.75
    assert model.features.layer2.conv.out_channels == 32
    assert all(c % 8 == 0 for c in (m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)))


def test_global_scope_prunes_unevenly_within_the_per_layer_cap():
    torch.manual_seed(0)
    model = get_model("cbr_small", num_classes=2).eval()
    with torch.no_grad():  # 200 of layer4's 256 filters become nearly useless: global ranking takes them first
        model.features.layer4.conv.weight[:200].mul_(0.01)
    _prune(model, ratio=0.5, steps=1, scope="global", max_layer_ratio=0.7, round_to=None)
    kept = {n.split(".")[1]: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert kept["layer4"] == 77  # 70% of layer4 went (the cap: ceil(256 * 0.3) stay), not the 200 weak ones + more
    assert kept["layer1"] > 16 and kept["layer2"] > 32  # the others lost less than half
    # Where the cap binds, the network keeps more than (1 - ratio) of its 480 channels, never fewer.
    assert 240 < sum(kept.values()) < 300


def test_taylor_importance_uses_gradients(tiny_data, calibration_inputs):
    x, y = tiny_data.subset("train")
    model = settled("cbr_small", calibration_inputs)
    pruner = ChannelPruner(
        model, PruneConfig(ratio=0.25, steps=1, importance="taylor", round_to=None), torch.zeros(1, 3, 32, 32)
    )
    with pytest.raises(ValueError, match="gradient"):
        pruner.step()
    batches = list(input_batches(x, tiny_data.spec, batch_size=16, device=torch.device("cpu"), targets=y))
    pruner.step(gradient_batches=batches)
    assert model.features.layer2.conv.out_channels == 48
    assert all(p.grad is None for p in model.parameters())  # gradients do not leak into later training


def test_unknown_layer_names_are_refused_with_the_valid_ones():
    model = get_model("cbr_small", num_classes=2)
    with pytest.raises(CompressionError, match=r"prune.keep: 'layer9'.*layer1, layer2, layer3, layer4"):
        resolve_layers(model, ["layer9"], key="prune.keep")


def test_a_plan_from_another_architecture_is_refused():
    plan = channel_plan(get_model("resnet18", num_classes=2))
    with pytest.raises(CompressionError, match="not in model cbr_small"):
        apply_channel_plan(get_model("cbr_small", num_classes=2), plan)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_every_registered_model_can_be_channel_pruned(arch):
    torch.manual_seed(0)
    model = get_model(arch, num_classes=2).eval()
    macs = count_macs(model, 64)
    pruner = ChannelPruner(model, PruneConfig(ratio=0.5, steps=1), torch.zeros(1, 3, 64, 64))
    pruner.step()
    assert count_macs(model, 64) < 0.4 * macs
    rebuilt = build_pruned_model(channel_plan(model), model.state_dict()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_batchnorm_adaptation_gives_the_exact_statistics_of_the_batches():
    torch.manual_seed(0)
    model = get_model("cbr_small", num_classes=2).eval()
    batches = [torch.randn(8, 3, 32, 32) * 2 + 1 for _ in range(3)]
    assert adapt_batchnorm(model, batches) == 4
    conv, bn = model.features.layer1.conv, model.features.layer1.bn
    with torch.no_grad():
        out = conv(torch.cat(batches))
    # Equal batch sizes: the cumulative average of per-batch means is the mean over all images.
    torch.testing.assert_close(bn.running_mean, out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training  # restored


def test_calibration_set_is_stratified_exact_and_seeded():
    targets = np.array([0] * 80 + [1] * 20)
    idx = calibration_indices(targets, 30, seed=0)
    assert len(idx) == 30 and len(set(idx)) == 30
    assert (targets[idx] == 1).sum() == 6  # 20% of 30
    assert np.array_equal(idx, calibration_indices(targets, 30, seed=0))
    assert not np.array_equal(idx, calibration_indices(targets, 30, seed=1))
    assert np.array_equal(calibration_indices(targets, 500, seed=0), np.arange(100))
    rare = np.array([0] * 99 + [1])
    assert (rare[calibration_indices(rare, 10, seed=0)] == 1).sum() == 1  # a rare class keeps one


def test_magnitude_schedule_and_nncf_masks(calibration_inputs):
    cfg = PruneConfig(method="magnitude", ratio=0.6, steps=3, finetune_epochs=2)
    assert magnitude_schedule(cfg) == {0: 0.2, 2: 0.4, 4: 0.6}
    base = settled("cbr_small", calibration_inputs)
    dense_bytes = compressed_weight_bytes(base)
    wrapped, scheduler = start_magnitude_pruning(base, cfg, torch.zeros(1, 3, 32, 32))
    scheduler.step(4)
    assert scheduler.current_ratio == pytest.approx(0.6)
    model = strip_magnitude_pruning(wrapped, "cbr_small", 2)
    stats = weight_sparsity(model)
    for name, ratio in stats["per_layer"].items():
        if name == "fc":
            assert ratio == 0.0  # the classifier stays dense
        else:
            assert ratio == pytest.approx(0.6, abs=0.01)
    assert type(model).__name__ == "CBRNet" and not hasattr(model, "__nncf_hooks")
    assert compressed_weight_bytes(model) < 0.8 * dense_bytes  # zeros compress; the dense shape does not shrink
    assert count_params(model) == count_params(base)
