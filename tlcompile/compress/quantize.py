"""INT8 with NNCF: BatchNorm folding, post-training quantization as the start, then quantization-aware training.

Choices that make the int8 artifacts fast on *both* CPU runtimes (measured, see benchmarks/compression.py):

- **BatchNorm is folded into the preceding conv before quantization** (:func:`fold_batchnorm`). OpenVINO folds BN
  itself, but ONNX Runtime cannot fold a BN that follows a ``DequantizeLinear`` weight, and a conv with a BN between
  it and its output ``QuantizeLinear`` is not fused into ``QLinearConv``: the unfolded int8 ONNX ran slower than FP32.
  Folding first also means QAT learns the weights the device really runs (no BN re-folding after training).
- **Activations are quantized per tensor** (weights per channel, symmetric, NNCF's CPU preset). NNCF's default puts
  per-channel activation quantizers in front of depthwise convs; ONNX Runtime has no per-channel activation
  ``QLinearConv`` and fell back to float for every depthwise layer of MobileNetV2.

Saved as NNCF's ``get_config`` (JSON) beside the state_dict; :func:`load_quantized` rebuilds the model from the
FP32 architecture with ``nncf.torch.load_from_config`` -- nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from tlcompile.checkpoint import load_state, save_state
from tlcompile.compat import decline_vendor_telemetry
from tlcompile.errors import CompressionError, missing_dependency
from tlcompile.io import atomic_write_json
from tlcompile.models.registry import TlModel
from tlcompile.runtime.preprocess import PreprocessSpec

# Op types whose weights NNCF quantizes: the layers a sensitivity ranking and an FP32 fallback talk about.
_COMPUTE_METATYPES = (
    "PTConv1dMetatype",
    "PTConv2dMetatype",
    "PTConv3dMetatype",
    "PTDepthwiseConv1dSubtype",
    "PTDepthwiseConv2dSubtype",
    "PTDepthwiseConv3dSubtype",
    "PTLinearMetatype",
    "PTMatMulMetatype",
)


def import_nncf():
    """Import nncf (the training extra) with a first-use compile that survives a busy machine, its CPU fake
    quantization routed through :mod:`tlcompile.compress.fused_fq` (one pass per call instead of ~17).

    NNCF compiles its CPU fake-quantization kernels on first use (a C++ build, minutes on a loaded 2-core box) and
    gives up after 60 s by default, leaving a half-built cache; with no timeout it simply finishes. A user's own
    setting of NNCF_EXTENSION_LOAD_TIMEOUT wins.
    """
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    decline_vendor_telemetry()  # NNCF's usage events (Google Analytics): a build of patient images sends nothing
    try:
        import nncf
        import nncf.torch  # noqa: F401
    except ImportError as err:
        raise missing_dependency("nncf", err=err) from err
    from tlcompile.compress import fused_fq

    fused_fq.install()  # one-pass fake quantization on the CPU where it builds; NNCF's own functions otherwise
    return nncf


# ------------------------------------------------------------------------------------------- BatchNorm folding
def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a conv (whose output it alone consumes) into that conv, in place.

    The conv gains the BN's affine transform as weight scale and bias; the BN becomes ``nn.Identity``. Eval-mode
    function unchanged. Returns the folded conv paths. A model torch.fx cannot trace keeps its BatchNorms (the
    result is still correct, just slower in ONNX Runtime) -- an empty list says so.
    """
    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    was_training = model.training
    model.eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: nothing to fold safely
        model.train(was_training)
        return []
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if not (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), _ConvNd)
        ):
            continue
        if len(source.users) != 1 or modules[source.target].transposed:
            continue
        _replace(model, source.target, fuse_conv_bn_eval(modules[source.target], modules[node.target]))
        _replace(model, node.target, nn.Identity())
        folded.append(source.target)
    model.train(was_training)
    return folded


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


# ------------------------------------------------------------------------------------------- PTQ
# Images per NNCF calibration item (see quantize_ptq).
CALIBRATION_BATCH = 32


def keep_fp32_scope(model: TlModel, names: Iterable[str], layer_nodes: Iterable[str] = ()):
    """NNCF ignored scope: modules / blocks named in the recipe (every op under them) plus exact graph nodes."""
    nncf = import_nncf()
    from tlcompile.compress.prune import resolve_layers

    patterns = []
    for _, module in resolve_layers(model, names, key="quantize.keep_fp32"):
        # A block may be an unregistered container of references: name the registered leaf modules inside it.
        inside = {id(m) for m in module.modules()}
        leaves = [p for p, m in model.named_modules() if id(m) in inside and not any(True for _ in m.children())]
        # NNCF node names are the module path with '/' plus the op, e.g. features/layer1/conv/conv2d/0.
        patterns += [re.escape(p.replace(".", "/")) + "/.*" for p in leaves if p]
    return nncf.IgnoredScope(names=sorted(layer_nodes), patterns=patterns, validate=False)


def quantize_ptq(
    model: TlModel,
    calibration_images: np.ndarray,
    spec: PreprocessSpec,
    *,
    device: torch.device,
    ignored_scope=None,
    overflow_fix: str = "enable",
) -> nn.Module:
    """NNCF post-training INT8 of a (BN-folded) model on the calibration images; returns a new NNCF model.

    ``overflow_fix='enable'`` (NNCF's OverflowFix for every layer) keeps each weight within 7 bits ([-64, 63]): on a CPU
    without VNNI the runtimes' int8 kernels add pairs of u8 x s8 products in int16 (AVX2's VPMADDUBSW) and
    255 x 127 x 2 saturates there, 255 x 64 x 2 does not. With NNCF's default (first layer only) the int8 files of
    the quickstart drifted far from the fake-quantized model under an emulated AVX2 CPU
    (tlcompile.runtime.isa_emulation), unlike on AMX; the README's int8 section has the figures.

    The calibration images go to NNCF in equal batches of about ``CALIBRATION_BATCH``
    (:func:`~tlcompile.compress.calibration.equal_batches`): NNCF's statistics hooks cost about as much per forward
    pass as per image, so one image per item made statistics collection ~20x slower than the model's inference
    (README, "Build time"). With ``batchwise_statistics`` the activation ranges are still the mean of per-image
    minima / maxima, and fast bias correction's channel means over equal batches are the per-image means: the same
    statistics as one image per item, up to float summation order.
    """
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

    from tlcompile.compress.calibration import equal_batches

    batches = equal_batches(calibration_images, spec, batch_size=CALIBRATION_BATCH, device=device)
    model = model.eval()
    try:
        return nncf.quantize(
            model,
            nncf.Dataset(batches),
            subset_size=len(batches),  # NNCF counts items (batches), not images
            target_device=nncf.TargetDevice.CPU,
            ignored_scope=ignored_scope,
            advanced_parameters=AdvancedQuantizationParameters(
                # Per-image statistics aggregated over all images, as with one image per item (the default for
                # batches, stated here because the result depends on it).
                batchwise_statistics=True,
                activations_quantization_params=QuantizationParameters(per_channel=False),
                overflow_fix=OverflowFix({"first_layer": "first_layer_only"}.get(overflow_fix, overflow_fix)),
            ),
        )
    except Exception as err:  # NNCF raises its own and plain errors from tracing
        raise CompressionError(
            f"NNCF quantization of {getattr(model, 'arch', type(model).__name__)} failed: {type(err).__name__}: {err}"
        ) from err


def quantizer_hooks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(hook name, NNCF quantizer)`` of every quantizer in an NNCF model (none in a plain torch model)."""
    from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped
    from nncf.torch.quantization.layers import BaseQuantizer

    if not is_wrapped(model):
        return []
    return [(name, hook) for name, hook in get_hook_storage(model).named_hooks() if isinstance(hook, BaseQuantizer)]


def quantizer_summary(model: nn.Module) -> dict[str, Any]:
    """How many weight / activation quantizers, and their modes (what the int8 graph will do)."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name

    weights = activations = per_channel_act = 0
    for name, q in quantizer_hooks(model):
        hook_type, _, port = decode_hook_name(name)
        if hook_type == "pre_hooks" and port > 0:
            weights += 1
        else:
            activations += 1
            per_channel_act += int(q.per_channel)
    return {
        "weight_quantizers": weights,
        "activation_quantizers": activations,
        "per_channel_activations": per_channel_act,
    }


# ------------------------------------------------------------------------------------------- save / load
def save_quantized(model: nn.Module, folder: Path, name: str) -> dict[str, Path]:
    """Write ``{name}.pt`` (state_dict) and ``{name}.nncf.json`` (NNCF config); returns the paths."""
    nncf = import_nncf()
    config = json.loads(json.dumps(nncf.torch.get_config(model)))  # enums are str subclasses: plain JSON types
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights, cfg = folder / f"{name}.pt", folder / f"{name}.nncf.json"
    save_state(weights, state)
    atomic_write_json(cfg, config)
    return {"state_dict": weights, "nncf_config": cfg}


def load_quantized(fp32_model: TlModel, config_path: Path, weights_path: Path, *, device: torch.device) -> nn.Module:
    """Rebuild an NNCF INT8 model: ``fp32_model`` must be the architecture it was quantized from, BN already folded."""
    nncf = import_nncf()
    config = json.loads(config_path.read_text())
    state = load_state(weights_path)
    try:
        model = nncf.torch.load_from_config(fp32_model.to(device).eval(), config)
        model.load_state_dict(state, strict=True)
    except Exception as err:
        raise CompressionError(
            f"{config_path}: cannot rebuild the int8 model: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from err
    return model.eval()


# ------------------------------------------------------------------------------------------- sensitivity
def compute_layers(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[str]]:
    """For each quantized conv/linear node of an NNCF model: the quantizer hooks on its weight and its input path.

    The input path is followed backwards through ops that do not change quantization (pooling, reshapes) until
    a node whose output is quantized -- that quantizer feeds this layer.
    """
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    from nncf.torch.function_hook.wrapper import get_hook_storage

    post: dict[str, list[str]] = {}
    pre: dict[str, list[str]] = {}
    for name, _ in quantizer_hooks(model):
        hook_type, op_name, _ = decode_hook_name(name)
        (pre if hook_type == "pre_hooks" else post).setdefault(op_name, []).append(name)
    # The graph of the same network without quantizers: node names match the hooks' op names.
    bare = copy.deepcopy(model)
    storage = get_hook_storage(bare)
    for name, _ in list(storage.named_hooks()):
        storage.delete_hook(name)
    graph = build_nncf_graph(bare, example_input)
    layers: dict[str, list[str]] = {}
    for node in graph.get_all_nodes():
        if node.metatype.__name__ not in _COMPUTE_METATYPES or node.node_name not in pre:
            continue
        hooks = list(pre[node.node_name])
        frontier = [p for p in graph.get_previous_nodes(node)]
        seen = set()
        while frontier:
            prev = frontier.pop()
            if prev.node_name in seen:
                continue
            seen.add(prev.node_name)
            if prev.node_name in post:
                hooks += post[prev.node_name]
            elif prev.metatype.__name__ not in _COMPUTE_METATYPES and "Const" not in prev.metatype.__name__:
                frontier += graph.get_previous_nodes(prev)
        layers[node.node_name] = sorted(set(hooks))
    return layers


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, reference_logits: np.ndarray, images: np.ndarray, spec: PreprocessSpec, *, device: torch.device
) -> list[dict[str, Any]]:
    """Rank the quantized layers by how much of the int8 model's error (MSE of logits against the FP32 model on
    ``images``) disappears when that one layer runs in FP32; most sensitive first."""
    from tlcompile.train import loop

    model.eval()
    example = torch.zeros(1, 3, spec.size, spec.size, device=device)
    layers = compute_layers(model, example)
    hooks = dict(quantizer_hooks(model))

    def error() -> float:
        return float(np.mean((loop.predict(model, images, spec, device=device) - reference_logits) ** 2))

    base = error()
    ranking = []
    for node, names in layers.items():
        enabled = [hooks[n] for n in names if hooks[n].is_enabled_quantization()]
        for q in enabled:
            q.disable_quantization()
        try:
            ranking.append({"layer": node, "error_removed": base - error()})
        finally:
            for q in enabled:
                q.enable_quantization()
    ranking.sort(key=lambda r: r["error_removed"], reverse=True)
    for r in ranking:
        r["error_removed"] = round(r["error_removed"] / base, 4) if base > 0 else 0.0  # as a fraction of the int8 error
    return ranking
