"""``03_prune`` (artifact ``pruned``): prune a copy of the FP32 model, fine-tune it under the accuracy guard.

Structured channel pruning (torch-pruning: channels physically removed, faster on every CPU) or NNCF magnitude
pruning (zeroed weights, smaller when compressed). Enough is saved to resume without pickles:
``architecture.json`` (the channel plan) + ``pruned.pt``; ``prune.json`` is the record.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.build.stages import train
from tlcompile.build.tuning import Judge, f3, finetune, make_judge, realign, rounded, split_metrics
from tlcompile.checkpoint import load_state, save_state
from tlcompile.compress import guard
from tlcompile.compress.calibration import calibration_set, input_batches
from tlcompile.compress.prune import (
    ChannelPruner,
    adapt_batchnorm,
    build_pruned_model,
    channel_plan,
    compressed_weight_bytes,
    pruned_widths,
    start_magnitude_pruning,
    strip_magnitude_pruning,
    weight_sparsity,
)
from tlcompile.io import atomic_write_json, sha256_file
from tlcompile.models import count_macs, count_params, unfreeze

# prune and quantize read `evaluate` through the operating point locked on val (their guard judges decisions at it).
SECTIONS = (*train.SECTIONS, "evaluate", "prune")
# Images per batch for BatchNorm adaptation: per-batch statistics are averaged, so batches must not be tiny.
BN_BATCH = 32

# prune_step(k) prunes step k and returns its record and how the step's console line describes it.
PruneStep = Callable[[int], tuple[dict[str, Any], str]]


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    """Prune a copy of the FP32 model (structured channels or NNCF magnitude), fine-tune, guard; artifact 'pruned'."""
    cfg, folder, done = ctx.recipe.prune, ctx.stage.folder, ctx.stage.done
    fp32 = next(a for a in artifacts if a.name == "fp32")
    weights, plan_path = folder / "pruned.pt", folder / "architecture.json"
    if done and weights.is_file() and plan_path.is_file():
        state = load_state(weights)
        model = build_pruned_model(json.loads(plan_path.read_text()), state, source=str(plan_path))
        model = model.to(ctx.device).eval()
        record = done["record"]
        ctx.console.print(f"[bold]prune[/]: resumed from {weights}")
    else:
        model, record = (_prune_channels if cfg.method == "channel" else _prune_magnitude)(ctx, fp32)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_state(weights, state)
        atomic_write_json(plan_path, channel_plan(model))
        atomic_write_json(folder / "prune.json", record)
        ctx.stage.record = {"record": record, "checkpoint_sha256": sha256_file(weights)}
    c, g = record["compression"], record["guard"]
    auc = g["checks"][0]["auc"]
    ctx.console.print(
        f"[bold]prune[/]: {cfg.method} {cfg.ratio:g}: params {c['params'][0]:,} -> {c['params'][1]:,}, MACs "
        f"{c['macs'][0] / 1e6:,.1f}M -> {c['macs'][1] / 1e6:,.1f}M"
        + (f", sparsity {c['sparsity']['sparsity']:.1%}" if "sparsity" in c else "")
        + f"; val AUC {f3(auc['value'])} (fp32 {f3(auc['reference'])}); guard "
        + ("[green]met[/]" if g["met"] else f"[red]NOT met[/]: {guard.describe(g['checks'][0])}")
        + (f" ({'; '.join(g['actions'])})" if g["actions"] else "")
    )
    pruned = Artifact(
        name="pruned",
        module=model,
        precision="fp32",
        lineage=f"fp32 <- pruned-{cfg.method}-{cfg.ratio:g}",
        files={"torch": weights},
        metadata={"compression": record["compression"], "guard": record["guard"]},
    )
    return [*artifacts, pruned]


@dataclass
class _Start:
    """What both pruning methods start from: the reference on val, its judge, the calibration images."""

    teacher: torch.nn.Module | None
    reference: dict[str, float]
    judge: Judge
    cal_x: np.ndarray
    cal_y: np.ndarray
    bn_batches: list[torch.Tensor]
    example: torch.Tensor


def _start(ctx: BuildContext, fp32: Artifact) -> _Start:
    cfg, data, size = ctx.recipe.prune, ctx.data, ctx.data.spec.size
    example = torch.zeros(1, 3, size, size, device=ctx.device)
    reference = split_metrics(ctx, fp32.module, "val")
    judge = make_judge(ctx, reference, against="fp32", limits=guard.limits_of(cfg), reference_model=fp32.module)
    cal_x, cal_y = calibration_set(data, cfg.calibration_images, seed=ctx.recipe.seed)
    bn_batches = [xb for xb, _ in input_batches(cal_x, data.spec, batch_size=BN_BATCH, device=ctx.device)]
    return _Start(
        teacher=fp32.module.eval() if cfg.distill else None,
        reference=reference,
        judge=judge,
        cal_x=cal_x,
        cal_y=cal_y,
        bn_batches=bn_batches,
        example=example,
    )


def _prune_in_steps(
    ctx: BuildContext, model: torch.nn.Module, prune_step: PruneStep, start: _Start
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pruning schedule both methods share: ``prune_step(k)`` prunes step k (BatchNorm re-estimated); each step
    is then fine-tuned (BN statistics frozen) and judged. On a failing guard: re-align the operating point (when only
    the decisions moved), then ``recovery_epochs`` more fine-tuning (re-aligned again after it). Returns the step
    records and the guard record."""
    cfg = ctx.recipe.prune
    distill = (cfg.distill_temperature, cfg.distill_alpha)
    judge, reference = start.judge, start.reference

    def tune(epochs: int, label: str, start_epoch: int = 0) -> dict[str, Any]:
        return finetune(
            ctx,
            model,
            epochs=epochs,
            lr=cfg.lr,
            label=label,
            judge=judge,
            teacher=start.teacher,
            distill=distill,
            freeze_bn_stats=True,
            start_epoch=start_epoch,
        )

    steps, check = [], None
    for k in range(1, cfg.steps + 1):
        step, says = prune_step(k)
        step["val_after_pruning"] = rounded(split_metrics(ctx, model, "val"))
        if cfg.finetune_epochs:
            tuned = tune(cfg.finetune_epochs, f"prune: fine-tune {k}/{cfg.steps}")
            step["finetune"] = {"history": tuned["history"], "kept_epoch": tuned["best_epoch"]}
            check = tuned["check"]
        else:
            check = judge(model)
        step["val"] = rounded(split_metrics(ctx, model, "val"))
        steps.append(step)
        ctx.console.print(
            f"[bold]prune[/]: step {k}: {says}, val AUC {f3(step['val_after_pruning']['auc'])} "
            f"after pruning + BN adaptation -> {f3(step['val']['auc'])} after fine-tuning"
        )

    actions: list[str] = []
    check = realign(ctx, cfg, model, reference, judge, check, actions)
    if not check["met"] and cfg.recovery_epochs > 0:
        before = guard.describe(check)
        check = tune(cfg.recovery_epochs, "prune: recovery", start_epoch=cfg.finetune_epochs)["check"]
        actions.append(
            f"guard failed ({before}): fine-tuned {cfg.recovery_epochs} more epochs -> {guard.describe(check)}"
        )
        check = realign(ctx, cfg, model, reference, judge, check, actions)
    if not check["met"]:
        actions.append(
            "still failing: artifact kept and marked as not meeting the guard"
            + ("" if cfg.recovery_epochs else " (prune.recovery_epochs is 0)")
        )
    return steps, guard.summarize([check], actions)


def _distill_record(cfg: Any) -> dict[str, Any] | None:
    return (
        {"teacher": "fp32", "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha} if cfg.distill else None
    )


def _prune_channels(ctx: BuildContext, fp32: Artifact) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg, data, size = ctx.recipe.prune, ctx.data, ctx.data.spec.size
    model = copy.deepcopy(fp32.module).eval()
    unfreeze([model])  # compression fine-tuning trains every layer, whatever transfer learning froze
    start = _start(ctx, fp32)
    before = channel_plan(model)
    params0, macs0 = count_params(model), count_macs(model, size)
    pruner = ChannelPruner(model, cfg, start.example)

    def prune_step(k: int) -> tuple[dict[str, Any], str]:
        with ctx.console.status(f"[bold]prune[/]: step {k}/{cfg.steps} ({cfg.importance} importance)"):
            gradients = (
                input_batches(start.cal_x, data.spec, batch_size=BN_BATCH, device=ctx.device, targets=start.cal_y)
                if cfg.importance == "taylor"
                else None
            )
            pruner.step(gradient_batches=gradients)
            adapt_batchnorm(model, start.bn_batches)
        macs = count_macs(model, size)
        return {"step": k, "params": count_params(model), "macs": macs}, f"MACs {macs / 1e6:,.1f}M"

    steps, record_guard = _prune_in_steps(ctx, model, prune_step, start)
    after = channel_plan(model)
    compression = {
        "method": "channel",
        "library": "torch-pruning",
        "ratio": cfg.ratio,
        "importance": cfg.importance,
        "scope": cfg.scope,
        "steps": steps,
        "params": [params0, count_params(model)],
        "macs": [macs0, count_macs(model, size)],
        "widths": pruned_widths(before, after),
        "kept_whole": ["classifier", *cfg.keep],
        "calibration_images": len(start.cal_x),
        "batchnorm": "re-estimated after each step, frozen while fine-tuning",
        "distill": _distill_record(cfg),
        "val": {"fp32": rounded(start.reference), "pruned": rounded(split_metrics(ctx, model, "val"))},
    }
    return model, {"compression": compression, "guard": record_guard}


def _prune_magnitude(ctx: BuildContext, fp32: Artifact) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg, size = ctx.recipe.prune, ctx.data.spec.size
    base = copy.deepcopy(fp32.module).eval()
    unfreeze([base])
    start = _start(ctx, fp32)
    wrapped, scheduler = start_magnitude_pruning(base, cfg, start.example)

    def prune_step(k: int) -> tuple[dict[str, Any], str]:
        scheduler.step((k - 1) * max(cfg.finetune_epochs, 1))  # the step's sparsity, from the NNCF ratio schedule
        adapt_batchnorm(wrapped, start.bn_batches)
        return {"step": k, "sparsity_target": scheduler.current_ratio}, f"sparsity {scheduler.current_ratio:.0%}"

    steps, record_guard = _prune_in_steps(ctx, wrapped, prune_step, start)
    model = strip_magnitude_pruning(wrapped, fp32.module.arch, fp32.module.num_classes).eval()
    compression = {
        "method": "magnitude",
        "library": "nncf",
        "ratio": cfg.ratio,
        "scope": cfg.scope,
        "steps": steps,
        "params": [count_params(fp32.module), count_params(model)],
        "macs": [count_macs(fp32.module, size), count_macs(model, size)],
        "sparsity": weight_sparsity(model),
        "weights_gzip_bytes": [compressed_weight_bytes(fp32.module), compressed_weight_bytes(model)],
        "latency_note": "zeroed weights keep their dense shape: CPU runtimes run dense kernels, so expect no speed-up; "
        "the gain is the compressed size",
        "calibration_images": len(start.cal_x),
        "batchnorm": "re-estimated after each step, frozen while fine-tuning",
        "distill": _distill_record(cfg),
        "val": {"fp32": rounded(start.reference), "pruned": rounded(split_metrics(ctx, model, "val"))},
    }
    return model, {"compression": compression, "guard": record_guard}


STAGE = Stage(
    name="prune", folder="03_prune", sections=SECTIONS, run=run, wanted=lambda recipe: recipe.prune is not None
)
