"""Transfer learning as the Transfusion review describes it, and a fair way to see which strategy wins.

A *variant* is an init plus a strategy (recipe ``transfer``):

- init: ``pretrained`` (the source weights), ``random``, ``mean_var`` (Transfusion's Mean Var Init: every source
  conv / linear layer re-drawn i.i.d. from its own mean and std, so only the scale transfers), ``partial:K``
  (the first K blocks from the source, the rest re-initialised; the classifier is always fresh).
- strategy: ``linear_probe`` (blocks frozen, only the classifier learns), ``two_phase`` (the seed's advice: the
  head first, then the last ``unfreeze_last`` blocks with a small SGD learning rate, never a random head on a
  pretrained base with big updates), ``full`` and ``scratch`` (every layer, ``train.optimizer``).

:func:`plan_phases` turns a variant into phases (which blocks train, with which optimizer, for how many epochs);
:func:`run_phases` trains them with :func:`tlcompile.train.loop.fit`, a fresh optimizer and schedule per phase.
:func:`run_transfer` trains the recipe's main variant and every ``compare`` variant identically (same data,
epochs, batch order and seeds), evaluates each on val and test, and keeps the best on val for the next stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlcompile.errors import ModelError, TrainError
from tlcompile.evaluate.metrics import round_finite
from tlcompile.models import freeze, get_model, mean_var_init_, reinit_, set_train_mode, unfreeze
from tlcompile.models.pretrained import SourceWeights, apply_source_weights, load_weight_source
from tlcompile.models.registry import TlModel
from tlcompile.recipe import FinetuneConfig, Recipe, TrainConfig, TransferConfig, TransferVariant
from tlcompile.runtime.terminal import num
from tlcompile.train import loop

# Columns of the report's transfer table (report["transfer"]["rows"] has these keys, and more).
TABLE_COLUMNS = ("variant", "init", "strategy", "val_auc", "test_auc", "epochs_to_target", "wall_s")
# Without transfer.target_val_auc, a run has "converged" once its val AUC is this fraction of the best any run reached.
RELATIVE_TARGET = 0.95

EpochCallback = Callable[[str, dict[str, Any]], None]  # (run label, epoch record)


@dataclass(frozen=True)
class Phase:
    """One stretch of training with one optimizer and one set of trainable blocks (the classifier always trains)."""

    name: str  # head | finetune | full
    epochs: int
    trainable_blocks: tuple[str, ...]
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epochs": self.epochs,
            "trainable_blocks": list(self.trainable_blocks),
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
        }


def plan_phases(
    variant: TransferVariant, train: TrainConfig, finetune: FinetuneConfig, block_names: list[str]
) -> list[Phase]:
    """The phases of one variant over ``train.epochs`` epochs, for a model with these blocks (input -> output)."""
    base = {
        "optimizer": train.optimizer,
        "lr": train.lr,
        "momentum": train.momentum,
        "weight_decay": train.weight_decay,
    }
    if variant.strategy in ("full", "scratch"):
        return [Phase("full", train.epochs, tuple(block_names), **base)]
    if variant.strategy == "linear_probe":
        return [Phase("head", train.epochs, (), **base)]
    k, head_epochs = variant.unfreeze_last, variant.head_epochs
    if k > len(block_names):
        raise ModelError(
            f"transfer variant '{variant.name}': unfreeze_last {k} but the model has {len(block_names)} blocks "
            f"({', '.join(block_names)}); valid: 1 .. {len(block_names)}"
        )
    if head_epochs >= train.epochs:
        raise TrainError(
            f"transfer variant '{variant.name}': head_epochs {head_epochs} leaves no fine-tuning epoch of train.epochs "
            f"{train.epochs}"
        )
    return [
        Phase("head", head_epochs, (), **base),
        Phase(
            "finetune",
            train.epochs - head_epochs,
            tuple(block_names[-k:]),
            finetune.optimizer,
            finetune.lr,
            finetune.momentum,
            finetune.weight_decay,
        ),
    ]


def partial_blocks(init: str) -> int | None:
    """K of ``partial:K``, else None."""
    return int(init.split(":", 1)[1]) if init.startswith("partial:") else None


def initialise_model(
    arch: str, num_classes: int, init: str, source: SourceWeights | None, *, seed: int
) -> tuple[TlModel, dict[str, Any]]:
    """Build ``arch`` with ``num_classes`` logits and initialise it as ``init`` says; returns the model and what was
    done.

    The same seed gives the same model: the fresh init draws from the global RNG seeded here, re-drawn layers
    (mean_var, partial) from a generator seeded with ``seed``.
    """
    torch.manual_seed(seed)
    model = get_model(arch, num_classes=num_classes)
    record: dict[str, Any] = {"init": init}
    if init == "random":
        return model, record
    if source is None:
        raise ModelError(f"transfer init '{init}' needs source weights, but model.pretrained is none")
    record["source"] = apply_source_weights(model, source)
    generator = torch.Generator().manual_seed(seed)
    blocks = model.blocks()
    names = [name for name, _ in blocks]
    if init == "mean_var":
        for _, block in blocks:
            mean_var_init_(block, generator=generator)
        if record["source"]["classifier_loaded"]:  # a fresh classifier has no source statistics to keep
            mean_var_init_(model.get_classifier(), generator=generator)
        record["redrawn_blocks"] = names
    elif (k := partial_blocks(init)) is not None:
        if k > len(blocks):
            raise ModelError(
                f"transfer init '{init}': {arch} has {len(blocks)} blocks ({', '.join(names)}); valid: partial:1 .. "
                f"partial:{len(blocks)}"
            )
        for _, block in blocks[k:]:
            reinit_(block, generator=generator)
        # Transfusion's partial reuse keeps only the lower layers: the classifier is new even when it would fit.
        model.reset_classifier(num_classes)
        record["kept_blocks"], record["reinitialised_blocks"] = names[:k], names[k:]
    return model, record


def run_phases(
    model: TlModel,
    phases: list[Phase],
    data,
    train: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    freeze_bn_stats: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    checkpoint: loop.EpochCheckpoint | None = None,
) -> tuple[loop.FitResult, dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Train ``model`` through ``phases``; returns the history, the state of the best val epoch and the phase records.

    Each phase freezes everything, unfreezes its blocks and the classifier, and gets a new optimizer over the
    trainable parameters only (frozen ones get no weight decay or momentum, so they stay bit-identical) and its
    own schedule. Each epoch record gains ``phase``, ``optimizer`` and ``trainable_params``. At the end every
    parameter is trainable again, so later stages (pruning, QAT) see an ordinary model. One ``checkpoint`` serves
    all phases: after a kill, fit() skips the phases already done and continues the one that was running.
    """
    x_tr, y_tr = data.subset("train")
    steps = loop.steps_per_epoch(len(x_tr), train.batch_size)
    weight = loop.class_weights(y_tr, data.num_classes).to(device) if data.balance == "weighted_loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    blocks = dict(model.blocks())
    result, best_state, records, epoch = loop.FitResult(), None, [], 0
    for phase in phases:
        freeze(model, freeze_bn_stats=freeze_bn_stats)
        unfreeze([blocks[name] for name in phase.trainable_blocks] + [model.get_classifier()])
        optimizer = loop.make_optimizer(
            model.parameters(),
            name=phase.optimizer,
            lr=phase.lr,
            weight_decay=phase.weight_decay,
            momentum=phase.momentum,
        )
        scheduler = loop.make_scheduler(optimizer, train, phase.epochs, steps)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        records.append(
            {
                **phase.to_dict(),
                "first_epoch": epoch + 1,
                "last_epoch": epoch + phase.epochs,
                "trainable_params": trainable,
            }
        )

        def labelled(
            record: dict[str, Any],
            phase: Phase = phase,
            optimizer: torch.optim.Optimizer = optimizer,
            trainable: int = trainable,
        ) -> None:
            # The record is the one fit() keeps in its history, so the labels land there too.
            record.update(phase=phase.name, optimizer=type(optimizer).__name__.lower(), trainable_params=trainable)
            if on_epoch:
                on_epoch(record)

        settings = loop.FitSettings(
            epochs=phase.epochs,
            batch_size=train.batch_size,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            seed=seed,
            device=device,
            augment_batches=train.augment,
            set_train_mode=set_train_mode,
            start_epoch=epoch,
            amp=train.amp,
            channels_last=train.channels_last,
            sample_weights=data.sample_weights("train"),
            loader_workers=data.loader_workers,
            precise_bn=train.precise_bn,
            checkpoint=checkpoint,
        )
        result, best_state = loop.fit(
            model,
            (x_tr, y_tr),
            data.subset("val"),
            data.spec,
            settings,
            loop.FitCallbacks(on_epoch=labelled, on_step=on_step),
            previous=(result, best_state),
        )
        epoch += phase.epochs
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None and saved["epoch"] == epoch:
            # A resumed run whose checkpoint ends exactly here: fit() skipped this phase without restoring the
            # weights or the RNG, and the next phase starts afresh from them (its own optimizer), so restore both.
            model.load_state_dict(saved["model"])
            torch.set_rng_state(saved["torch_rng"])
    unfreeze(model)
    return result, best_state, records


# ------------------------------------------------------------------------------------------- compare
@dataclass
class VariantRun:
    """One variant trained with one seed."""

    variant: TransferVariant
    seed: int
    model: TlModel | None = None  # kept only while it may be selected
    result: loop.FitResult | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    init_record: dict[str, Any] = field(default_factory=dict)
    val_auc: float | None = None
    test_auc: float | None = None
    error: str | None = None

    def summary(self, target: float | None) -> dict[str, Any]:
        history = self.result.history if self.result else []
        return {
            "seed": self.seed,
            "val_auc": self.val_auc,
            "test_auc": self.test_auc,
            "best_epoch": self.result.best_epoch if self.result else None,
            "epochs_to_target": epochs_to_target(history, target),
            "wall_s": round(self.result.wall_s, 2) if self.result else None,
            "error": self.error,
        }


@dataclass
class TransferOutcome:
    """What the train stage keeps: the selected model, its training record and the transfer table."""

    model: TlModel
    training: dict[str, Any]
    table: dict[str, Any] | None


def epochs_to_target(history: list[dict[str, Any]], target: float | None) -> int | None:
    """The first epoch whose val AUC reaches ``target``; None if none does."""
    if target is None:
        return None
    return next((rec["epoch"] for rec in history if _finite(rec.get("val_auc")) and rec["val_auc"] >= target), None)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd of the finite values; None when a value is missing (a run failed or never got there)."""
    if not values or not all(_finite(v) for v in values):
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    return round(float(arr.mean()), 4), (round(float(arr.std(ddof=1)), 4) if len(arr) > 1 else None)


def train_variant(
    variant: TransferVariant,
    recipe: Recipe,
    data,
    source: SourceWeights | None,
    *,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    checkpoint: loop.EpochCheckpoint | None = None,
) -> VariantRun:
    """Initialise, train and evaluate one variant with one seed; the model holds its best-val-epoch weights."""
    transfer = recipe.effective_transfer()
    model, init_record = initialise_model(recipe.model.arch, data.num_classes, variant.init, source, seed=seed)
    model.to(device)
    phases = plan_phases(variant, recipe.train, transfer.finetune, [name for name, _ in model.blocks()])
    result, best_state, phase_records = run_phases(
        model,
        phases,
        data,
        recipe.train,
        seed=seed,
        device=device,
        freeze_bn_stats=transfer.freeze_bn_stats,
        on_epoch=on_epoch,
        on_step=on_step,
        checkpoint=checkpoint,
    )
    model.load_state_dict(best_state)
    model.eval()
    x_test, y_test = data.subset("test")
    test_auc = loop.validation_auc(loop.predict(model, x_test, data.spec, device=device), y_test)
    return VariantRun(
        variant=variant,
        seed=seed,
        model=model,
        result=result,
        phases=phase_records,
        init_record=init_record,
        val_auc=round_finite(result.best_val_auc, digits=4),
        test_auc=round_finite(test_auc, digits=4),
    )


def needs_source(recipe: Recipe) -> bool:
    return recipe.model.pretrained != "none" and any(v.init != "random" for v in recipe.effective_transfer().variants())


def load_source(recipe: Recipe, model: TlModel) -> SourceWeights | None:
    """Read ``model.pretrained`` once for all variants (None when no variant uses it); ``model`` is one of the
    recipe's."""
    return load_weight_source(recipe.model.pretrained, model) if needs_source(recipe) else None


def check_transfer_plan(recipe: Recipe, num_classes: int) -> SourceWeights | None:
    """Fail before any data is loaded: the source weights exist and fit, every variant's blocks exist.

    Returns the loaded source so the train stage need not read it again.
    """
    model = get_model(recipe.model.arch, num_classes=num_classes)
    names = [name for name, _ in model.blocks()]
    transfer = recipe.effective_transfer()
    for v in transfer.variants():
        plan_phases(v, recipe.train, transfer.finetune, names)
        k = partial_blocks(v.init)
        if k is not None and k > len(names):
            raise ModelError(
                f"transfer variant '{v.name}': init {v.init} but {recipe.model.arch} has {len(names)} blocks "
                f"({', '.join(names)}); valid: partial:1 .. partial:{len(names)}"
            )
    source = load_source(recipe, model)
    if source is not None:
        apply_source_weights(model, source)  # raises now if the weights do not fit this arch
    return source


def run_transfer(
    recipe: Recipe,
    data,
    *,
    device: torch.device,
    source: SourceWeights | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    on_epoch: EpochCallback | None = None,
    on_step: Callable[[float], None] | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_tag: str = "",
) -> TransferOutcome:
    """Train every variant (main first, then ``compare``) over ``repeats`` seeds; keep the best mean val AUC.

    Every run sees the same data, epochs and batch size; run r of every variant uses seed ``recipe.seed + r``
    for its init, batch order and augmentation, so variants differ only in init and strategy. Test AUC is
    measured for the table but never used to choose. With ``checkpoint_dir`` every run saves an epoch checkpoint
    there (:func:`checkpoint_paths`), so a killed build continues each run where it stopped; ``checkpoint_tag`` (the
    build passes its train stage's recipe fingerprint) keeps a checkpoint of another recipe from being continued.
    """
    transfer = recipe.effective_transfer()
    if source is None and needs_source(recipe):
        source = load_source(recipe, get_model(recipe.model.arch, num_classes=data.num_classes))
    if source is not None:
        _log_source(source, recipe, data.num_classes, log)
    variants = transfer.variants()
    comparing = len(variants) > 1
    runs: dict[str, list[VariantRun]] = {}
    best: VariantRun | None = None  # the selected run so far
    best_mean = -math.inf
    for variant in variants:
        runs[variant.name] = []
        for r in range(transfer.repeats):
            seed = recipe.seed + r
            label = variant.name + (f" seed {seed}" if transfer.repeats > 1 else "")
            checkpoint = None
            if checkpoint_dir is not None:
                # Tagged with the recipe, variant and seed: a checkpoint of anything else is never continued.
                checkpoint = loop.EpochCheckpoint(
                    checkpoint_paths(recipe, checkpoint_dir)[(variant.name, seed)],
                    tag=f"{checkpoint_tag}:{variant.name}:{seed}",
                )
            try:
                run = train_variant(
                    variant,
                    recipe,
                    data,
                    source,
                    seed=seed,
                    device=device,
                    on_epoch=(lambda rec, label=label: on_epoch(label, rec)) if on_epoch else None,
                    on_step=on_step,
                    checkpoint=checkpoint,
                )
            except TrainError as err:
                if not comparing:
                    raise
                # A variant that diverges is a result of the comparison, not a reason to lose the others.
                run = VariantRun(variant=variant, seed=seed, error=str(err))
                log(f"transfer: {label} failed: {err}")
            runs[variant.name].append(run)
            if run.error is None:
                log(
                    f"transfer: {label}: val AUC {_fmt(run.val_auc)}, test AUC {_fmt(run.test_auc)} "
                    f"({run.result.wall_s:.0f} s)"
                )
        # Select on the mean val AUC over seeds; within the chosen variant, its best val run goes on.
        # A variant with a failed seed cannot be chosen; one without a val AUC (a single-class val split) only if
        # nothing else can.
        ok = [run for run in runs[variant.name] if run.error is None]
        vals = [run.val_auc if run.val_auc is not None else -math.inf for run in ok]
        if len(ok) == transfer.repeats and (best is None or float(np.mean(vals)) > best_mean):
            best_mean, best = float(np.mean(vals)), ok[int(np.argmax(vals))]
        for run in (run for rs in runs.values() for run in rs):
            if run is not best:
                run.model = None  # free the weights of runs that can no longer be selected
    if best is None:
        raise TrainError(
            "transfer: no variant produced a validation AUC; see the errors above (lower train.lr, or check the data)"
        )
    training = {
        "history": best.result.history,
        "best_epoch": best.result.best_epoch,
        "best_val_auc": best.result.best_val_auc,
        "wall_s": round(best.result.wall_s, 2),
        "variant": best.variant.name,
        "init": best.variant.init,
        "strategy": best.variant.strategy,
        "seed": best.seed,
        "phases": best.phases,
        "initialisation": best.init_record,
        # What trained it: a clinic auditing the model sees whether a GPU, autocast or channels_last were involved.
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "amp": recipe.train.amp,
        "channels_last": recipe.train.channels_last,
        "fast_training": loop.fast_training(),
    }
    table = None
    if recipe.transfer is not None or recipe.model.pretrained != "none":
        table = transfer_table(runs, transfer, best, source)
    return TransferOutcome(model=best.model, training=training, table=table)


def checkpoint_paths(recipe: Recipe, folder: Path) -> dict[tuple[str, int], Path]:
    """Epoch-checkpoint file of every (variant, seed) run: ``epoch-checkpoint.pt`` when there is one run."""
    transfer = recipe.effective_transfer()
    runs = [(i, v.name, recipe.seed + r) for i, v in enumerate(transfer.variants()) for r in range(transfer.repeats)]
    if len(runs) == 1:
        return {(runs[0][1], runs[0][2]): folder / "epoch-checkpoint.pt"}
    return {(name, seed): folder / f"epoch-checkpoint-v{i}-seed{seed}.pt" for i, name, seed in runs}


def _log_source(source: SourceWeights, recipe: Recipe, num_classes: int, log: Callable[[str], None]) -> None:
    probe = get_model(recipe.model.arch, num_classes=num_classes)
    loaded = apply_source_weights(probe, source)
    log(
        f"transfer: source {source.kind} {source.file} ({loaded['loaded']}/{loaded['model_tensors']} tensors, missing "
        f"{len(loaded['missing_keys'])}, unexpected {len(loaded['unexpected_keys'])}; classifier "
        f"{loaded['classifier']})"
    )
    for kind in ("missing_keys", "unexpected_keys"):
        if loaded[kind]:
            shown = ", ".join(loaded[kind][:5]) + (" ..." if len(loaded[kind]) > 5 else "")
            log(f"transfer: {kind.replace('_', ' ')}: {shown}")
    if source.details.get("sha256_matches") is False:
        log(
            f"transfer: warning: {source.file.name} does not hash to the sha256 prefix in its name "
            f"({source.details['sha256_prefix_expected']}); it is not the file torchvision published"
        )


def _fmt(x: float | None, sd: float | None = None, digits: int = 3) -> str:
    return num(x, f".{digits}f", sd=sd)


def transfer_table(
    runs: dict[str, list[VariantRun]], transfer: TransferConfig, best: VariantRun, source: SourceWeights | None
) -> dict[str, Any]:
    """report["transfer"]: one row per variant (mean and sd over seeds), the target, the selection and the source."""
    best_vals = [run.val_auc for rs in runs.values() for run in rs if run.val_auc is not None]
    if transfer.target_val_auc is not None:
        target, rule = transfer.target_val_auc, "transfer.target_val_auc"
    else:
        target = round(RELATIVE_TARGET * max(best_vals), 4) if best_vals else None
        rule = f"{RELATIVE_TARGET} x the best val AUC of any run"
    rows = []
    for variant in transfer.variants():
        summaries = [run.summary(target) for run in runs[variant.name]]
        row: dict[str, Any] = {"variant": variant.name, "init": variant.init, "strategy": variant.strategy}
        for key in ("val_auc", "test_auc", "epochs_to_target", "wall_s"):
            row[key], row[f"{key}_sd"] = _mean_sd([s[key] for s in summaries])
        row["target_reached"] = sum(s["epochs_to_target"] is not None for s in summaries)
        row["repeats"] = len(summaries)
        row["selected"] = variant.name == best.variant.name
        row["errors"] = [s["error"] for s in summaries if s["error"]]
        row["runs"] = summaries
        rows.append(row)
    return {
        "columns": list(TABLE_COLUMNS),
        "rows": rows,
        "selected": best.variant.name,
        "selected_seed": best.seed,
        "selected_by": "mean val AUC over seeds (test AUC is reported, never used to choose)",
        "target_val_auc": target,
        "target_rule": rule,
        "repeats": transfer.repeats,
        "source": source.provenance() if source is not None else None,
    }


def table_cells(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The transfer table as text cells (header, rows) for the console, report.md and the README."""
    header = ["variant", "init", "strategy", "val AUC", "test AUC", "epochs to target", "wall s"]
    rows = []
    for row in table["rows"]:
        reached, n = row["target_reached"], row["repeats"]
        if row["epochs_to_target"] is not None:
            to_target = _fmt(row["epochs_to_target"], row["epochs_to_target_sd"], 1)
        else:
            to_target = f"not reached ({reached}/{n})" if reached < n else "-"
        rows.append(
            [
                row["variant"] + (" *" if row["selected"] else ""),
                row["init"],
                row["strategy"],
                _fmt(row["val_auc"], row["val_auc_sd"]),
                _fmt(row["test_auc"], row["test_auc_sd"]),
                to_target,
                _fmt(row["wall_s"], row["wall_s_sd"], 0),
            ]
        )
    return header, rows
