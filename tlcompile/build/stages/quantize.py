"""``04_quantize`` (artifacts ``int8``, ``pruned-int8``): INT8 of every FP32 artifact, PTQ then QAT, guarded.

NNCF post-training quantization is the start; quantization-aware training fine-tunes it under the accuracy guard
(:mod:`tlcompile.build.tuning`); when the guard still fails, the most sensitive layers are kept in FP32. Saved as
``<name>.nncf.json`` + ``<name>.pt`` (rebuilt without pickles on resume); ``quantize.json`` is the record.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.build.stages import prune
from tlcompile.build.tuning import f3, finetune, make_judge, rank, realign, rounded, split_metrics
from tlcompile.compress import guard
from tlcompile.compress.calibration import calibration_set
from tlcompile.compress.quantize import (
    fold_batchnorm,
    keep_fp32_scope,
    layer_sensitivity,
    load_quantized,
    quantize_ptq,
    quantizer_summary,
    save_quantized,
)
from tlcompile.io import atomic_write_json
from tlcompile.models import unfreeze
from tlcompile.train import loop

SECTIONS = (*prune.SECTIONS, "quantize")
# Sensitivity ranking runs the int8 model once per layer: a subset of the calibration images is plenty.
SENSITIVITY_IMAGES = 128


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    """INT8 of every FP32 artifact: 'fp32' -> 'int8', 'pruned' -> 'pruned-int8' (PTQ, then QAT; guarded)."""
    cfg, folder, done = ctx.recipe.quantize, ctx.stage.folder, ctx.stage.done
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
            guard_record = {
                **guard.summarize(
                    src.metadata["guard"]["checks"] + record["guard"]["checks"],
                    src.metadata["guard"]["actions"] + record["guard"]["actions"],
                ),
                "vs_fp32": record["guard"]["vs_fp32"],
            }
        out.append(
            Artifact(
                name=name,
                module=model,
                precision="int8",
                lineage=lineage,
                files={"torch": weights},
                metadata={"compression": record["compression"], "guard": guard_record},
            )
        )
    atomic_write_json(folder / "quantize.json", records)
    ctx.stage.record = {"artifacts": records}
    return [*artifacts, *out]


def _print_quantize(ctx: BuildContext, name: str, record: dict[str, Any]) -> None:
    c, g = record["compression"], record["guard"]
    ptq, final = c["ptq"], c["final"]
    ctx.console.print(
        f"[bold]quantize[/]: {name}: val AUC PTQ {f3(ptq['val']['auc'])} "
        f"-> {c['method'].upper()} {f3(final['val']['auc'])} "
        f"(reference {f3(g['checks'][0]['auc']['reference'])}), "
        f"test AUC PTQ {f3(ptq['test']['auc'])} -> {f3(final['test']['auc'])}; "
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
    # The teacher is the model being quantized: QAT is to reproduce it (the guard's reference), not to re-learn
    # the task.
    teacher = src.module.eval() if cfg.distill and cfg.method == "qat" else None
    distill = (cfg.distill_temperature, cfg.distill_alpha)
    reference = split_metrics(ctx, src.module, "val")
    judge = make_judge(ctx, reference, against=src.name, limits=guard.limits_of(cfg), reference_model=src.module)
    cal_x, _ = calibration_set(data, cfg.calibration_images, seed=ctx.recipe.seed)
    actions: list[str] = []

    def attempt(fp32_layers: list[str], label: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
        with ctx.console.status(f"[bold]quantize[/]: {name}: NNCF PTQ on {len(cal_x)} calibration images"):
            model = quantize_ptq(
                copy.deepcopy(base),
                cal_x,
                data.spec,
                device=ctx.device,
                ignored_scope=keep_fp32_scope(base, cfg.keep_fp32, fp32_layers),
                overflow_fix=cfg.overflow_fix,
            )
        ptq = {"val": rounded(split_metrics(ctx, model, "val")), "test": rounded(split_metrics(ctx, model, "test"))}
        if cfg.method == "qat":
            tuned = finetune(
                ctx,
                model,
                epochs=cfg.epochs,
                lr=cfg.lr,
                label=f"quantize: {label}",
                judge=judge,
                teacher=teacher,
                distill=distill,
            )
        else:
            tuned = {"history": [], "best_epoch": 0, "check": judge(model)}
        return model, ptq, tuned

    model, ptq, tuned = attempt([], f"{name} QAT")
    tuned["check"] = realign(ctx, cfg, model, reference, judge, tuned["check"], actions)
    if not tuned["check"]["met"] and cfg.method == "qat" and cfg.recovery_epochs > 0:
        before = guard.describe(tuned["check"])
        more = finetune(
            ctx,
            model,
            epochs=cfg.recovery_epochs,
            lr=cfg.lr,
            label=f"quantize: {name} recovery",
            judge=judge,
            teacher=teacher,
            distill=distill,
            start_epoch=cfg.epochs,
        )
        tuned = {
            "history": tuned["history"] + more["history"],
            "check": more["check"],
            "best_epoch": more["best_epoch"] if more["best_epoch"] > cfg.epochs else tuned["best_epoch"],
        }
        actions.append(
            f"guard failed ({before}): {cfg.recovery_epochs} more QAT epochs -> {guard.describe(tuned['check'])}"
        )
        tuned["check"] = realign(ctx, cfg, model, reference, judge, tuned["check"], actions)
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
        tuned2["check"] = realign(ctx, cfg, model2, reference, judge, tuned2["check"], realigned)
        better = rank(tuned2["check"]) > rank(tuned["check"])
        actions.append(
            f"guard failed ({before}): kept the {len(chosen)} most sensitive layers in FP32 via NNCF's "
            f"ignored scope ({', '.join(chosen)}) and quantized again -> {guard.describe(tuned2['check'])}"
            + ("" if better else "; the first model was closer and is kept")
        )
        if better:
            actions += realigned
            model, ptq, tuned, fp32_layers = model2, ptq2, tuned2, chosen
    if not tuned["check"]["met"]:
        actions.append("still failing: artifact kept and marked as not meeting the guard")
    final = {
        "val": rounded(split_metrics(ctx, model, "val")),
        "test": rounded(split_metrics(ctx, model, "test")),
        "kept_epoch": tuned["best_epoch"],
        "history": tuned["history"],
    }
    fp32_val = split_metrics(ctx, fp32.module, "val")
    record_guard = guard.summarize([tuned["check"]], actions)
    record_guard["vs_fp32"] = {f"{m}_drop": _delta(fp32_val[m], final["val"][m]) for m in guard.GUARD_METRICS}
    compression = {
        "method": cfg.method,
        "library": "nncf",
        "source": src.name,
        "calibration_images": len(cal_x),
        "batchnorm_folded": len(folded),
        "quantizers": quantizer_summary(model),
        "keep_fp32": list(cfg.keep_fp32),
        "fp32_layers": fp32_layers,
        "sensitivity": sensitivity[:10],
        "distill": (
            {"teacher": src.name, "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha}
            if teacher is not None
            else None
        ),
        "ptq": ptq,
        "final": final,
        "reference_val": rounded(reference),
        "kept": "qat" if cfg.method == "qat" and tuned["best_epoch"] > 0 else "ptq",
    }
    return model, {"compression": compression, "guard": record_guard}


def _delta(a: float, b: float | None) -> float | None:
    return round(a - b, 6) if b is not None and math.isfinite(a) else None


STAGE = Stage(
    name="quantize", folder="04_quantize", sections=SECTIONS, run=run, wanted=lambda recipe: recipe.quantize is not None
)
