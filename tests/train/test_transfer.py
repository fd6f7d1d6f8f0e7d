"""Transfer strategies: frozen weights stay put, two_phase switches at the right epoch, Mean Var Init and
partial:K do what Transfusion describes, and a comparison trains every variant identically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.train.conftest import source_like
from tlcompile.errors import ModelError
from tlcompile.models import get_model
from tlcompile.models.pretrained import SourceWeights
from tlcompile.recipe import FinetuneConfig, TrainConfig, TransferVariant, validate_recipe_dict
from tlcompile.train import loop
from tlcompile.train.transfer import (
    checkpoint_paths,
    epochs_to_target,
    initialise_model,
    plan_phases,
    run_phases,
    run_transfer,
    table_cells,
)

CPU = torch.device("cpu")


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 4, "batch_size": 12, "lr": 0.01, "optimizer": "adamw", "augment": True, **kw})


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _source(arch: str, num_classes: int) -> SourceWeights:
    return SourceWeights(spec="test", kind="file", file=None, state_dict=source_like(arch, num_classes), sha256="-")


# ------------------------------------------------------------------------------------------ phases
@pytest.mark.parametrize("strategy", ["linear_probe", "two_phase"])
def test_frozen_parameters_are_bit_identical_after_training(tiny_data, strategy: str) -> None:
    model, _ = initialise_model("cbr_small", 2, "pretrained", _source("cbr_small", 2), seed=0)
    variant = TransferVariant(name="v", init="pretrained", strategy=strategy, head_epochs=1, unfreeze_last=1)
    phases = plan_phases(variant, _train_cfg(epochs=3), FinetuneConfig(lr=0.01), [n for n, _ in model.blocks()])
    blocks = dict(model.blocks())
    frozen = ["layer1", "layer2", "layer3"] + (["layer4"] if strategy == "linear_probe" else [])
    before = {name: _snapshot(blocks[name]) for name in blocks}
    head_before = _snapshot(model.get_classifier())

    # run_phases leaves the last epoch's weights in the model (the best epoch's come back separately).
    run_phases(model, phases, tiny_data, _train_cfg(epochs=3), seed=0, device=CPU)

    for name in blocks:
        # Weights, BN affine parameters and BN running statistics alike.
        assert _same(before[name], _snapshot(blocks[name])) == (name in frozen), name
    assert not _same(head_before, _snapshot(model.get_classifier()))
    # Afterwards the model is an ordinary, fully trainable one again (pruning / QAT come next).
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())


def test_frozen_bn_statistics_adapt_only_when_the_recipe_says(tiny_data) -> None:
    variant = TransferVariant(name="v", init="pretrained", strategy="linear_probe")
    for freeze_bn_stats in (True, False):
        model, _ = initialise_model("cbr_small", 2, "pretrained", _source("cbr_small", 2), seed=0)
        bn = model.features.layer2.bn
        mean_before, weight_before = bn.running_mean.clone(), bn.weight.detach().clone()
        phases = plan_phases(variant, _train_cfg(epochs=1), FinetuneConfig(), [n for n, _ in model.blocks()])
        run_phases(model, phases, tiny_data, _train_cfg(epochs=1), seed=0, device=CPU, freeze_bn_stats=freeze_bn_stats)
        assert torch.equal(bn.weight, weight_before)  # frozen affine parameters never move
        assert torch.equal(bn.running_mean, mean_before) == freeze_bn_stats


def test_two_phase_switches_parameter_groups_and_optimizer_at_head_epochs(tiny_data) -> None:
    model, _ = initialise_model("cbr_small", 2, "pretrained", _source("cbr_small", 2), seed=0)
    train = _train_cfg(epochs=4, optimizer="adamw", lr=0.01)
    variant = TransferVariant(name="v", init="pretrained", strategy="two_phase", head_epochs=2, unfreeze_last=2)
    phases = plan_phases(
        variant, train, FinetuneConfig(optimizer="sgd", lr=0.003, momentum=0.9), [n for n, _ in model.blocks()]
    )
    assert [(p.name, p.epochs, p.trainable_blocks, p.optimizer, p.lr) for p in phases] == [
        ("head", 2, (), "adamw", 0.01),
        ("finetune", 2, ("layer3", "layer4"), "sgd", 0.003),
    ]

    blocks = dict(model.blocks())
    snapshots = [{name: _snapshot(m) for name, m in [*blocks.items(), ("fc", model.fc)]}]
    records = []

    def on_epoch(record: dict) -> None:
        records.append(dict(record))
        snapshots.append({name: _snapshot(m) for name, m in [*blocks.items(), ("fc", model.fc)]})

    _, _, phase_records = run_phases(model, phases, tiny_data, train, seed=0, device=CPU, on_epoch=on_epoch)

    assert [r["phase"] for r in records] == ["head", "head", "finetune", "finetune"]
    assert [r["optimizer"] for r in records] == ["adamw", "adamw", "sgd", "sgd"]  # the optimizer object's own class
    assert all(r["lr"] <= 0.01 for r in records[:2]) and all(r["lr"] <= 0.003 for r in records[2:])
    head_only = sum(p.numel() for p in model.fc.parameters())
    unfrozen = head_only + sum(p.numel() for name in ("layer3", "layer4") for p in blocks[name].parameters())
    assert [r["trainable_params"] for r in records] == [head_only, head_only, unfrozen, unfrozen]
    assert [(p["first_epoch"], p["last_epoch"]) for p in phase_records] == [(1, 2), (3, 4)]
    # What actually moved in each epoch: the head only, then layer3 + layer4 + head; layer1-2 never.
    for epoch in range(1, 5):
        moved = {name for name in snapshots[0] if not _same(snapshots[epoch - 1][name], snapshots[epoch][name])}
        assert moved == ({"fc"} if epoch <= 2 else {"layer3", "layer4", "fc"}), (epoch, moved)


def test_plan_phases_checks_unfreeze_last_against_the_blocks() -> None:
    variant = TransferVariant(name="v", init="pretrained", strategy="two_phase", head_epochs=1, unfreeze_last=5)
    with pytest.raises(
        ModelError, match=r"unfreeze_last 5 but the model has 4 blocks \(layer1, layer2, layer3, layer4\)"
    ):
        plan_phases(variant, _train_cfg(epochs=3), FinetuneConfig(), ["layer1", "layer2", "layer3", "layer4"])
    full = plan_phases(
        TransferVariant(init="random", strategy="scratch"), _train_cfg(epochs=3), FinetuneConfig(), ["a", "b"]
    )
    assert [(p.name, p.epochs, p.trainable_blocks) for p in full] == [("full", 3, ("a", "b"))]


# -------------------------------------------------------------------------------------------- inits
def _moments(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().double()
    return t.mean().item(), t.std().item()


def test_mean_var_matches_each_source_layers_mean_and_std_but_not_its_values() -> None:
    source = _source("cbr_small", 5)
    model, record = initialise_model("cbr_small", 5, "mean_var", source, seed=0)
    assert record["source"]["classifier_loaded"] and record["redrawn_blocks"] == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    state = model.state_dict()
    layers = [k for k in state if k.endswith("weight") and state[k].dim() > 1]
    assert layers == [f"features.layer{i}.conv.weight" for i in range(1, 5)] + ["fc.weight"]
    held_to_one_percent = []
    for key in layers:
        (m0, s0), (m1, s1) = _moments(source.state_dict[key]), _moments(state[key])
        # An i.i.d. draw of n values misses the mean by ~s0/sqrt(n) and the std by ~s0/sqrt(2n) (one standard
        # error). Within 1% of the layer's std is what every layer with n >= 90k weights must meet (>= 3 SE);
        # smaller layers (layer1: 4,704 weights, where 1% is ~1 SE) are held to 3 SE instead of to luck.
        n = state[key].numel()
        assert abs(m1 - m0) <= max(0.01, 3 / math.sqrt(n)) * s0, (key, n, m0, m1)
        assert abs(s1 / s0 - 1) <= max(0.01, 3 / math.sqrt(2 * n)), (key, n, s0, s1)
        if n >= 90_000:
            held_to_one_percent.append(key)
        # Different elementwise, and no trace of the source's structure left.
        assert (state[key] == source.state_dict[key]).float().mean() < 1e-3, key
        corr = np.corrcoef(state[key].flatten().numpy(), source.state_dict[key].flatten().numpy())[0, 1]
        assert abs(corr) < 0.05, (key, corr)
    assert held_to_one_percent == [
        "features.layer2.conv.weight",
        "features.layer3.conv.weight",
        "features.layer4.conv.weight",
    ]
    for key in state:  # BatchNorm parameters and running statistics are the source's
        if ".bn." in key:
            assert torch.equal(state[key], source.state_dict[key]), key


@pytest.mark.parametrize(("arch", "k"), [("cbr_small", 2), ("mobilenet_v3_small", 3)])
def test_partial_keeps_exactly_the_first_k_blocks_and_reinitialises_the_rest(arch: str, k: int) -> None:
    source = _source(arch, 5)
    reference = get_model(arch, num_classes=5)
    reference.load_state_dict(source.state_dict)
    model, record = initialise_model(arch, 2, f"partial:{k}", source, seed=0)
    names = [n for n, _ in model.blocks()]
    assert record["kept_blocks"] == names[:k] and record["reinitialised_blocks"] == names[k:]
    for (name, block), (_, ref_block) in zip(model.blocks(), reference.blocks(), strict=True):
        if name in names[:k]:
            assert _same(_snapshot(block), _snapshot(ref_block)), name
            continue
        redrawn = 0
        for ours, theirs in zip(block.modules(), ref_block.modules(), strict=True):
            if isinstance(ours, nn.modules.batchnorm._BatchNorm):  # reset as a fresh model's
                assert torch.all(ours.weight == 1) and torch.all(ours.bias == 0), name
                assert (
                    torch.all(ours.running_mean == 0)
                    and torch.all(ours.running_var == 1)
                    and int(ours.num_batches_tracked) == 0
                )
            elif isinstance(ours, (nn.Conv2d, nn.Linear)):  # every conv / linear weight re-drawn
                assert (ours.weight == theirs.weight).float().mean() < 1e-3, name
                redrawn += 1
        assert redrawn >= 1, name
    # The classifier is always fresh for partial reuse: the source's 5-class head does not even fit.
    assert model.get_classifier().out_features == 2
    with pytest.raises(ModelError, match=r"partial:1 \.\. partial:4"):
        initialise_model("cbr_small", 2, "partial:5", _source("cbr_small", 2), seed=0)


def test_partial_classifier_is_fresh_even_when_it_would_fit() -> None:
    source = _source("cbr_small", 2)
    model, _ = initialise_model("cbr_small", 2, "partial:4", source, seed=0)
    assert _same(
        _snapshot(model.features),
        {k[len("features.") :]: v for k, v in source.state_dict.items() if k.startswith("features.")},
    )
    assert not torch.equal(model.fc.weight, source.state_dict["fc.weight"])


def test_same_seed_same_init() -> None:
    source = _source("cbr_small", 2)
    for init in ("random", "pretrained", "mean_var", "partial:2"):
        a, _ = initialise_model("cbr_small", 2, init, source, seed=3)
        b, _ = initialise_model("cbr_small", 2, init, source, seed=3)
        c, _ = initialise_model("cbr_small", 2, init, source, seed=4)
        assert _same(_snapshot(a), _snapshot(b)), init
        assert _same(_snapshot(a), _snapshot(c)) == (init == "pretrained"), init


# ------------------------------------------------------------------------------------------ compare
def test_epochs_to_target() -> None:
    history = [
        {"epoch": 1, "val_auc": 0.6},
        {"epoch": 2, "val_auc": float("nan")},
        {"epoch": 3, "val_auc": 0.81},
        {"epoch": 4, "val_auc": 0.9},
    ]
    assert epochs_to_target(history, 0.8) == 3
    assert epochs_to_target(history, 0.95) is None
    assert epochs_to_target(history, None) is None


def _recipe(tmp_path, transfer: dict | None, *, epochs: int = 2, pretrained: str = "none"):
    raw = {
        "name": "t",
        "seed": 0,
        "data": {"source": "synthetic", "num_images": 48, "image_size": 32, "split": {"val": 0.25, "test": 0.25}},
        "model": {"arch": "cbr_small", "pretrained": pretrained},
        "train": {"epochs": epochs, "batch_size": 12, "lr": 0.01},
    }
    if transfer is not None:
        raw["transfer"] = transfer
    return validate_recipe_dict(raw)


def test_without_a_transfer_section_training_is_plain_scratch_training(tiny_data, tmp_path) -> None:
    recipe = _recipe(tmp_path, None, epochs=2)
    outcome = run_transfer(recipe, tiny_data, device=CPU)
    assert outcome.table is None and outcome.training["variant"] == "random/scratch"

    # The same thing written out with loop.fit, as the train stage did before transfer learning existed.
    torch.manual_seed(0)
    model = get_model("cbr_small", num_classes=2)
    tc = recipe.train
    optimizer = loop.make_optimizer(
        model.parameters(), name=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay, momentum=tc.momentum
    )
    x_tr, y_tr = tiny_data.subset("train")
    scheduler = loop.make_scheduler(optimizer, tc, tc.epochs, -(-len(x_tr) // tc.batch_size))
    settings = loop.FitSettings(
        epochs=tc.epochs,
        batch_size=tc.batch_size,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=nn.CrossEntropyLoss(),
        seed=0,
        device=CPU,
        augment_batches=tc.augment,
        precise_bn=tc.precise_bn,
    )
    result, best_state = loop.fit(model, (x_tr, y_tr), tiny_data.subset("val"), tiny_data.spec, settings)
    assert [r["loss"] for r in outcome.training["history"]] == [r["loss"] for r in result.history]
    assert _same(outcome.model.state_dict(), best_state)


def test_precise_batchnorm_sets_the_exact_statistics_and_leaves_frozen_layers_alone(tiny_data) -> None:
    torch.manual_seed(0)
    model = get_model("cbr_small", num_classes=2)
    x_tr, _ = tiny_data.subset("train")
    frozen = model.features.layer1.bn
    before = (frozen.running_mean.clone(), frozen.running_var.clone())

    def freeze_layer1(m: nn.Module) -> None:  # as two_phase does: a frozen block keeps its BatchNorm in eval mode
        m.train()
        m.features.layer1.eval()

    assert (
        loop.precise_batchnorm(
            model, x_tr, tiny_data.spec, device=CPU, batch_size=len(x_tr), set_train_mode=freeze_layer1
        )
        == 3
    )
    assert torch.equal(frozen.running_mean, before[0]) and torch.equal(frozen.running_var, before[1])
    # layer2's statistics are now exactly those of its input over the images (one batch: mean and unbiased variance).
    inputs = torch.cat(
        [
            xb
            for xb, _ in loop.iterate_batches(
                x_tr, np.zeros(len(x_tr), dtype=np.int64), tiny_data.spec, batch_size=len(x_tr), device=CPU
            )
        ]
    )
    with torch.no_grad():
        feature = model.features.layer2.conv(model.features.layer1(inputs))
    bn = model.features.layer2.bn
    torch.testing.assert_close(bn.running_mean, feature.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, feature.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # the momentum is restored and the model left in eval mode


def test_compare_trains_variants_identically_and_selects_on_val(tiny_data, tmp_path) -> None:
    weights = tmp_path / "source.pt"
    torch.save(source_like("cbr_small", 5), weights)
    transfer = {
        "init": "random",
        "strategy": "scratch",
        "head_epochs": 1,
        "repeats": 2,
        "compare": [
            {"name": "scratch again", "init": "random", "strategy": "scratch"},
            {"init": "pretrained", "strategy": "two_phase"},
        ],
    }
    recipe = _recipe(tmp_path, transfer, epochs=2, pretrained=str(weights))
    seen: list[str] = []
    outcome = run_transfer(recipe, tiny_data, device=CPU, on_epoch=lambda label, rec: seen.append(label))

    table = outcome.table
    assert [r["variant"] for r in table["rows"]] == ["random/scratch", "scratch again", "pretrained/two_phase"]
    assert seen.count("pretrained/two_phase seed 1") == 2 and len(seen) == 3 * 2 * 2
    rows = {r["variant"]: r for r in table["rows"]}
    # The same variant under two names is trained identically: same seeds, same data, same batches, same numbers.
    for a, b in zip(rows["random/scratch"]["runs"], rows["scratch again"]["runs"], strict=True):
        assert (a["seed"], a["val_auc"], a["test_auc"], a["best_epoch"]) == (
            b["seed"],
            b["val_auc"],
            b["test_auc"],
            b["best_epoch"],
        )
    assert [r["seed"] for r in rows["pretrained/two_phase"]["runs"]] == [0, 1]
    # Mean and sd over the seeds are what the runs say.
    for row in table["rows"]:
        vals = [r["val_auc"] for r in row["runs"]]
        assert row["val_auc"] == pytest.approx(np.mean(vals), abs=1e-4)
        assert row["val_auc_sd"] == pytest.approx(np.std(vals, ddof=1), abs=1e-4)
        assert set(table["columns"]) <= set(row)
    # The best mean val AUC goes on (the first of equals); test AUC plays no part.
    means = [r["val_auc"] for r in table["rows"]]
    winner = table["rows"][int(np.argmax(means))]
    assert table["selected"] == winner["variant"] == outcome.training["variant"] and winner["selected"]
    best_run = max(winner["runs"], key=lambda r: r["val_auc"])
    assert outcome.training["seed"] == best_run["seed"] and math.isclose(
        outcome.training["best_val_auc"], best_run["val_auc"], abs_tol=1e-4
    )
    assert table["source"]["file"] == str(weights) and table["source"]["tensors"] == len(source_like("cbr_small", 5))
    assert table["target_val_auc"] == pytest.approx(
        0.95 * max(r["val_auc"] for row in table["rows"] for r in row["runs"]), abs=1e-4
    )
    # The selected model is the selected run's best epoch: its val AUC reproduces.
    x_val, y_val = tiny_data.subset("val")
    auc = loop.validation_auc(loop.predict(outcome.model, x_val, tiny_data.spec), y_val)
    assert auc == pytest.approx(outcome.training["best_val_auc"], abs=1e-6)
    header, cells = table_cells(table)
    assert header[:3] == ["variant", "init", "strategy"] and len(cells) == 3
    assert sum(c[0].endswith(" *") for c in cells) == 1 and "±" in cells[0][3]


class _Killed(Exception):
    pass


def test_a_killed_comparison_resumes_every_run_where_it_stopped(tiny_data, tmp_path) -> None:
    weights = tmp_path / "source.pt"
    torch.save(source_like("cbr_small", 2), weights)
    transfer = {
        "init": "pretrained",
        "strategy": "two_phase",
        "head_epochs": 1,
        "compare": [{"init": "random", "strategy": "scratch"}],
    }
    recipe = _recipe(tmp_path, transfer, epochs=3, pretrained=str(weights))
    reference = run_transfer(recipe, tiny_data, device=CPU)

    def kill(label: str, record: dict) -> None:
        if label == "pretrained/two_phase" and record["epoch"] == 2:  # first epoch of the fine-tuning phase
            raise _Killed

    folder = tmp_path / "02_train"
    with pytest.raises(_Killed):
        run_transfer(recipe, tiny_data, device=CPU, checkpoint_dir=folder, on_epoch=kill)
    paths = checkpoint_paths(recipe, folder)
    assert paths[("pretrained/two_phase", 0)].is_file() and not paths[("random/scratch", 0)].exists()

    epochs_run: list[tuple[str, int]] = []
    resumed = run_transfer(
        recipe,
        tiny_data,
        device=CPU,
        checkpoint_dir=folder,
        on_epoch=lambda label, rec: epochs_run.append((label, rec["epoch"])),
    )
    # The kill came before epoch 2 was checkpointed: the head phase (epoch 1) is not run again, the fine-tuning
    # phase starts from its weights, and the result is the uninterrupted one, bit for bit.
    assert epochs_run == [
        ("pretrained/two_phase", 2),
        ("pretrained/two_phase", 3),
        ("random/scratch", 1),
        ("random/scratch", 2),
        ("random/scratch", 3),
    ]
    assert _same(resumed.model.state_dict(), reference.model.state_dict())
    strip = ("wall_s", "wall_s_sd", "runs")
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed.table["rows"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in reference.table["rows"]
    ]
    assert [h["phase"] for h in resumed.training["history"]] == [h["phase"] for h in reference.training["history"]]
