"""Model size and compute: parameter count and multiply-accumulates (MACs) of one forward pass.

MACs are counted with forward hooks on a single all-zeros image, so they follow the model's real forward
(skipped layers, reshapes, SE blocks) rather than a static description:

- Conv (any dimension): ``output elements * (in_channels / groups) * prod(kernel_size)``;
- transposed conv: ``input elements * (out_channels / groups) * prod(kernel_size)``;
- Linear: ``in_features * out_features`` per output row (``output elements * in_features``).

Biases, BatchNorm, activations, pooling and element-wise additions are not counted (as in the
torchvision / timm / paper tables, where "FLOPs" means these MACs). One MAC is ~2 FLOPs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


def count_params(model: nn.Module) -> int:
    """All parameters of ``model`` (trainable or frozen), each shared tensor counted once."""
    return sum(param.numel() for param in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a ``(1, in_channels, input_size, input_size)`` image.

    Runs the model in eval mode under ``torch.no_grad`` on zeros (on the model's device and dtype), then
    puts every submodule back in the train/eval mode it was in (frozen BatchNorm stays frozen).
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    total = 0

    def conv_hook(module: _ConvNd, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            total += inputs[0].numel() * (module.out_channels // module.groups) * kernel
        else:
            total += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    modes = {module: module.training for module in model.modules()}
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, _ConvNd):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(linear_hook))
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return total
