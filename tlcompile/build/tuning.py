"""Guarded fine-tuning, shared by the compression stages (``03_prune``, ``04_quantize``).

Each compression stage works on copies (the FP32 model stays the teacher and the reference) and is steered by the
accuracy guard on val (:mod:`tlcompile.compress.guard`): every fine-tuning epoch is judged, and the state kept is the
one that meets the guard with the best AUC (a QAT epoch must beat PTQ, "epoch 0", to be kept). When the guard still
fails the stage acts -- more epochs, a re-aligned operating point; for int8, the most sensitive layers kept in FP32 --
and says what it did.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from tlcompile.build.context import BuildContext, progress
from tlcompile.compress import guard
from tlcompile.compress.distill import distillation
from tlcompile.compress.realign import shift_referable_bias
from tlcompile.evaluate.metrics import round_finite
from tlcompile.train import loop

Judge = Callable[..., dict[str, Any]]


def temperature(ctx: BuildContext) -> float:
    return float(ctx.operating_point.get("temperature", 1.0)) if ctx.operating_point else 1.0


def _weights_digest(model: torch.nn.Module) -> str | None:
    """A digest of a plain torch model's class, parameter and buffer names, shapes and values; None for an NNCF model
    (whether its quantizers are enabled is not in its state_dict, so equal weights need not mean equal outputs)."""
    if "nncf" in sys.modules:  # no model carries NNCF hooks before nncf is imported (and it is slow to import)
        from tlcompile.compress.quantize import quantizer_hooks

        if quantizer_hooks(model):
            return None
    h = hashlib.blake2b(type(model).__qualname__.encode(), digest_size=20)
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def split_logits(ctx: BuildContext, model: torch.nn.Module, split: str) -> np.ndarray:
    """Eval-mode logits of ``model`` on a split. The reference models (fp32, pruned) are predicted on val by the
    operating-point lock, each compression stage's reference and judge and the int8 records: a plain torch model's
    logits are kept per (split, weights digest), so each is computed once per build; a changed weight is a new key."""
    digest = _weights_digest(model)
    key = (split, digest or "")
    if digest is None or key not in ctx.logits_cache:  # only then the split's images are needed
        x, _ = ctx.data.subset(split)
        logits = loop.predict(model, x, ctx.data.spec, device=ctx.device)
        if digest is None:
            return logits
        ctx.logits_cache[key] = logits
    return ctx.logits_cache[key].copy()


def split_metrics(ctx: BuildContext, model: torch.nn.Module, split: str) -> dict[str, float]:
    """AUC, and sensitivity / specificity / accuracy at the locked operating point, of a torch model on a split."""
    y = ctx.data.targets[ctx.data.split == split]  # the labels alone: subset() would copy the images too
    logits = split_logits(ctx, model, split)
    return guard.val_metrics(logits, y, threshold=ctx.threshold, temperature=temperature(ctx))


def make_judge(
    ctx: BuildContext,
    reference: dict[str, float],
    *,
    against: str,
    limits: dict[str, float | None],
    reference_model: torch.nn.Module | None = None,
) -> Judge:
    """``judge(model)`` -> the guard check of ``model`` on val against ``reference``; with ``reference_model``, the
    check also carries its evidence in cases (eyes newly missed / referred, a CI of the AUC drop: guard.evidence).
    ``judge(model, logits=...)``: the model's eval-mode val logits are already at hand (fine-tuning's epoch end)."""
    x, y = ctx.data.subset("val")
    ref_logits = None if reference_model is None else split_logits(ctx, reference_model, "val")

    def judge(model: torch.nn.Module, logits: np.ndarray | None = None) -> dict[str, Any]:
        if logits is None:
            logits = loop.predict(model, x, ctx.data.spec, device=ctx.device)
        metrics = guard.val_metrics(logits, y, threshold=ctx.threshold, temperature=temperature(ctx))
        result = guard.check(metrics, reference, against=against, limits=limits)
        if ref_logits is not None:
            result["evidence"] = guard.evidence(
                ref_logits, logits, y, threshold=ctx.threshold, temperature=temperature(ctx)
            )
        return result

    return judge


def rank(check: dict[str, Any]) -> tuple[bool, float, float]:
    """Order of preference: meets the guard, then least beyond its limits, then best val AUC."""
    auc = check["auc"]["value"]
    return check["met"], -guard.excess(check), -math.inf if auc is None else auc


def f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: round_finite(v) for k, v in metrics.items()}


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
    higher under :func:`rank`. With ``teacher`` the loss distils it, ``distill`` = (temperature, alpha).
    ``freeze_bn_stats`` keeps every BatchNorm on the statistics it has (just re-estimated on the calibration set
    after pruning): weights adapt to fixed statistics instead of noisy 32-image batch statistics, which recover a
    pruned model less well.
    Returns ``{"history", "best_epoch", "check"}`` (the kept state's guard check); the model holds that state.
    """
    r, data = ctx.recipe, ctx.data
    tc = r.train
    x_tr, y_tr = data.subset("train")
    # Dropout draws from the global RNG: seed it from (seed, label, start epoch) so the result does not depend on what
    # ran before in this process (an uninterrupted build and one resumed after training give the same pruned model).
    torch.manual_seed(int(np.random.default_rng([r.seed, zlib.crc32(label.encode()), start_epoch]).integers(2**31)))
    optimizer = loop.make_optimizer(
        model.parameters(), name=tc.optimizer, lr=lr, weight_decay=tc.weight_decay, momentum=tc.momentum
    )
    steps = loop.steps_per_epoch(len(x_tr), tc.batch_size)
    scheduler = loop.make_scheduler(optimizer, tc.model_copy(update={"schedule": "cosine"}), epochs, steps)
    first = judge(model)
    kept = {"epoch": start_epoch, "check": first, "state": copy.deepcopy(model.state_dict())}
    with contextlib.ExitStack() as stack:
        if teacher is not None:
            loss_fn = stack.enter_context(distillation(model, teacher, temperature=distill[0], alpha=distill[1]))
        else:
            weight = (
                loop.class_weights(y_tr, data.num_classes).to(ctx.device) if data.balance == "weighted_loss" else None
            )
            loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        bar = stack.enter_context(progress(ctx.console))
        task = bar.add_task(label, total=epochs * steps, info="")

        val_logits: list[np.ndarray] = []  # fit's val pass of the epoch just ended: the judge's input too

        def on_epoch(rec: dict[str, Any]) -> None:
            check = judge(model, logits=val_logits.pop())
            rec["guard_met"] = check["met"]
            if rank(check) > rank(kept["check"]):
                kept.update(epoch=rec["epoch"], check=check, state=copy.deepcopy(model.state_dict()))
            bar.update(
                task,
                info=f"epoch {rec['epoch']} loss {rec['loss']:.3f} val AUC {rec['val_auc']:.3f}"
                + ("" if check["met"] else " (guard not met)"),
            )

        settings = loop.FitSettings(
            epochs=epochs,
            batch_size=tc.batch_size,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            seed=r.seed,
            device=ctx.device,
            augment_batches=tc.augment,
            start_epoch=start_epoch,
            set_train_mode=_train_with_frozen_bn_stats if freeze_bn_stats else None,
            # data.balance as in training; fp32 arithmetic (no train.amp): fake-quantizers and masks want full
            # precision.
            sample_weights=data.sample_weights("train"),
            loader_workers=data.loader_workers,
        )
        result, _ = loop.fit(
            model,
            (x_tr, y_tr),
            data.subset("val"),
            data.spec,
            settings,
            loop.FitCallbacks(on_epoch=on_epoch, on_step=lambda _loss: bar.advance(task), on_val=val_logits.append),
        )
    model.load_state_dict(kept["state"])
    model.eval()
    return {"history": result.history, "best_epoch": kept["epoch"], "check": kept["check"]}


def _train_with_frozen_bn_stats(model: torch.nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


def realign(
    ctx: BuildContext,
    cfg: Any,
    model: torch.nn.Module,
    reference: dict[str, float],
    judge: Judge,
    check: dict[str, Any],
    actions: list[str],
) -> dict[str, Any]:
    """When the guard fails on the referral decisions but not on AUC: re-align the operating point (see
    :func:`guard.realignment_shift`), keep it only if the guard ranks it higher, and say what was done.
    ``cfg`` is the recipe section (prune / quantize) with the limits and the ``realign`` switch."""
    decisions_failed = any(
        check[m]["max_drop"] is not None and not check[m].get("met", True)
        for m in ("sensitivity", "specificity", "accuracy")
    )
    if check["met"] or not cfg.realign or not decisions_failed or not check["auc"].get("met", True):
        return check
    x, y = ctx.data.subset("val")
    logits = loop.predict(model, x, ctx.data.spec, device=ctx.device)
    limits = guard.limits_of(cfg)
    delta = guard.realignment_shift(
        logits, y, reference, threshold=ctx.threshold, temperature=temperature(ctx), limits=limits
    )
    if delta == 0.0:
        return check
    before = guard.describe(check)
    shift_referable_bias(model, delta, temperature=temperature(ctx))
    after = judge(model)
    if rank(after) > rank(check):
        actions.append(
            f"guard failed on the referral decisions with the AUC within its limit ({before}): the scores had moved "
            f"against the locked threshold, so the classifier's referable bias was shifted by {delta:+.3f} log-odds "
            f"(ranking unchanged) -> {guard.describe(after)}"
        )
        return after
    shift_referable_bias(model, -delta, temperature=temperature(ctx))
    return check
