"""The model registry and the base class every tlcompile model is.

Idea from torchvision ``torchvision/models/_api.py``: a builder is a plain function with keyword-only,
typed arguments, registered under a unique name with ``@register_model``. ``get_model(name, ...)`` is the
one way the rest of tlcompile makes a model.

The registry itself (``_BUILDERS`` / ``_INFOS``) is the only module-level state in this package: it is
filled once, at import time, by the ``@register_model`` decorators in ``cbr.py`` and ``zoo.py``, and never
changed afterwards.

Every model is a :class:`TlModel` (an ``nn.Module`` subclass: NNCF cannot wrap a bare top-level
``nn.Sequential``). Besides ``forward`` it answers three questions the transfer-learning, pruning and
export code ask (idea from timm):

- ``blocks()``: the feature-extractor blocks, input -> output, for freezing / re-initialising by depth;
- ``get_classifier()``: the final ``nn.Linear`` (logits);
- ``reset_classifier(num_classes)``: a fresh final ``nn.Linear`` for a new label set.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from tlcompile.errors import ModelError
from tlcompile.models.surgery import keep_frozen_bn_in_eval


class TlModel(nn.Module):
    """Base class of every registered model: an image classifier ``(N, C, H, W) -> (N, num_classes)`` logits.

    Subclasses set ``_classifier_path`` (the dotted name of the final ``nn.Linear``, e.g. ``"fc"`` or
    ``"net.classifier.3"``) and implement :meth:`blocks` and :meth:`forward`.

    Attributes:
        arch: the registry name this model was built under (e.g. ``"cbr_small"``).
        num_classes: the number of logits the classifier produces.
    """

    _classifier_path: str = "fc"

    def __init__(self, *, arch: str, num_classes: int) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The feature-extractor blocks as ``(name, module)`` pairs, in input -> output order.

        The modules are the model's own modules (or small ``nn.Sequential`` containers holding references
        to them, made afresh on each call and not registered on the model), never copies: freezing or
        re-initialising a block changes the model. Applying the blocks in order to an image gives the
        features that, after global average pooling, go into :meth:`get_classifier`. The classifier is
        never part of a block; together, the blocks and the classifier hold every parameter of the model.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement blocks()")

    def get_classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` that produces the logits."""
        return self.get_submodule(self._classifier_path)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final ``nn.Linear`` by a freshly initialised one with ``num_classes`` outputs.

        The new layer keeps ``in_features``, the bias setting, device and dtype of the old one, and is
        initialised as the model's family initialises a new model (see :meth:`_init_classifier`).
        """
        _check_num_classes(num_classes, self.arch)
        old = self.get_classifier()
        new = nn.Linear(
            old.in_features,
            num_classes,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        self._init_classifier(new)
        parent_path, _, attr = self._classifier_path.rpartition(".")
        parent = self.get_submodule(parent_path) if parent_path else self
        setattr(parent, attr, new)
        self.num_classes = num_classes

    def _init_classifier(self, linear: nn.Linear) -> None:
        """Initialise a new classifier; default: PyTorch's own ``nn.Linear`` initialisation (already done)."""

    def train(self, mode: bool = True) -> TlModel:
        """``nn.Module.train``, except that BatchNorm layers frozen by :func:`surgery.freeze` stay in eval.

        Without this, a training loop's ``model.train()`` would silently start updating the running
        statistics of frozen BatchNorm layers.
        """
        super().train(mode)
        keep_frozen_bn_in_eval(self)
        return self

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}"


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model without building it."""

    name: str
    family: str  # "cbr", "mobilenet", "efficientnet", "resnet"
    description: str
    default_size: int  # the input side (pixels) the model was designed / pretrained for


ModelBuilder = Callable[..., TlModel]
_B = TypeVar("_B", bound=ModelBuilder)

_BUILDERS: dict[str, ModelBuilder] = {}
_INFOS: dict[str, ModelInfo] = {}


def register_model(name: str, *, family: str, description: str, default_size: int) -> Callable[[_B], _B]:
    """Decorator: register ``builder(*, num_classes: int, **kwargs) -> TlModel`` under ``name``.

    Raises:
        ValueError: ``name`` is already registered (a programming error, not a user error).
    """
    if not isinstance(default_size, int) or default_size < 1:
        raise ValueError(f"default_size of model {name!r} must be a positive int, got {default_size!r}")

    def decorator(builder: _B) -> _B:
        if name in _BUILDERS:
            raise ValueError(
                f"model {name!r} is already registered (by {_BUILDERS[name].__module__}.{_BUILDERS[name].__qualname__})"
            )
        _BUILDERS[name] = builder
        _INFOS[name] = ModelInfo(name=name, family=family, description=description, default_size=default_size)
        return builder

    return decorator


def list_models() -> list[str]:
    """The names of all registered models, sorted."""
    return sorted(_BUILDERS)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model; an unknown name raises :class:`ModelError`."""
    _check_known(name)
    return _INFOS[name]


def get_model(name: str, *, num_classes: int, **kwargs: object) -> TlModel:
    """Build the registered model ``name`` with ``num_classes`` logits, randomly initialised.

    ``kwargs`` go to the builder (e.g. ``dropout=0.3`` for the torchvision models); an argument the
    builder does not take raises :class:`ModelError` naming the ones it does take.
    """
    _check_known(name)
    _check_num_classes(num_classes, name)
    builder = _BUILDERS[name]
    try:
        inspect.signature(builder).bind(num_classes=num_classes, **kwargs)
    except TypeError as err:
        accepted = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
        raise ModelError(
            f"model {name!r} does not accept the arguments {sorted(kwargs)}; "
            f"it accepts: {', '.join(accepted) if accepted else 'only num_classes'} ({err})"
        ) from err
    model = builder(num_classes=num_classes, **kwargs)
    if not isinstance(model, TlModel) or model.arch != name or model.num_classes != num_classes:
        raise TypeError(f"builder of {name!r} returned {type(model).__name__} with wrong arch/num_classes")
    return model


def _check_known(name: str) -> None:
    if name not in _BUILDERS:
        raise ModelError(f"{name!r} is not a known model; known: {', '.join(list_models())}")


def _check_num_classes(num_classes: object, name: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes for model {name!r} must be an int >= 1, got {num_classes!r}")
