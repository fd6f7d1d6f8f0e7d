"""Freezing, BatchNorm-statistics freezing, re-initialisation and Transfusion mean-var init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tlcompile.models import (
    freeze,
    get_model,
    mean_var_init_,
    reinit_,
    set_train_mode,
    trainable_parameter_names,
    unfreeze,
)


def _train_step(model: nn.Module, size: int = 32) -> None:
    """One AdamW step (with weight decay) on all parameters, as a transfer loop would take it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=generator) * 3 + 1  # far from BN's (0, 1) running stats
    y = torch.tensor([0, 1, 0, 1])
    set_train_mode(model)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_blocks_stay_bit_identical_after_an_optimizer_step() -> None:
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=2)
    blocks = dict(model.blocks())
    freeze([blocks["stem"], blocks["layer1"]])  # the stem is an unregistered container: must still freeze
    frozen = {"stem": _snapshot(nn.ModuleList([model.net.conv1, model.net.bn1])), "layer1": _snapshot(model.net.layer1)}
    trainable_before = _snapshot(model.net.layer4)

    _train_step(model)

    after = {"stem": _snapshot(nn.ModuleList([model.net.conv1, model.net.bn1])), "layer1": _snapshot(model.net.layer1)}
    for block in frozen:
        for key, value in frozen[block].items():  # weights and BN running stats alike
            assert torch.equal(value, after[block][key]), f"{block}.{key} changed"
    assert not torch.equal(trainable_before["0.conv1.weight"], model.net.layer4[0].conv1.weight)
    assert not torch.equal(trainable_before["0.bn1.running_mean"], model.net.layer4[0].bn1.running_mean)

    names = trainable_parameter_names(model)
    assert names[0] == "net.layer2.0.conv1.weight" and names[-1] == "net.fc.bias"
    assert not any(n.startswith(("net.conv1", "net.bn1", "net.layer1")) for n in names)
    assert len(names) == sum(1 for _, p in model.named_parameters() if p.requires_grad)


def test_frozen_bn_stays_in_eval_after_train() -> None:
    model = get_model("cbr_small", num_classes=2)
    blocks = dict(model.blocks())
    freeze(blocks["layer1"])  # a single module is accepted
    for switch in (lambda: set_train_mode(model), lambda: model.train(), lambda: set_train_mode(nn.Sequential(model))):
        model.eval()
        switch()
        assert model.training
        assert not model.features.layer1.bn.training
        assert model.features.layer2.bn.training
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


def test_freeze_without_bn_stats_keeps_updating_running_stats() -> None:
    model = get_model("cbr_small", num_classes=2)
    layer1 = model.features.layer1
    freeze([layer1], freeze_bn_stats=False)
    before = _snapshot(layer1)
    _train_step(model)
    assert layer1.bn.training
    assert torch.equal(before["bn.weight"], layer1.bn.weight) and torch.equal(before["conv.weight"], layer1.conv.weight)
    assert not torch.equal(before["bn.running_mean"], layer1.bn.running_mean)


def test_unfreeze_restores_training() -> None:
    model = get_model("cbr_small", num_classes=2)
    layer1 = model.features.layer1
    freeze([layer1])
    unfreeze([layer1])
    assert all(p.requires_grad for p in model.parameters())
    set_train_mode(model)
    assert layer1.bn.training
    before = _snapshot(layer1)
    _train_step(model)
    assert not torch.equal(before["conv.weight"], layer1.conv.weight)
    assert not torch.equal(before["bn.running_mean"], layer1.bn.running_mean)


def test_freeze_rejects_block_pairs_with_a_hint() -> None:
    model = get_model("cbr_small", num_classes=2)
    with pytest.raises(TypeError, match=r"pass \[m for _, m in model.blocks\(\)\]"):
        freeze(model.blocks())


def _mean_std(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().double()
    return t.mean().item(), t.std().item()


def test_mean_var_init_keeps_each_tensors_mean_and_std() -> None:
    torch.manual_seed(0)
    # Stand-ins for pretrained tensors with a clear non-zero mean and their own scale.
    linear = nn.Linear(1000, 300)
    conv = nn.Conv2d(64, 96, 5)  # 153,600 weights
    bn = nn.BatchNorm2d(96)
    with torch.no_grad():
        linear.weight.uniform_(0.2, 0.6)
        linear.bias.uniform_(-1.0, 3.0)
        conv.weight.normal_(-0.05, 0.02)
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.uniform_(-1, 1)
    model = nn.Sequential(conv, bn, nn.Flatten(), linear)
    before = _snapshot(model)

    mean_var_init_(model, generator=torch.Generator().manual_seed(0))

    for key in ("0.weight", "3.weight"):  # the big tensors
        (mean0, std0), (mean1, std1) = _mean_std(before[key]), _mean_std(model.state_dict()[key])
        assert abs(mean1 - mean0) < 0.01 * abs(mean0), key
        assert std1 == pytest.approx(std0, rel=0.01), key
        assert (before[key] == model.state_dict()[key]).float().mean() < 1e-3, key  # redrawn, not kept
    # The bias (300 values) is redrawn too, from its own mean and std (loose check: few samples).
    (mean0, std0), (mean1, std1) = _mean_std(before["3.bias"]), _mean_std(linear.bias)
    assert not torch.equal(before["3.bias"], linear.bias)
    assert abs(mean1 - mean0) < 0.3 * std0 and std1 == pytest.approx(std0, rel=0.2)
    assert conv.bias is not None and not torch.equal(before["0.bias"], conv.bias)
    # BatchNorm parameters and statistics are kept.
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(before[key], model.state_dict()[key]), key

    # The same generator seed gives the same draw.
    again = nn.Sequential(nn.Conv2d(64, 96, 5), nn.BatchNorm2d(96), nn.Flatten(), nn.Linear(1000, 300))
    again.load_state_dict(before)
    mean_var_init_(again, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0].weight, conv.weight) and torch.equal(again[3].weight, linear.weight)


def test_reinit_changes_weights_and_resets_bn() -> None:
    torch.manual_seed(0)
    model = get_model("cbr_small", num_classes=2)
    _train_step(model)  # BN running stats and weights move away from a fresh init
    layer4 = model.features.layer4
    with torch.no_grad():
        layer4.bn.weight.fill_(3.0)
    before = _snapshot(model)
    assert int(before["features.layer4.bn.num_batches_tracked"]) == 1

    reinit_(layer4, generator=torch.Generator().manual_seed(1))

    conv = layer4.conv.weight
    assert not torch.equal(before["features.layer4.conv.weight"], conv)
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]  # Kaiming normal, fan_out, ReLU gain
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert torch.equal(layer4.bn.weight, torch.ones(256)) and torch.equal(layer4.bn.bias, torch.zeros(256))
    assert torch.equal(layer4.bn.running_mean, torch.zeros(256)) and torch.equal(layer4.bn.running_var, torch.ones(256))
    assert int(layer4.bn.num_batches_tracked) == 0
    # Only the re-initialised block changed.
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("features.layer4.") for k in changed)


def test_reinit_linear_uses_pytorch_default_init() -> None:
    linear = nn.Linear(400, 50)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.fill_(5.0)
    reinit_(linear, generator=torch.Generator().manual_seed(0))
    bound = 1.0 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert linear.weight.abs().max() <= bound and linear.weight.std().item() == pytest.approx(
        bound / math.sqrt(3), rel=0.05
    )
    assert linear.bias.abs().max() <= bound
    first = linear.weight.detach().clone()
    reinit_(linear, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, linear.weight)
