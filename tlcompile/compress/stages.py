"""The build's compression stages: ``03_prune`` (artifact ``pruned``) and ``04_quantize`` (``int8``, ``pruned-int8``).

Each stage works on copies (the FP32 model stays the teacher and the reference) and is steered by the accuracy
guard on val (:mod:`tlcompile.compress.guard`): every fine-tuning epoch is judged, and the state kept is the one
that meets the guard with the best AUC (a QAT epoch must beat PTQ, "epoch 0", to be kept). When the guard still
fails the stage acts -- more epochs; for int8, the most sensitive layers kept in FP32 -- and says what it did.
Enough is saved to resume without pickles: ``03_prune/architecture.json`` + ``pruned.pt``;
``04_quantize/<name>.nncf.json`` + ``<name>.pt``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from tlcompile.checkpoint import load_state, save_state
from tlcompile.compress import guard
from tlcompile.compress.calibration import calibration_set, input_batches
from tlcompile.compress.distill import distillation
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
from tlcompile.compress.quantize import (
    fold_batchnorm,
    keep_fp32_scope,
    layer_sensitivity,
    load_quantized,
    quantize_ptq,
    quantizer_summary,
    save_quantized,
)
from tlcompile.evaluate.metrics import referable_classes
from tlcompile.io import atomic_write_json, sha256_file
from tlcompile.models import count_macs, count_params, unfreeze
from tlcompile.pipeline import Artifact, BuildContext, _progress
from tlcompile.train import loop

# Images per batch for BatchNorm adaptation: per-batch statistics are averaged, so batches must not be tiny.
BN_BATCH = 32
# Sensitivity ranking runs the int8 model once per layer: a subset of the calibration images is plenty.
SENSITIVITY_IMAGES = 128

Judge = Callable[[torch.nn.Module], dict[str, Any]]


# ------------------------------------------------------------------------------------------- shared helpers
def _temperature(ctx: BuildContext) -> float:
    return float(ctx.operating_point.get("temperature", 1.0)) if ctx.operating_point else 1.0


def split_metrics(ctx: BuildContext, model: torch.nn.Module, split: str) -> dict[str, float]:
    """AUC, and sensitivity / specificity / accuracy at the locked operating point, of a torch model on a split."""
    x, y = ctx.data.subset(split)
    logits = loop.predict(model, x, ctx.data.spec, device=ctx.device)
    return guard.val_metrics(logits, y, threshold=ctx.threshold, temperature=_temperature(ctx))


def make_judge(ctx: BuildContext, reference: dict[str, float], *, against: str, limits: dict[str, float | None],
               reference_model: torch.nn.Module | None = None) -> Judge:
    """``judge(model)`` -> the guard check of ``model`` on val against ``reference``; with ``reference_model``, the
    check also carries its evidence in cases (eyes newly missed / referred, a CI of the AUC drop: guard.evidence)."""
    x, y = ctx.data.subset("val")
    ref_logits = None if reference_model is None else loop.predict(reference_model, x, ctx.data.spec, device=ctx.device)

    def judge(model: torch.nn.Module) -> dict[str, Any]:
        logits = loop.predict(model, x, ctx.data.spec, device=ctx.device)
        metrics = guard.val_metrics(logits, y, threshold=ctx.threshold, temperature=_temperature(ctx))
        result = guard.check(metrics, reference, against=against, limits=limits)
        if ref_logits is not None:
            result["evidence"] = guard.evidence(ref_logits, logits, y, threshold=ctx.threshold, temperature=_temperature(ctx))
        return result

    return judge


def _rank(check: dict[str, Any]) -> tuple[bool, float, float]:
    """Order of preference: meets the guard, then least beyond its limits, then best val AUC."""
    auc = check["auc"]["value"]
    return check["met"], -guard.excess(check), -math.inf if auc is None else auc


def _f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 6) if math.isfinite(v) else None) for k, v in metrics.items()}


def finetune(
    ctx: BuildContext,
    model: torch.nn.Module,
    *,
    epochs: int,
    lr: float,
    label: str,
    judge: Judge,
    teacher: torch.nn.Module | None = None,
    distill: tuple[float, float] = (1.0, 1.0),
    freeze_bn_stats: bool = False,
    start_epoch: int = 0,
) -> dict[str, Any]:
    """Train every layer of ``model`` for ``epochs`` (cosine from ``lr``) and keep the state the guard prefers.

    The state before training is a candidate too ("epoch" ``start_epoch``): an epoch is kept only when it ranks
    higher under :func:`_rank`. With ``teacher`` the loss distils it, ``distill`` = (temperature, alpha).
    ``freeze_bn_stats`` keeps every BatchNorm on the statistics it has (just re-estimated on the calibration set
    after pruning): weights adapt to fixed statistics instead of noisy 32-image batch statistics (measured on the
    quickstart's 50%-pruned MobileNetV3: val AUC 0.98 after 2 epochs with frozen statistics, 0.95 without).
    Returns ``{"history", "best_epoch", "check"}`` (the kept state's guard check); the model holds that state.
    """
    r, data = ctx.recipe, ctx.data
    tc = r.train
    x_tr, y_tr = data.subset("train")
    # Dropout draws from the global RNG: seed it from (seed, label, start epoch) so the result does not depend on what
    # ran before in this process (an uninterrupted build and one resumed after training give the same pruned model).
    torch.manual_seed(int(np.random.default_rng([r.seed, zlib.crc32(label.encode()), start_epoch]).integers(2**31)))
    optimizer = loop.make_optimizer(model.parameters(), name=tc.optimizer, lr=lr, weight_decay=tc.weight_decay, momentum=tc.momentum)
    steps = loop.steps_per_epoch(len(x_tr), tc.batch_size)
    scheduler = loop.make_scheduler(optimizer, tc.model_copy(update={"schedule": "cosine"}), epochs, steps)
    first = judge(model)
    kept = {"epoch": start_epoch, "check": first, "state": copy.deepcopy(model.state_dict())}
    with contextlib.ExitStack() as stack:
        if teacher is not None:
            loss_fn = stack.enter_context(distillation(model, teacher, temperature=distill[0], alpha=distill[1]))
        else:
            weight = loop.class_weights(y_tr, data.num_classes).to(ctx.device) if data.balance == "weighted_loss" else None
            loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        progress = stack.enter_context(_progress(ctx.console))
        task = progress.add_task(label, total=epochs * steps, info="")

        def on_epoch(rec: dict[str, Any]) -> None:
            check = judge(model)
            rec["guard_met"] = check["met"]
            if _rank(check) > _rank(kept["check"]):
                kept.update(epoch=rec["epoch"], check=check, state=copy.deepcopy(model.state_dict()))
            progress.update(task, info=f"epoch {rec['epoch']} loss {rec['loss']:.3f} val AUC {rec['val_auc']:.3f}"
                            + ("" if check["met"] else " (guard not met)"))

        settings = loop.FitSettings(
            epochs=epochs, batch_size=tc.batch_size, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
            seed=r.seed, device=ctx.device, augment_batches=tc.augment, start_epoch=start_epoch,
            set_train_mode=_train_with_frozen_bn_stats if freeze_bn_stats else None,
            # data.balance as in training; fp32 arithmetic (no train.amp): fake-quantizers and masks want full precision.
            sample_weights=data.sample_weights("train"),
        )
        result, _ = loop.fit(model, (x_tr, y_tr), data.subset("val"), data.spec, settings,
                             loop.FitCallbacks(on_epoch=on_epoch, on_step=lambda _loss: progress.advance(task)))
    model.load_state_dict(kept["state"])
    model.eval()
    return {"history": result.history, "best_epoch": kept["epoch"], "check": kept["check"]}


def _train_with_frozen_bn_stats(model: torch.nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


# ------------------------------------------------------------------------------------------- 03_prune
def stage_prune(ctx: BuildContext, fp32: Artifact) -> Artifact:
    """Prune a copy of the FP32 model (structured channels or NNCF magnitude), fine-tune, guard; artifact 'pruned'."""
    cfg = ctx.recipe.prune
    folder = ctx.stage_dir("03_prune")
    weights, plan_path = folder / "pruned.pt", folder / "architecture.json"
    done = ctx.stage_done("03_prune")
    if done and weights.is_file() and plan_path.is_file():
        state = load_state(weights)
        model = build_pruned_model(json.loads(plan_path.read_text()), state, source=str(plan_path)).to(ctx.device).eval()
        record = done["record"]
        ctx.console.print(f"[bold]prune[/]: resumed from {weights}")
    else:
        model, record = (_prune_channels if cfg.method == "channel" else _prune_magnitude)(ctx, fp32)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_state(weights, state)
        atomic_write_json(plan_path, channel_plan(model))
        atomic_write_json(folder / "prune.json", record)
        ctx.finish_stage("03_prune", {"record": record, "checkpoint_sha256": sha256_file(weights)})
    c, g = record["compression"], record["guard"]
    auc = g["checks"][0]["auc"]
    ctx.console.print(
        f"[bold]prune[/]: {cfg.method} {cfg.ratio:g}: params {c['params'][0]:,} -> {c['params'][1]:,}, MACs "
        f"{c['macs'][0] / 1e6:,.1f}M -> {c['macs'][1] / 1e6:,.1f}M"
        + (f", sparsity {c['sparsity']['sparsity']:.1%}" if "sparsity" in c else "")
        + f"; val AUC {_f3(auc['value'])} (fp32 {_f3(auc['reference'])}); guard "
        + ("[green]met[/]" if g["met"] else f"[red]NOT met[/]: {guard.describe(g['checks'][0])}")
        + (f" ({'; '.join(g['actions'])})" if g["actions"] else "")
    )
    return Artifact(
        name="pruned", module=model, precision="fp32", lineage=f"fp32 <- pruned-{cfg.method}-{cfg.ratio:g}",
        files={"torch": weights}, metadata={"compression": record["compression"], "guard": record["guard"]},
    )


def shift_referable_bias(model: torch.nn.Module, delta: float, *, temperature: float = 1.0) -> None:
    """Add ``delta`` to the referable log-odds of ``model`` (softmax(logits / T)) by shifting the final layer's bias.

    For 2 classes the referable logit, for 5 grades the logits of grades 2-4, move by ``delta * T``: P(referable) /
    P(not) is multiplied by e^delta for every image, so the ranking (AUC) is unchanged and the model file carries it.
    """
    head = model.get_classifier()  # every registry model has one; NNCF's wrapping keeps the model's own methods
    if head.bias is None:
        raise ValueError("the classifier has no bias to shift")
    referable = referable_classes(head.out_features)
    with torch.no_grad():
        head.bias[referable] += delta * temperature


def _realign(ctx: BuildContext, cfg: Any, model: torch.nn.Module, reference: dict[str, float], judge: Judge,
             check: dict[str, Any], actions: list[str]) -> dict[str, Any]:
    """When the guard fails on the referral decisions but not on AUC: re-align the operating point (see
    :func:`guard.realignment_shift`), keep it only if the guard ranks it higher, and say what was done.
    ``cfg`` is the recipe section (prune / quantize) with the limits and the ``realign`` switch."""
    decisions_failed = any(check[m]["max_drop"] is not None and not check[m].get("met", True)
                           for m in ("sensitivity", "specificity", "accuracy"))
    if check["met"] or not cfg.realign or not decisions_failed or not check["auc"].get("met", True):
        return check
    x, y = ctx.data.subset("val")
    logits = loop.predict(model, x, ctx.data.spec, device=ctx.device)
    limits = guard.limits_of(cfg)
    delta = guard.realignment_shift(logits, y, reference, threshold=ctx.threshold, temperature=_temperature(ctx), limits=limits)
    if delta == 0.0:
        return check
    before = guard.describe(check)
    shift_referable_bias(model, delta, temperature=_temperature(ctx))
    after = judge(model)
    if _rank(after) > _rank(check):
        actions.append(f"guard failed on the referral decisions with the AUC within its limit ({before}): the scores had moved "
                       f"against the locked threshold, so the classifier's referable bias was shifted by {delta:+.3f} log-odds "
                       f"(ranking unchanged) -> {guard.describe(after)}")
        return after
    shift_referable_bias(model, -delta, temperature=_temperature(ctx))
    return check


def _prune_in_steps(ctx: BuildContext, model: torch.nn.Module, prune_step: Callable[[int], dict[str, Any]], *,
                    reference: dict[str, float], judge: Judge, teacher: torch.nn.Module | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pruning schedule both methods share: ``prune_step(k)`` prunes step k (BatchNorm re-estimated) and returns
    its record (``_says``: how the step line describes it); each step is then fine-tuned (BN statistics frozen) and
    judged. On a failing guard: re-align the operating point (when only the decisions moved), then
    ``recovery_epochs`` more fine-tuning (re-aligned again after it). Returns the step records and the guard record."""
    cfg = ctx.recipe.prune
    distill = (cfg.distill_temperature, cfg.distill_alpha)

    def tune(epochs: int, label: str, start_epoch: int = 0) -> dict[str, Any]:
        return finetune(ctx, model, epochs=epochs, lr=cfg.lr, label=label, judge=judge, teacher=teacher, distill=distill,
                        freeze_bn_stats=True, start_epoch=start_epoch)

    steps, check = [], None
    for k in range(1, cfg.steps + 1):
        step = prune_step(k)
        says = step.pop("_says")
        step["val_after_pruning"] = _rounded(split_metrics(ctx, model, "val"))
        if cfg.finetune_epochs:
            tuned = tune(cfg.finetune_epochs, f"prune: fine-tune {k}/{cfg.steps}")
            step["finetune"] = {"history": tuned["history"], "kept_epoch": tuned["best_epoch"]}
            check = tuned["check"]
        else:
            check = judge(model)
        step["val"] = _rounded(split_metrics(ctx, model, "val"))
        steps.append(step)
        ctx.console.print(f"[bold]prune[/]: step {k}: {says}, val AUC {_f3(step['val_after_pruning']['auc'])} "
                          f"after pruning + BN adaptation -> {_f3(step['val']['auc'])} after fine-tuning")

    actions: list[str] = []
    check = _realign(ctx, cfg, model, reference, judge, check, actions)
    if not check["met"] and cfg.recovery_epochs > 0:
        before = guard.describe(check)
        check = tune(cfg.recovery_epochs, "prune: recovery", start_epoch=cfg.finetune_epochs)["check"]
        actions.append(f"guard failed ({before}): fine-tuned {cfg.recovery_epochs} more epochs -> {guard.describe(check)}")
        check = _realign(ctx, cfg, model, reference, judge, check, actions)
    if not check["met"]:
        actions.append("still failing: artifact kept and marked as not meeting the guard"
                       + ("" if cfg.recovery_epochs else " (prune.recovery_epochs is 0)"))
    return steps, guard.summarize([check], actions)


def _prune_channels(ctx: BuildContext, fp32: Artifact) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg, data, size = ctx.recipe.prune, ctx.data, ctx.data.spec.size
    teacher = fp32.module.eval() if cfg.distill else None
    model = copy.deepcopy(fp32.module).eval()
    unfreeze([model])  # compression fine-tuning trains every layer, whatever transfer learning froze
    example = torch.zeros(1, 3, size, size, device=ctx.device)
    reference = split_metrics(ctx, fp32.module, "val")
    judge = make_judge(ctx, reference, against="fp32", limits=guard.limits_of(cfg), reference_model=fp32.module)
    cal_x, cal_y = calibration_set(data, cfg.calibration_images, seed=ctx.recipe.seed)
    bn_batches = [xb for xb, _ in input_batches(cal_x, data.spec, batch_size=BN_BATCH, device=ctx.device)]
    before = channel_plan(model)
    params0, macs0 = count_params(model), count_macs(model, size)
    pruner = ChannelPruner(model, cfg, example)

    def prune_step(k: int) -> dict[str, Any]:
        with ctx.console.status(f"[bold]prune[/]: step {k}/{cfg.steps} ({cfg.importance} importance)"):
            gradients = input_batches(cal_x, data.spec, batch_size=BN_BATCH, device=ctx.device, targets=cal_y) if cfg.importance == "taylor" else None
            pruner.step(gradient_batches=gradients)
            adapt_batchnorm(model, bn_batches)
        macs = count_macs(model, size)
        return {"step": k, "params": count_params(model), "macs": macs, "_says": f"MACs {macs / 1e6:,.1f}M"}

    steps, record_guard = _prune_in_steps(ctx, model, prune_step, reference=reference, judge=judge, teacher=teacher)
    after = channel_plan(model)
    compression = {
        "method": "channel", "library": "torch-pruning", "ratio": cfg.ratio, "importance": cfg.importance, "scope": cfg.scope,
        "steps": steps, "params": [params0, count_params(model)], "macs": [macs0, count_macs(model, size)],
        "widths": pruned_widths(before, after), "kept_whole": ["classifier", *cfg.keep],
        "calibration_images": len(cal_x), "batchnorm": "re-estimated after each step, frozen while fine-tuning",
        "distill": {"teacher": "fp32", "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha} if cfg.distill else None,
        "val": {"fp32": _rounded(reference), "pruned": _rounded(split_metrics(ctx, model, "val"))},
    }
    return model, {"compression": compression, "guard": record_guard}


def _prune_magnitude(ctx: BuildContext, fp32: Artifact) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg, data, size = ctx.recipe.prune, ctx.data, ctx.data.spec.size
    teacher = fp32.module.eval() if cfg.distill else None
    base = copy.deepcopy(fp32.module).eval()
    unfreeze([base])
    example = torch.zeros(1, 3, size, size, device=ctx.device)
    reference = split_metrics(ctx, fp32.module, "val")
    judge = make_judge(ctx, reference, against="fp32", limits=guard.limits_of(cfg), reference_model=fp32.module)
    cal_x, _ = calibration_set(data, cfg.calibration_images, seed=ctx.recipe.seed)
    bn_batches = [xb for xb, _ in input_batches(cal_x, data.spec, batch_size=BN_BATCH, device=ctx.device)]
    wrapped, scheduler = start_magnitude_pruning(base, cfg, example)

    def prune_step(k: int) -> dict[str, Any]:
        scheduler.step((k - 1) * max(cfg.finetune_epochs, 1))  # the step's sparsity, from the NNCF ratio schedule
        adapt_batchnorm(wrapped, bn_batches)
        return {"step": k, "sparsity_target": scheduler.current_ratio, "_says": f"sparsity {scheduler.current_ratio:.0%}"}

    steps, record_guard = _prune_in_steps(ctx, wrapped, prune_step, reference=reference, judge=judge, teacher=teacher)
    model = strip_magnitude_pruning(wrapped, fp32.module.arch, fp32.module.num_classes).eval()
    compression = {
        "method": "magnitude", "library": "nncf", "ratio": cfg.ratio, "scope": cfg.scope, "steps": steps,
        "params": [count_params(fp32.module), count_params(model)], "macs": [count_macs(fp32.module, size), count_macs(model, size)],
        "sparsity": weight_sparsity(model), "weights_gzip_bytes": [compressed_weight_bytes(fp32.module), compressed_weight_bytes(model)],
        "latency_note": "zeroed weights keep their dense shape: CPU runtimes run dense kernels, so expect no speed-up; "
                        "the gain is the compressed size",
        "calibration_images": len(cal_x), "batchnorm": "re-estimated after each step, frozen while fine-tuning",
        "distill": {"teacher": "fp32", "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha} if cfg.distill else None,
        "val": {"fp32": _rounded(reference), "pruned": _rounded(split_metrics(ctx, model, "val"))},
    }
    return model, {"compression": compression, "guard": record_guard}


# ------------------------------------------------------------------------------------------- 04_quantize
def stage_quantize(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    """INT8 of every FP32 artifact: 'fp32' -> 'int8', 'pruned' -> 'pruned-int8' (PTQ, then QAT; guarded)."""
    cfg = ctx.recipe.quantize
    folder = ctx.stage_dir("04_quantize")
    done = ctx.stage_done("04_quantize")
    fp32 = next(a for a in artifacts if a.name == "fp32")
    records: dict[str, Any] = dict(done["artifacts"]) if done else {}
    out = []
    for src in [a for a in artifacts if a.precision == "fp32"]:
        name = "int8" if src.name == "fp32" else f"{src.name}-int8"
        weights, config = folder / f"{name}.pt", folder / f"{name}.nncf.json"
        if done and name in records and weights.is_file() and config.is_file():
            base = copy.deepcopy(src.module).eval()
            fold_batchnorm(base)  # the architecture it was quantized from
            model = load_quantized(base, config, weights, device=ctx.device)
            record = records[name]
            ctx.console.print(f"[bold]quantize[/]: {name} resumed from {config.name} + {weights.name}")
        else:
            model, record = _quantize(ctx, src, fp32, name)
            save_quantized(model, folder, name)
            record["files"] = {"state_dict": weights.name, "nncf_config": config.name}
            records[name] = record
        _print_quantize(ctx, name, record)
        fp32_layers = record["compression"]["fp32_layers"]
        lineage = f"{src.lineage} <- {cfg.method}-int8" + (f" ({len(fp32_layers)} layers fp32)" if fp32_layers else "")
        guard_record = record["guard"]
        if src.metadata.get("guard"):  # pruned-int8 answers for its pruning too
            guard_record = {**guard.summarize(src.metadata["guard"]["checks"] + record["guard"]["checks"],
                                              src.metadata["guard"]["actions"] + record["guard"]["actions"]),
                            "vs_fp32": record["guard"]["vs_fp32"]}
        out.append(Artifact(name=name, module=model, precision="int8", lineage=lineage, files={"torch": weights},
                            metadata={"compression": record["compression"], "guard": guard_record}))
    atomic_write_json(folder / "quantize.json", records)
    ctx.finish_stage("04_quantize", {"artifacts": records})
    return out


def _print_quantize(ctx: BuildContext, name: str, record: dict[str, Any]) -> None:
    c, g = record["compression"], record["guard"]
    ptq, final = c["ptq"], c["final"]
    ctx.console.print(
        f"[bold]quantize[/]: {name}: val AUC PTQ {_f3(ptq['val']['auc'])} -> {c['method'].upper()} {_f3(final['val']['auc'])} "
        f"(reference {_f3(g['checks'][0]['auc']['reference'])}), test AUC PTQ {_f3(ptq['test']['auc'])} -> {_f3(final['test']['auc'])}; "
        f"kept {c['kept']}; guard "
        + ("[green]met[/]" if g["met"] else f"[red]NOT met[/]: {guard.describe(g['checks'][0])}")
        + (f" ({'; '.join(g['actions'])})" if g["actions"] else "")
    )


def _quantize(ctx: BuildContext, src: Artifact, fp32: Artifact, name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """PTQ + QAT of ``src`` steered by the guard, with its remedies; returns the NNCF model and its record."""
    cfg, data = ctx.recipe.quantize, ctx.data
    base = copy.deepcopy(src.module).eval()
    unfreeze([base])
    folded = fold_batchnorm(base)
    # The teacher is the model being quantized: QAT is to reproduce it (the guard's reference), not to re-learn the task.
    teacher = src.module.eval() if cfg.distill and cfg.method == "qat" else None
    distill = (cfg.distill_temperature, cfg.distill_alpha)
    reference = split_metrics(ctx, src.module, "val")
    judge = make_judge(ctx, reference, against=src.name, limits=guard.limits_of(cfg), reference_model=src.module)
    cal_x, _ = calibration_set(data, cfg.calibration_images, seed=ctx.recipe.seed)
    actions: list[str] = []

    def attempt(fp32_layers: list[str], label: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
        with ctx.console.status(f"[bold]quantize[/]: {name}: NNCF PTQ on {len(cal_x)} calibration images"):
            model = quantize_ptq(copy.deepcopy(base), cal_x, data.spec, device=ctx.device,
                                 ignored_scope=keep_fp32_scope(base, cfg.keep_fp32, fp32_layers), overflow_fix=cfg.overflow_fix)
        ptq = {"val": _rounded(split_metrics(ctx, model, "val")), "test": _rounded(split_metrics(ctx, model, "test"))}
        if cfg.method == "qat":
            tuned = finetune(ctx, model, epochs=cfg.epochs, lr=cfg.lr, label=f"quantize: {label}", judge=judge,
                             teacher=teacher, distill=distill)
        else:
            tuned = {"history": [], "best_epoch": 0, "check": judge(model)}
        return model, ptq, tuned

    model, ptq, tuned = attempt([], f"{name} QAT")
    tuned["check"] = _realign(ctx, cfg, model, reference, judge, tuned["check"], actions)
    if not tuned["check"]["met"] and cfg.method == "qat" and cfg.recovery_epochs > 0:
        before = guard.describe(tuned["check"])
        more = finetune(ctx, model, epochs=cfg.recovery_epochs, lr=cfg.lr, label=f"quantize: {name} recovery",
                        judge=judge, teacher=teacher, distill=distill, start_epoch=cfg.epochs)
        tuned = {"history": tuned["history"] + more["history"], "check": more["check"],
                 "best_epoch": more["best_epoch"] if more["best_epoch"] > cfg.epochs else tuned["best_epoch"]}
        actions.append(f"guard failed ({before}): {cfg.recovery_epochs} more QAT epochs -> {guard.describe(tuned['check'])}")
        tuned["check"] = _realign(ctx, cfg, model, reference, judge, tuned["check"], actions)
    fp32_layers: list[str] = []
    sensitivity: list[dict[str, Any]] = []
    if not tuned["check"]["met"] and cfg.fp32_fallback_layers > 0:
        before = guard.describe(tuned["check"])
        with ctx.console.status(f"[bold]quantize[/]: {name}: ranking layer sensitivity"):
            sens_x = cal_x[:SENSITIVITY_IMAGES]
            reference_logits = loop.predict(src.module, sens_x, data.spec, device=ctx.device)
            sensitivity = layer_sensitivity(model, reference_logits, sens_x, data.spec, device=ctx.device)
        chosen = [s["layer"] for s in sensitivity[: cfg.fp32_fallback_layers]]
        model2, ptq2, tuned2 = attempt(chosen, f"{name} QAT, {len(chosen)} layers fp32")
        realigned: list[str] = []
        tuned2["check"] = _realign(ctx, cfg, model2, reference, judge, tuned2["check"], realigned)
        better = _rank(tuned2["check"]) > _rank(tuned["check"])
        actions.append(f"guard failed ({before}): kept the {len(chosen)} most sensitive layers in FP32 via NNCF's "
                       f"ignored scope ({', '.join(chosen)}) and quantized again -> {guard.describe(tuned2['check'])}"
                       + ("" if better else "; the first model was closer and is kept"))
        if better:
            actions += realigned
            model, ptq, tuned, fp32_layers = model2, ptq2, tuned2, chosen
    if not tuned["check"]["met"]:
        actions.append("still failing: artifact kept and marked as not meeting the guard")
    final = {"val": _rounded(split_metrics(ctx, model, "val")), "test": _rounded(split_metrics(ctx, model, "test")),
             "kept_epoch": tuned["best_epoch"], "history": tuned["history"]}
    fp32_val = split_metrics(ctx, fp32.module, "val")
    record_guard = guard.summarize([tuned["check"]], actions)
    record_guard["vs_fp32"] = {f"{m}_drop": _delta(fp32_val[m], final["val"][m]) for m in guard.GUARD_METRICS}
    compression = {
        "method": cfg.method, "library": "nncf", "source": src.name, "calibration_images": len(cal_x),
        "batchnorm_folded": len(folded), "quantizers": quantizer_summary(model), "keep_fp32": list(cfg.keep_fp32),
        "fp32_layers": fp32_layers, "sensitivity": sensitivity[:10],
        "distill": ({"teacher": src.name, "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha} if teacher is not None else None),
        "ptq": ptq, "final": final, "reference_val": _rounded(reference),
        "kept": "qat" if cfg.method == "qat" and tuned["best_epoch"] > 0 else "ptq",
    }
    return model, {"compression": compression, "guard": record_guard}


def _delta(a: float, b: float | None) -> float | None:
    return round(a - b, 6) if b is not None and math.isfinite(a) else None
