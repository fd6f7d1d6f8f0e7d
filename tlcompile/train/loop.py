"""Supervised training: small plain functions (idea: torchvision references/classification/train.py).

Data lives in memory as preprocessed uint8 (N, S, S, 3) arrays; :func:`iterate_batches` normalises batches with the
same mean/std as :func:`tlcompile.runtime.preprocess.to_input`, so training sees what the runtime will feed.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlcompile.errors import TrainError
from tlcompile.evaluate.metrics import referable_score, referable_truth, roc_auc
from tlcompile.recipe import TrainConfig
from tlcompile.runtime.preprocess import PreprocessSpec
from tlcompile.train import depthwise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is 'cuda' but no CUDA device is available here; valid: cpu, auto")
    return torch.device(name)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips (left/right eyes, camera orientation) and brightness jitter (+-10%)."""
    n = x.shape[0]
    hflip = torch.rand(n, generator=generator) < 0.5
    vflip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(hflip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    x = torch.where(vflip.view(n, 1, 1, 1).to(x.device), x.flip(-2), x)
    gain = (0.9 + 0.2 * torch.rand(n, generator=generator)).view(n, 1, 1, 1).to(x.device)
    return (x * gain).clamp_(0.0, 1.0)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, norms: list[nn.Module], batches: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of ``norms`` (BatchNorm layers of ``model``) by their exact statistics over
    ``batches`` (a cumulative average, not a momentum blend). Every other module runs in eval mode (no dropout, other
    BatchNorm layers untouched); each module's mode and momentum are restored afterwards. Returns ``len(norms)``."""
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for xb in batches:
            model(xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(norms)


def precise_batchnorm(
    model: nn.Module,
    images: np.ndarray,
    spec: PreprocessSpec,
    *,
    device: torch.device,
    batch_size: int,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    channels_last: bool = False,
) -> int:
    """Precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): replace the running statistics of
    the BatchNorm layers that training updates by the exact statistics of ``images`` (un-augmented) under the current
    weights; the model is left in eval mode. Returns how many layers were re-estimated.

    The momentum average that training keeps mixes statistics of weights from many steps ago; on small data sets it
    can be far from what the final weights produce (the README gives the quickstart's AUC with and without this).
    Layers that training leaves alone (frozen blocks, BN frozen for fine-tuning) are not touched.
    """
    (set_train_mode or nn.Module.train)(model)
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    model.eval()
    batches = (
        xb
        for xb, _ in iterate_batches(
            images,
            np.zeros(len(images), dtype=np.int64),
            spec,
            batch_size=batch_size,
            device=device,
            channels_last=channels_last,
        )
    )
    return reestimate_batchnorm(model, norms, batches)


def precise_bn_indices(count: int, total: int, seed: int) -> np.ndarray:
    """The fixed, seeded subset of training images precise BatchNorm uses (all of them when ``count >= total``)."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng([seed, 7]).choice(total, size=count, replace=False))


def distributed_context() -> tuple[int, int]:
    """(rank, world_size) of the torch.distributed process group, or (0, 1) when not running under torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of each batch over ``n`` samples. A last batch of a single sample is merged into the one before
    it (one batch of ``batch_size + 1``): BatchNorm in training mode cannot normalise one image whose features are
    1x1 (most models at small inputs), so 65 images at batch 32 give batches of 32 and 33. Deterministic, and every
    image is still seen once per epoch."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps one epoch of ``n`` samples takes (see :func:`batch_bounds`)."""
    return len(batch_bounds(n, batch_size))


def iterate_batches(
    images: np.ndarray,
    targets: np.ndarray,
    spec: PreprocessSpec,
    *,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
    generator: torch.Generator | None = None,
    augment_batches: bool = False,
    shard: tuple[int, int] = (0, 1),
    channels_last: bool = False,
    sample_weights: np.ndarray | None = None,
    loader_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches from uint8 images (an array, or a split of the disk store: then read by
    ``loader_workers`` processes, a batch at a time).

    ``shard=(rank, world)``: every rank draws the same permutation and takes every world-th sample, cut to a
    multiple of ``world`` so all ranks run the same number of steps (DDP needs that); with ``batch_size`` per rank
    of ``batch / world`` the averaged gradient equals the single-process one (BatchNorm statistics aside).
    ``sample_weights`` (with shuffle; data.balance: weighted_sampler): the epoch draws len(images) indices with
    replacement, each with its weight, instead of a permutation.
    """
    if shuffle and rng is not None and sample_weights is not None:
        order = rng.choice(len(images), size=len(images), replace=True, p=sample_weights)
    else:
        order = rng.permutation(len(images)) if shuffle and rng is not None else np.arange(len(images))
    rank, world = shard
    if world > 1:
        order = order[: len(order) - len(order) % world][rank::world]
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    pin = device.type == "cuda"
    bounds = batch_bounds(len(order), batch_size)
    from tlcompile.data.store import read_batches, store_path

    path = store_path(images)
    if path is not None:  # data.store: disk: the same rows, read a batch at a time by loader processes
        hosts = read_batches(path, [order[start:end] for start, end in bounds], loader_workers)
    else:
        hosts = (torch.from_numpy(images[order[start:end]]) for start, end in bounds)
    for (start, end), host in zip(bounds, hosts, strict=True):
        idx = order[start:end]
        if pin:  # page-locked host memory lets the copy overlap with compute
            host = host.pin_memory()
        xb = host.to(device, non_blocking=pin).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        if augment_batches and generator is not None:
            xb = augment(xb, generator)
        xb = (xb - mean) / std
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb, torch.from_numpy(targets[idx]).to(device, non_blocking=pin)


#: Set to 1, training, fine-tuning and QAT on the CPU run faster kernels that compute the same update in another float
#: order: the optimizer's fused update and :mod:`tlcompile.train.depthwise`'s weight gradient (8-14% faster epochs).
#: Off by default: over 20 quickstart seeds the fp32 test AUC averaged 0.3 pp lower with them (README, "The training
#: step"), which reads as trajectory noise but was not shown to be.
FAST_TRAINING_VARIABLE = "TLCOMPILE_FAST_TRAINING"


def fast_training() -> bool:
    """Whether :data:`FAST_TRAINING_VARIABLE` asks for the faster training kernels (unset or 0: no, 1: yes)."""
    value = os.environ.get(FAST_TRAINING_VARIABLE, "0")
    if value not in ("0", "1", ""):
        raise TrainError(f"environment variable {FAST_TRAINING_VARIABLE}={value!r} is not valid; valid: 0 or 1")
    return value == "1"


def make_optimizer(
    params, *, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainError("no trainable parameters: every layer is frozen")
    # With fast_training(): one fused kernel for the whole update instead of a dozen tensor operations per parameter
    # list: AdamW's step on mobilenet_v3_small 6.0 -> 1.1 ms, SGD's 2.2 -> 0.7 ms (2-core Xeon), against a training
    # step of ~90 ms. The same update up to the order of float32 operations.
    # None otherwise, as before: torch then picks its foreach update (an explicit False would pick the per-tensor loop).
    fused = True if fast_training() and all(p.device.type in ("cpu", "cuda") for p in params) else None
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0, fused=fused
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epochs: int, steps_per_epoch: int):
    """Per-step schedule: cosine decays to zero over all steps; step decays by gamma every step_size epochs."""
    total = max(1, epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cfg.gamma ** ((s // steps_per_epoch) // cfg.step_size)
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (n / (k * n_c)); a class absent from training gets weight 0."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_one_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over ``batches``. ``amp``: 'bf16' or 'fp16' autocast (fp16 needs ``scaler`` against underflow)."""
    (set_train_mode or (lambda m: m.train()))(model)
    total, count = 0.0, 0
    fast = fast_training()  # read once, not per step
    for xb, yb in batches:
        optimizer.zero_grad(set_to_none=True)
        with (
            torch.autocast(
                device_type=xb.device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp in AMP_DTYPES
            ),
            depthwise.for_training(xb.device, amp, enabled=fast),
        ):
            loss = loss_fn(model(xb).float(), yb)
        if not torch.isfinite(loss):
            raise TrainError(
                f"the training loss became {loss.item()}; lower train.lr (now {optimizer.param_groups[0]['lr']:.3g})"
            )
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * xb.shape[0]
        count += xb.shape[0]
        if on_step:
            on_step(loss.item())
    return total / max(count, 1)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray,
    spec: PreprocessSpec,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> np.ndarray:
    """Logits (N, C) as numpy for preprocessed uint8 images, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    dummy = np.zeros(len(images), dtype=np.int64)
    for xb, _ in iterate_batches(images, dummy, spec, batch_size=batch_size, device=device):
        outs.append(model(xb).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), np.float32)


def validation_auc(logits: np.ndarray, targets: np.ndarray) -> float:
    return roc_auc(referable_truth(targets, logits.shape[1]), referable_score(logits))


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_auc: float = float("nan")
    wall_s: float = 0.0


@dataclass
class EpochCheckpoint:
    """Everything needed to continue training after a kill: written atomically at the end of every epoch.

    Holds model, optimizer and scheduler states, the best state so far, the history and the global torch RNG
    (dropout draws from it); shuffling and augmentation are re-seeded from (seed, epoch), so a resumed run ends
    with the same weights as an uninterrupted one. ``tag`` (the recipe fingerprint) keeps a checkpoint of another
    recipe from being resumed. Loaded with ``weights_only=True``: tensors and plain Python values only.
    """

    path: Path
    tag: str = ""

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        from tlcompile.checkpoint import load_state

        state = load_state(self.path)
        return state if state.get("tag") == self.tag else None

    def save(self, state: dict[str, Any]) -> None:
        from tlcompile.checkpoint import save_state

        save_state(self.path, {**state, "tag": self.tag})


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit` trains: what one call of it runs (a phase of a run), all but the model, data and callbacks.

    ``start_epoch``: the epoch number this call begins at (0-based; later phases of one run continue the count).
    ``set_train_mode``: puts the model in training mode (default ``nn.Module.train``; e.g. keep BatchNorm frozen).
    ``amp``: 'bf16' or 'fp16' autocast, or 'none'. ``sample_weights`` (data.balance: weighted_sampler): each epoch
    draws its indices with replacement by these weights instead of a permutation. ``precise_bn`` > 0: after each
    epoch, before validation, the BatchNorm statistics of the layers training updates are re-estimated exactly on
    that many un-augmented training images (:func:`precise_batchnorm`). ``checkpoint``: save the state after every
    epoch and continue from it (see :func:`fit`).
    """

    epochs: int
    batch_size: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seed: int
    device: torch.device
    augment_batches: bool = True
    set_train_mode: Callable[[nn.Module], None] | None = None
    start_epoch: int = 0
    amp: str = "none"
    channels_last: bool = False
    sample_weights: np.ndarray | None = None
    precise_bn: int = 0
    checkpoint: EpochCheckpoint | None = None
    loader_workers: int = 0


@dataclass(frozen=True)
class FitCallbacks:
    """What :func:`fit` calls while it trains: ``on_epoch`` with each epoch's record (epoch, loss, val_auc, lr,
    seconds; it may add keys, they land in the history), ``on_step`` with each step's loss, ``on_val`` (before
    ``on_epoch``) with the eval-mode val logits the epoch's AUC came from, so a caller judging the same state on val
    need not predict it again."""

    on_epoch: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[float], None] | None = None
    on_val: Callable[[np.ndarray], None] | None = None


def fit(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    spec: PreprocessSpec,
    settings: FitSettings,
    callbacks: FitCallbacks | None = None,
    *,
    previous: tuple[FitResult, dict[str, torch.Tensor] | None] | None = None,
) -> tuple[FitResult, dict[str, torch.Tensor]]:
    """Train epochs ``start_epoch .. start_epoch + epochs - 1`` (``settings``), evaluating val AUC after each;
    returns the history and the best state_dict. Several calls may continue one run (phases), passing the
    ``previous`` call's (result, best state) on.

    Shuffling and augmentation draw from generators seeded by (seed, epoch), so a resumed run replays exactly.
    With ``settings.checkpoint``, the state is saved after every epoch and, when a saved state is further along
    than ``start_epoch``, training continues from it (a phase that had already finished is skipped).
    Under torchrun (an initialised process group) the model is wrapped in DistributedDataParallel, each rank
    trains on its shard with ``batch_size / world`` images per step, and only rank 0 writes the checkpoint.
    """
    s, cb = settings, callbacks or FitCallbacks()
    result, best_state = previous or (FitResult(), None)
    first_epoch = s.start_epoch
    saved = s.checkpoint.load() if s.checkpoint else None
    if saved is not None and saved["epoch"] > s.start_epoch:
        result = FitResult(**saved["result"])
        best_state = saved["best_state"]
        if saved["epoch"] >= s.start_epoch + s.epochs:
            return result, best_state
        model.load_state_dict(saved["model"])
        s.optimizer.load_state_dict(saved["optimizer"])
        if s.scheduler is not None:
            s.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        first_epoch = saved["epoch"]
    else:
        saved = None  # nothing to continue from in this call
    t0 = time.perf_counter()
    x_tr, y_tr = train
    x_val, y_val = val
    rank, world = distributed_context()
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Wrapped per call: phases change which parameters train, and DDP fixes its set at construction.
        train_model = DistributedDataParallel(model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(s.device.type) if s.amp == "fp16" else None
    if scaler is not None and saved is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    # The same images on every rank and every epoch: the statistics agree without communication.
    bn_images = x_tr[precise_bn_indices(s.precise_bn, len(x_tr), s.seed)] if s.precise_bn else None
    for epoch in range(first_epoch, s.start_epoch + s.epochs):
        e0 = time.perf_counter()
        rng = np.random.default_rng([s.seed, epoch])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        batches = iterate_batches(
            x_tr,
            y_tr,
            spec,
            batch_size=max(1, s.batch_size // world),
            device=s.device,
            shuffle=True,
            rng=rng,
            generator=gen,
            augment_batches=s.augment_batches,
            shard=(rank, world),
            channels_last=s.channels_last,
            sample_weights=s.sample_weights,
            loader_workers=s.loader_workers,
        )
        loss = train_one_epoch(
            train_model,
            batches,
            s.optimizer,
            s.scheduler,
            s.loss_fn,
            set_train_mode=s.set_train_mode,
            on_step=cb.on_step,
            amp=s.amp,
            scaler=scaler,
        )
        if bn_images is not None:
            precise_batchnorm(
                model,
                bn_images,
                spec,
                device=s.device,
                batch_size=s.batch_size,
                set_train_mode=s.set_train_mode,
                channels_last=s.channels_last,
            )
        val_logits = predict(model, x_val, spec, device=s.device)
        auc = validation_auc(val_logits, y_val)
        record = {
            "epoch": epoch + 1,
            "loss": round(loss, 6),
            "val_auc": round(auc, 6),
            "lr": s.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - e0, 3),
        }
        if world > 1:
            record["world_size"] = world  # loss is rank 0's shard mean; gradients were averaged over all ranks
        result.history.append(record)
        # Strictly better wins (ties keep the earlier epoch); a NaN AUC (one class in val) never beats a real one.
        if best_state is None or (
            not math.isnan(auc) and (math.isnan(result.best_val_auc) or auc > result.best_val_auc)
        ):
            result.best_val_auc, result.best_epoch = auc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        if cb.on_val:
            cb.on_val(val_logits)
        if cb.on_epoch:
            cb.on_epoch(record)
        if s.checkpoint and rank == 0:
            s.checkpoint.save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": s.optimizer.state_dict(),
                    "scheduler": s.scheduler.state_dict() if s.scheduler is not None else {},
                    "best_state": best_state,
                    "result": {**vars(result), "wall_s": result.wall_s + time.perf_counter() - t0},
                    "torch_rng": torch.get_rng_state(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                }
            )
    result.wall_s += time.perf_counter() - t0
    return result, best_state
