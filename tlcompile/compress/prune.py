"""Pruning: structured channel removal (torch-pruning) and NNCF unstructured magnitude pruning.

Structured (``prune.method: channel``): torch-pruning builds the dependency graph of the model (residual adds,
depthwise convs, squeeze-excitation, concatenations), ranks channel *groups* -- every tensor slice that must go
together -- by L2 weight magnitude or first-order Taylor |w * dL/dw|, and physically removes the weakest, so every
conv/linear/BatchNorm really gets narrower and the exported graph does less work. The classifier's outputs (the
classes) and the layers in ``prune.keep`` are never touched.

A pruned model no longer matches its registry architecture, and a pickled module is not an option (nothing is ever
unpickled). :func:`channel_plan` records the widths of every conv / linear / norm layer as JSON;
:func:`build_pruned_model` makes the registry model and :func:`apply_channel_plan` narrows it to the plan before the
state_dict is loaded -- so a pruned checkpoint is two plain files (``architecture.json`` + ``pruned.pt``).

Unstructured (``prune.method: magnitude``): NNCF masks the smallest-|w| weights of every conv/linear (per layer or
globally) on a ratio schedule over the fine-tuning epochs. The dense tensors keep their shape: the file compresses
well, but dense CPU kernels do the same work, which the bench shows honestly.
"""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from tlcompile.compat import decline_vendor_telemetry
from tlcompile.errors import CompressionError, missing_dependency
from tlcompile.models import get_model
from tlcompile.models.registry import TlModel
from tlcompile.recipe import PruneConfig
from tlcompile.train.loop import reestimate_batchnorm

PLAN_FORMAT = "tlcompile-channel-plan/1"


# ------------------------------------------------------------------------------------------- channel plan
def channel_plan(model: nn.Module) -> dict[str, Any]:
    """The width of every conv, linear and norm layer, by module path: enough to rebuild a pruned architecture."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            layers[name] = {
                "kind": "conv",
                "in_channels": module.in_channels,
                "out_channels": module.out_channels,
                "groups": module.groups,
            }
        elif isinstance(module, nn.Linear):
            layers[name] = {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
        elif isinstance(module, _BatchNorm):
            layers[name] = {"kind": "norm", "num_features": module.num_features}
    arch = getattr(model, "arch", type(model).__name__)
    return {"format": PLAN_FORMAT, "arch": arch, "num_classes": getattr(model, "num_classes", None), "layers": layers}


def _resized(param: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if param is None or tuple(param.shape) == shape:
        return param
    fresh = torch.zeros(shape, dtype=param.dtype, device=param.device)
    return nn.Parameter(fresh, requires_grad=param.requires_grad) if isinstance(param, nn.Parameter) else fresh


def apply_channel_plan(model: nn.Module, plan: dict[str, Any], *, source: str = "architecture.json") -> None:
    """Narrow ``model``'s layers in place to the widths in ``plan`` (values are zeros: load the state_dict next)."""
    if plan.get("format") != PLAN_FORMAT:
        raise CompressionError(f"{source}: format {plan.get('format')!r} is not a channel plan; valid: {PLAN_FORMAT!r}")
    modules = dict(model.named_modules())
    for name, spec in plan["layers"].items():
        module = modules.get(name)
        if module is None:
            raise CompressionError(
                f"{source}: layer '{name}' is not in model {getattr(model, 'arch', type(model).__name__)}; the plan "
                "belongs to another architecture"
            )
        kind = spec["kind"]
        if kind == "conv" and isinstance(module, _ConvNd):
            module.in_channels, module.out_channels, module.groups = (
                spec["in_channels"],
                spec["out_channels"],
                spec["groups"],
            )
            shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
            module.weight = _resized(module.weight, shape)
            if module.bias is not None:
                module.bias = _resized(module.bias, (module.out_channels,))
        elif kind == "linear" and isinstance(module, nn.Linear):
            module.in_features, module.out_features = spec["in_features"], spec["out_features"]
            module.weight = _resized(module.weight, (module.out_features, module.in_features))
            if module.bias is not None:
                module.bias = _resized(module.bias, (module.out_features,))
        elif kind == "norm" and isinstance(module, _BatchNorm):
            module.num_features = n = spec["num_features"]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, attr) is not None:
                    setattr(module, attr, _resized(getattr(module, attr), (n,)))
        else:
            raise CompressionError(
                f"{source}: layer '{name}' is a {type(module).__name__} in the model but '{kind}' in the plan"
            )


def build_pruned_model(
    plan: dict[str, Any], state_dict: dict[str, torch.Tensor], *, source: str = "architecture.json"
) -> TlModel:
    """The registry model narrowed to ``plan`` with ``state_dict`` loaded (strict)."""
    model = get_model(plan["arch"], num_classes=plan["num_classes"])
    apply_channel_plan(model, plan, source=source)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise CompressionError(
            f"{source}: the saved weights do not fit the pruned architecture: {str(err).splitlines()[0]}"
        ) from err
    return model


def pruned_widths(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[int]]:
    """Conv / linear layers whose output width changed: ``{path: [before, after]}``."""
    out = {}
    for name, spec in after["layers"].items():
        key = "out_channels" if spec["kind"] == "conv" else "out_features" if spec["kind"] == "linear" else None
        if key and before["layers"][name][key] != spec[key]:
            out[name] = [before["layers"][name][key], spec[key]]
    return out


# ------------------------------------------------------------------------------------------- layer names
def resolve_layers(model: TlModel, names: Iterable[str], *, key: str) -> list[tuple[str, nn.Module]]:
    """Modules named by block name (``model.blocks()``) or module path; an unknown name raises naming ``key``."""
    blocks = dict(model.blocks())
    modules = dict(model.named_modules())
    out = []
    for name in names:
        module = blocks.get(name, modules.get(name))
        if module is None or name == "":
            raise CompressionError(
                f"{key}: '{name}' is neither a block nor a module of {model.arch}; valid: a block name "
                f"({', '.join(blocks)}) or a module path such as "
                f"'{next(n for n, m in model.named_modules() if isinstance(m, _ConvNd))}'"
            )
        out.append((name, module))
    return out


# ------------------------------------------------------------------------------------------- channel pruning
class ChannelPruner:
    """Iterative structured pruning of ``model`` in place: ``steps`` calls of :meth:`step` reach ``ratio``.

    Step k removes channels until each layer (local) or the network (global) has lost ``ratio * k / steps``; the
    caller adapts BatchNorm and fine-tunes between steps. Raises :class:`CompressionError` for a model whose graph
    torch-pruning cannot analyse.
    """

    def __init__(self, model: TlModel, cfg: PruneConfig, example_input: torch.Tensor) -> None:
        try:
            import torch_pruning as tp
        except ImportError as err:
            raise missing_dependency("torch-pruning", err=err) from err
        self.model = model
        self.cfg = cfg
        self.example_input = example_input
        kept = [model.get_classifier()] + [m for _, m in resolve_layers(model, cfg.keep, key="prune.keep")]
        ratios = {
            m: cfg.layer_ratios[name] for name, m in resolve_layers(model, cfg.layer_ratios, key="prune.layer_ratios")
        }
        importance = (
            tp.importance.GroupTaylorImportance()
            if cfg.importance == "taylor"
            else tp.importance.GroupMagnitudeImportance(p=2)
        )
        try:
            self.pruner = tp.pruner.MetaPruner(
                model,
                example_input,
                importance=importance,
                global_pruning=cfg.scope == "global",
                pruning_ratio=cfg.ratio,
                pruning_ratio_dict=ratios or None,
                max_pruning_ratio=cfg.max_layer_ratio if cfg.scope == "global" else 1.0,
                iterative_steps=cfg.steps,
                ignored_layers=kept,
                round_to=cfg.round_to,
            )
        except Exception as err:  # torch-pruning raises plain Python errors from deep inside its tracer
            raise CompressionError(
                f"channel pruning cannot analyse {model.arch}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}; valid: prune.method magnitude (unstructured), or "
                "prune.keep listing the blocks it fails on"
            ) from err
        self.steps_done = 0

    def step(self, gradient_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """One pruning step. Taylor importance needs ``gradient_batches`` (inputs, targets) to accumulate dL/dw."""
        model = self.model
        if self.cfg.importance == "taylor":
            if gradient_batches is None:
                raise ValueError("Taylor importance needs gradient batches")
            was_training = model.training
            model.eval()  # gradients of the deployed (eval-mode) function, BatchNorm statistics untouched
            model.zero_grad(set_to_none=True)
            for xb, yb in gradient_batches:
                nn.functional.cross_entropy(model(xb), yb).backward()
            model.train(was_training)
        try:
            if self.cfg.scope == "global":
                # torch-pruning's global ranking removes every channel under one threshold and checks
                # max_pruning_ratio only before a step, so one step can empty a layer: cap each group here.
                for group in self.pruner.step(interactive=True):
                    idxs = self._capped(group)
                    if idxs:
                        group.prune(idxs=idxs)
            else:
                self.pruner.step()
        except Exception as err:
            raise CompressionError(
                f"channel pruning of {model.arch} failed at step {self.steps_done + 1}: {type(err).__name__}: {err}; "
                "valid: a smaller prune.ratio, prune.keep for the failing block, or prune.method magnitude"
            ) from err
        finally:
            model.zero_grad(set_to_none=True)
        self.steps_done += 1
        _check_forward(model, self.example_input)

    def _capped(self, group) -> list[int]:
        """The group's channels to remove, limited so no coupled layer keeps fewer than (1 - max_layer_ratio) of its
        original channels (rounded up to ``round_to``); the least important go first."""
        pruner, dg = self.pruner, self.pruner.DG
        root_dep, idxs = group[0]
        allowed = len(idxs)
        for dep, _ in group:
            module = dep.target.module
            if dg.is_out_channel_pruning_fn(dep.handler) and module in pruner.layer_init_out_ch:
                current, initial = dg.get_out_channels(module), pruner.layer_init_out_ch[module]
            elif dg.is_in_channel_pruning_fn(dep.handler) and module in pruner.layer_init_in_ch:
                current, initial = dg.get_in_channels(module), pruner.layer_init_in_ch[module]
            else:
                continue
            if current is None or initial is None:
                continue
            floor = math.ceil(initial * (1 - self.cfg.max_layer_ratio))
            if self.cfg.round_to:
                floor = math.ceil(floor / self.cfg.round_to) * self.cfg.round_to
            allowed = min(allowed, max(0, current - floor))
        if allowed >= len(idxs):
            return list(idxs)
        if allowed == 0:
            return []
        module, handler = root_dep.target.module, root_dep.handler
        channels = dg.get_out_channels(module) if dg.is_out_channel_pruning_fn(handler) else dg.get_in_channels(module)
        importance = pruner.estimate_importance(dg.get_pruning_group(module, handler, list(range(channels))))
        return sorted(idxs, key=lambda i: float(importance[i]))[:allowed]


def _check_forward(model: TlModel, example_input: torch.Tensor) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(example_input)
    model.train(was_training)
    expected = (example_input.shape[0], model.num_classes)
    if tuple(out.shape) != expected:
        raise CompressionError(
            f"after pruning {model.arch} outputs {tuple(out.shape)}, not {expected}; this model cannot be "
            "channel-pruned as configured"
        )


# ------------------------------------------------------------------------------------------- BatchNorm
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (an exact average, not a momentum blend).

    After channels are removed (or weights zeroed) the activations feeding each BatchNorm change, and its stored
    statistics describe a network that no longer exists. Returns the number of BatchNorm layers adapted
    (:func:`tlcompile.train.loop.reestimate_batchnorm`, which precise BN after each training epoch uses too).
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    return reestimate_batchnorm(model, norms, batches)


# ------------------------------------------------------------------------------------------- magnitude (NNCF)
def magnitude_mode(scope: str):
    import nncf  # first imported by start_magnitude_pruning, its one caller, after declining NNCF's telemetry

    return (
        nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL
        if scope == "global"
        else nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_LOCAL
    )


def magnitude_schedule(cfg: PruneConfig) -> dict[int, float]:
    """Epoch -> sparsity: step k of ``cfg.steps`` (each ``finetune_epochs`` long) reaches ``ratio * k / steps``."""
    every = max(cfg.finetune_epochs, 1)
    return {k * every: round(cfg.ratio * (k + 1) / cfg.steps, 6) for k in range(cfg.steps)}


def start_magnitude_pruning(model: TlModel, cfg: PruneConfig, example_input: torch.Tensor):
    """Wrap ``model`` with NNCF magnitude masks at the first step's ratio; returns (model, scheduler).

    The scheduler's ``step(epoch)`` raises the sparsity along :func:`magnitude_schedule`. The classifier is kept
    dense (its few weights decide between the classes).
    """
    decline_vendor_telemetry()  # before NNCF is imported, as in quantize.import_nncf
    import nncf

    try:
        from nncf.torch.function_hook.pruning.magnitude.schedulers import MultiStepMagnitudePruningScheduler
    except ImportError as err:
        raise missing_dependency("nncf>=3.3 (nncf.prune)", err=err) from err
    schedule = magnitude_schedule(cfg)
    classifier_path = model._classifier_path
    try:
        pruned = nncf.prune(
            model,
            magnitude_mode(cfg.scope),
            ratio=schedule[0],
            ignored_scope=nncf.IgnoredScope(patterns=[f"{classifier_path.replace('.', '/')}/.*"], validate=False),
            examples_inputs=example_input,
        )
    except Exception as err:
        raise CompressionError(f"NNCF magnitude pruning cannot wrap {model.arch}: {type(err).__name__}: {err}") from err
    scheduler = MultiStepMagnitudePruningScheduler(pruned, mode=magnitude_mode(cfg.scope), steps=schedule)
    return pruned, scheduler


def strip_magnitude_pruning(pruned: nn.Module, arch: str, num_classes: int) -> TlModel:
    """Bake the masks into the weights (zeros) and return a plain registry model holding them.

    (``nncf.strip(..., IN_PLACE)`` does the same but imports torchao, which the training extra does not need.)
    """
    from nncf.torch.function_hook.pruning.magnitude.algo import get_pruned_modules

    model = get_model(arch, num_classes=num_classes)
    own = model.state_dict()
    state = {k: v.detach().clone() for k, v in pruned.state_dict().items() if k in own}
    for weight_name, mask in get_pruned_modules(pruned).items():  # weight path -> its UnstructuredPruningMask
        if weight_name not in state:
            raise CompressionError(f"NNCF pruned '{weight_name}', which is not a weight of {arch}")
        state[weight_name] = state[weight_name] * mask.binary_mask.to(state[weight_name].dtype)
    model.load_state_dict(state, strict=True)
    return model.to(next(pruned.parameters()).device)


# ------------------------------------------------------------------------------------------- statistics
def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """Zeros among conv / linear weights: overall and per layer (what unstructured pruning achieved)."""
    total = zeros = 0
    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, (_ConvNd, nn.Linear)):
            w = module.weight.detach()
            z = int((w == 0).sum())
            per_layer[name] = round(z / w.numel(), 4)
            total += w.numel()
            zeros += z
    return {"sparsity": round(zeros / max(total, 1), 4), "weights": total, "zeros": zeros, "per_layer": per_layer}


def compressed_weight_bytes(model: nn.Module) -> int:
    """gzip size of the float32 weights: what zeroed weights save when the model is stored or shipped compressed."""
    buf = io.BytesIO()
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            buf.write(tensor.detach().cpu().numpy().astype(np.float32).tobytes())
    return len(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
