"""Model surgery for transfer learning: freeze / unfreeze, re-initialise, Transfusion mean-var init.

Idea from timm ``timm/utils/model.py`` (``freeze`` / ``unfreeze``): freezing works on modules (usually
``model.blocks()``), and whether BatchNorm running statistics are frozen too is an explicit choice.

A frozen BatchNorm layer is put in eval mode and marked with ``_tl_frozen_bn = True``. ``TlModel.train()``
and :func:`set_train_mode` keep marked layers in eval, so a training loop's ``model.train()`` does not start
updating their running statistics again. The layer stays an ``nn.BatchNorm2d`` (no swap to a
``FrozenBatchNorm2d``), so state_dict keys, NNCF and export see the same model.

``reinit_`` and ``mean_var_init_`` implement two of the Transfusion (Raghu et al., NeurIPS 2019)
baselines: re-drawing some blocks as a fresh model would, and "Mean Var Init", which keeps only the
per-tensor mean and standard deviation of the pretrained weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

FROZEN_BN_ATTR = "_tl_frozen_bn"

Modules = nn.Module | Iterable[nn.Module]


def _as_modules(modules: Modules) -> list[nn.Module]:
    """A single module or an iterable of modules as a list; anything else is a TypeError."""
    if isinstance(modules, nn.Module):
        return [modules]
    out = list(modules)
    for item in out:
        if not isinstance(item, nn.Module):
            hint = " (model.blocks() gives (name, module) pairs: pass [m for _, m in model.blocks()])"
            raise TypeError(
                f"expected nn.Module objects, got {type(item).__name__}" + (hint if isinstance(item, tuple) else "")
            )
    return out


def freeze(modules: Modules, *, freeze_bn_stats: bool = True) -> None:
    """Stop training the parameters of ``modules`` (``requires_grad = False``).

    With ``freeze_bn_stats`` (the default) every BatchNorm layer inside is also put in eval mode and
    marked, so its running mean/var stay as they are (the pretrained statistics) even after
    ``model.train()``. With ``freeze_bn_stats=False`` the BN affine parameters are frozen but the running
    statistics keep adapting to the new data whenever the model is in train mode.
    """
    for module in _as_modules(modules):
        for param in module.parameters():
            param.requires_grad_(False)
        if freeze_bn_stats:
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    setattr(sub, FROZEN_BN_ATTR, True)
                    sub.eval()


def unfreeze(modules: Modules) -> None:
    """Train the parameters of ``modules`` again (``requires_grad = True``) and unmark frozen BatchNorm.

    BatchNorm layers keep their current mode until the next ``model.train()`` / :func:`set_train_mode`
    (a module cannot know whether its model is training); call one of them after unfreezing.
    """
    for module in _as_modules(modules):
        for param in module.parameters():
            param.requires_grad_(True)
        for sub in module.modules():
            if getattr(sub, FROZEN_BN_ATTR, False):
                setattr(sub, FROZEN_BN_ATTR, False)


def keep_frozen_bn_in_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer that :func:`freeze` marked back in eval mode."""
    for sub in model.modules():
        if getattr(sub, FROZEN_BN_ATTR, False):
            sub.eval()


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, keeping BatchNorm layers frozen by :func:`freeze` in eval mode.

    ``TlModel.train`` already does this; use this function for any other module (e.g. a wrapper around a
    ``TlModel``) so the rule does not depend on which ``train`` is called.
    """
    model.train(mode)
    keep_frozen_bn_in_eval(model)
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters with ``requires_grad``, in model order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _fill_(tensor: torch.Tensor, sample: torch.Tensor) -> None:
    """Copy ``sample`` (drawn on the generator's device, float32) into ``tensor`` in place."""
    with torch.no_grad():
        tensor.copy_(sample.to(device=tensor.device, dtype=tensor.dtype))


def _empty_like_on(tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Random numbers are drawn on the generator's device (a CPU generator cannot fill a CUDA tensor),
    # so a given seed gives the same weights on every device.
    device = generator.device if generator is not None else tensor.device
    return torch.empty(tensor.shape, device=device, dtype=torch.float32)


def reinit_(module: nn.Module, *, generator: torch.Generator | None = None) -> None:
    """Re-initialise every conv / linear / norm layer in ``module`` as a freshly built model would.

    - Conv: Kaiming normal, ``mode="fan_out"``, ReLU gain (torchvision's ResNet / MobileNet / EfficientNet
      and our CBR init); bias zero.
    - Linear: PyTorch's default ``nn.Linear`` init (Kaiming uniform with ``a=sqrt(5)``, bias
      U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
    - BatchNorm: weight 1, bias 0, running mean 0, running var 1, ``num_batches_tracked`` 0.
      Other norms with affine parameters (GroupNorm, LayerNorm): weight 1, bias 0.

    ``generator`` makes the draw reproducible; without it the global RNG is used.
    """
    for sub in module.modules():
        if isinstance(sub, _ConvNd):
            sample = _empty_like_on(sub.weight, generator)
            nn.init.kaiming_normal_(sample, mode="fan_out", nonlinearity="relu", generator=generator)
            _fill_(sub.weight, sample)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Linear):
            sample = _empty_like_on(sub.weight, generator)
            nn.init.kaiming_uniform_(sample, a=math.sqrt(5), generator=generator)
            _fill_(sub.weight, sample)
            if sub.bias is not None:
                bound = 1.0 / math.sqrt(sub.in_features) if sub.in_features > 0 else 0.0
                bias = _empty_like_on(sub.bias, generator).uniform_(-bound, bound, generator=generator)
                _fill_(sub.bias, bias)
        elif isinstance(sub, _BatchNorm):
            sub.reset_parameters()  # weight 1, bias 0, running stats reset
        elif isinstance(sub, (nn.GroupNorm, nn.LayerNorm)):
            sub.reset_parameters()


def mean_var_init_(module: nn.Module, *, generator: torch.Generator) -> None:
    """Transfusion "Mean Var Init": re-draw each conv / linear weight i.i.d. from N(mean, std) of itself.

    For every conv and linear layer in ``module`` the weight tensor (and the bias, when present) is
    replaced by i.i.d. samples from a normal distribution with the mean and standard deviation of that
    same (usually pretrained) tensor. The scale of each layer is kept, the learned structure is not.
    BatchNorm parameters and statistics are kept as they are. A one-element tensor keeps its value
    (its standard deviation is undefined; zero is used).
    """
    for sub in module.modules():
        if not isinstance(sub, (_ConvNd, nn.Linear)):
            continue
        for tensor in (sub.weight, sub.bias):
            if tensor is None or tensor.numel() == 0:
                continue
            values = tensor.detach().double()
            mean = values.mean().item()
            std = values.std().item() if tensor.numel() > 1 else 0.0
            sample = _empty_like_on(tensor, generator).normal_(mean=mean, std=std, generator=generator)
            _fill_(tensor, sample)
