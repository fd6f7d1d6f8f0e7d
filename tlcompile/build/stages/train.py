"""``02_train``: transfer-learn the FP32 model (tlcompile.train.transfer) and lock the operating point on its val.

Writes ``fp32.pt`` (and ``transfer.json`` when variants are compared); the epoch checkpoints that let a killed build
continue are deleted once ``stage.json`` stands for them."""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table

from tlcompile.build.context import Artifact, BuildContext, Stage, progress
from tlcompile.build.stages import data
from tlcompile.build.tuning import split_logits
from tlcompile.checkpoint import load_state, save_state
from tlcompile.data.datamodule import class_names_for
from tlcompile.evaluate.clinical import lock_operating_point
from tlcompile.io import atomic_write_json, sha256_file
from tlcompile.models import get_model
from tlcompile.train import loop, transfer

FOLDER = "02_train"
SECTIONS = (*data.SECTIONS, "model", "transfer", "train")


def preflight(ctx: BuildContext) -> None:
    """Before the data stage: the source weights exist and fit, every variant's blocks exist (fail in seconds, not
    after data). Skipped when a finished train stage will be resumed: its checkpoint no longer needs the source."""
    if ctx.stage_done(FOLDER) and (ctx.out_dir / FOLDER / "fp32.pt").is_file():
        return
    ctx.weight_source = transfer.check_transfer_plan(ctx.recipe, len(class_names_for(ctx.recipe.data.task)))


def _build_model(ctx: BuildContext) -> torch.nn.Module:
    torch.manual_seed(ctx.recipe.seed)
    return get_model(ctx.recipe.model.arch, num_classes=ctx.data.num_classes).to(ctx.device)


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    """Train through tlcompile.train.transfer: the recipe's init and strategy, and every transfer.compare variant."""
    r, data_module, folder, done = ctx.recipe, ctx.data, ctx.stage.folder, ctx.stage.done
    ckpt = folder / "fp32.pt"
    if done and ckpt.is_file():
        model = _build_model(ctx)
        model.load_state_dict(load_state(ckpt))
        ctx.training, ctx.transfer = done["training"], done.get("transfer")
        ctx.console.print(f"[bold]train[/]: resumed from {ckpt} (best epoch {ctx.training['best_epoch']})")
    else:
        tc, plan = r.train, r.effective_transfer()
        runs = len(plan.variants()) * plan.repeats
        steps = loop.steps_per_epoch(len(data_module.subset("train")[1]), tc.batch_size)
        with progress(ctx.console) as bar:
            task = bar.add_task("train", total=runs * tc.epochs * steps, info="")

            def on_epoch(label: str, rec: dict[str, Any]) -> None:
                ctx.tracker.epoch(label, rec)
                bar.update(
                    task,
                    info=f"{label + ': ' if runs > 1 else ''}epoch {rec['epoch']}/{tc.epochs} "
                    f"loss {rec['loss']:.3f} val AUC {rec['val_auc']:.3f}",
                )

            outcome = transfer.run_transfer(
                r,
                data_module,
                device=ctx.device,
                source=ctx.weight_source,
                log=lambda msg: ctx.console.print(msg, markup=False),
                on_epoch=on_epoch,
                on_step=lambda _loss: bar.advance(task),
                checkpoint_dir=folder,
                checkpoint_tag=ctx.stage_fingerprint(FOLDER),
            )
        model = outcome.model
        save_state(ckpt, model.state_dict())
        ctx.training, ctx.transfer = outcome.training, outcome.table
        ctx.weight_source = None  # the source tensors are not needed after training
        if ctx.transfer is not None:
            atomic_write_json(folder / "transfer.json", ctx.transfer)
            ctx.console.print(_transfer_table(ctx.transfer))
        ctx.stage.record = {"training": ctx.training, "transfer": ctx.transfer, "checkpoint_sha256": sha256_file(ckpt)}
        # stage.json stands for the epoch checkpoints (tens of MB each) once the loop has written it.
        ctx.stage.cleanup = list(transfer.checkpoint_paths(r, folder).values())
        t = ctx.training
        ctx.console.print(
            f"[bold]train[/]: {t['variant']}, best epoch {t['best_epoch']}, "
            f"val AUC {t['best_val_auc']:.3f} ({t['wall_s']:.0f} s)"
        )
    model.eval()
    lock_fp32_operating_point(ctx, model)
    return [*artifacts, Artifact(name="fp32", module=model, precision="fp32", lineage="fp32", files={"torch": ckpt})]


def lock_fp32_operating_point(ctx: BuildContext, model: torch.nn.Module) -> None:
    """Lock the referral threshold (and temperature) on the FP32 model's validation split; every artifact is judged
    at it."""
    e = ctx.recipe.evaluate
    _, y_val = ctx.data.subset("val")
    val_logits = split_logits(ctx, model, "val")
    locked = lock_operating_point(
        val_logits,
        y_val,
        method=e.operating_point,
        target_sensitivity=e.target_sensitivity,
        temperature_scaling=e.temperature_scaling,
    )
    ctx.operating_point = {**locked, "locked_on": "val", "model": "fp32"}
    ctx.threshold = locked["threshold"]


def _transfer_table(table: dict[str, Any]) -> Table:
    header, rows = transfer.table_cells(table)
    out = Table(
        title=f"transfer: {table['repeats']} seed(s) per variant; * = best mean val AUC, goes on "
        f"(epochs to val AUC {table['target_val_auc']})"
    )
    for col in header:
        out.add_column(col, justify="left" if col in ("variant", "init", "strategy") else "right", no_wrap=True)
    for row in rows:
        out.add_row(*row)
    return out


STAGE = Stage(
    name="train", folder=FOLDER, sections=SECTIONS, run=run, preflight=preflight, all_ranks=True, keeps_partial=True
)
