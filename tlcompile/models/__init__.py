"""Model registry: Transfusion CBR nets and torchvision ImageNet architectures as :class:`TlModel`.

``get_model(name, num_classes=...)`` builds any registered model (random init, nothing downloaded);
``list_models()`` names them. ``surgery`` freezes / re-initialises blocks for transfer learning;
``complexity`` counts parameters and MACs. This package is in the training half: it needs torch.
"""

from __future__ import annotations

from tlcompile.errors import missing_dependency

try:
    import torch  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the install
    raise missing_dependency("torch", err=err) from err

from tlcompile.compat import require_safe_versions  # noqa: E402

require_safe_versions()

# Importing cbr and zoo registers their models.
from tlcompile.models import cbr, zoo  # noqa: F401, E402
from tlcompile.models.complexity import count_macs, count_params  # noqa: E402
from tlcompile.models.registry import ModelInfo, TlModel, get_model, list_models, model_info, register_model  # noqa: E402
from tlcompile.models.surgery import (  # noqa: E402
    freeze,
    mean_var_init_,
    reinit_,
    set_train_mode,
    trainable_parameter_names,
    unfreeze,
)

__all__ = [
    "ModelInfo",
    "TlModel",
    "count_macs",
    "count_params",
    "freeze",
    "get_model",
    "list_models",
    "mean_var_init_",
    "model_info",
    "register_model",
    "reinit_",
    "set_train_mode",
    "trainable_parameter_names",
    "unfreeze",
]
