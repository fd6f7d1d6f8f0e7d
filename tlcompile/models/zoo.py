"""torchvision ImageNet architectures, wrapped as :class:`TlModel`.

Each wrapper holds the torchvision model as ``self.net``, so state_dict keys are ``net.<torchvision key>``
and a torchvision ImageNet state_dict loads into ``model.net``. Models are always built with
``weights=None`` (random init, nothing downloaded); the transfer-learning code loads the ImageNet weights
from the torch hub cache. It finds the file from ``model.torchvision_weights_enum``::

    # e.g. MobileNet_V3_Small_Weights.IMAGENET1K_V1
    weights = torchvision.models.get_weight(model.torchvision_weights_enum)
    filename = os.path.basename(weights.url)  # in $TORCH_HOME/hub/checkpoints/

torchvision builds the head with ``num_classes`` outputs and keeps its default head structure; only the
final Linear depends on ``num_classes`` (MobileNetV3: Linear-Hardswish-Dropout-Linear, only the last
Linear changes), so every other ImageNet tensor loads unchanged.

Blocks (``model.blocks()``), input -> output; a "stage" is a run of consecutive inverted-residual /
MBConv blocks with the same output width (the rows of the architecture tables in the papers, which
torchvision's configs follow); a block made of several torchvision modules is an ``nn.Sequential``
holding references to them:

- ``mobilenet_v2``: ``stem`` (features[0], 3x3 conv s2), ``stage1`` .. ``stage7`` (features[1], [2:4],
  [4:7], [7:11], [11:14], [14:17], [17]; widths 16-24-32-64-96-160-320), ``last_conv`` (features[18],
  1x1 conv to 1280).
- ``mobilenet_v3_small``: ``stem`` (features[0]), ``stage1`` .. ``stage5`` (features[1], [2:4], [4:7],
  [7:9], [9:12]; widths 16-24-40-48-96), ``last_conv`` (features[12], 1x1 conv to 576), ``pre_logits``
  (avgpool, flatten, classifier[0:3] = Linear 576->1024, Hardswish, Dropout).
- ``mobilenet_v3_large``: ``stem`` (features[0]), ``stage1`` .. ``stage6`` (features[1], [2:4], [4:7],
  [7:11], [11:13], [13:16]; widths 16-24-40-80-112-160), ``last_conv`` (features[16], 1x1 conv to 960),
  ``pre_logits`` (avgpool, flatten, Linear 960->1280, Hardswish, Dropout).
- ``efficientnet_b0``: ``stem`` (features[0]), ``stage1`` .. ``stage7`` (features[1] .. features[7], the
  seven MBConv stages; widths 16-24-40-80-112-192-320), ``last_conv`` (features[8], 1x1 conv to 1280).
- ``resnet18`` / ``resnet50``: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` .. ``layer4``.

The MobileNetV3 ``pre_logits`` block outputs (N, C) features, not a feature map; it is a block so that
the blocks plus the classifier hold every parameter (freezing all blocks leaves only the classifier).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tlcompile.errors import missing_dependency
from tlcompile.models.registry import TlModel, register_model


def _build_torchvision(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    try:
        import torchvision
    except ImportError as err:
        raise missing_dependency("torchvision", err=err) from err
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _stages_by_width(modules: list[nn.Module]) -> list[list[nn.Module]]:
    """Group consecutive inverted-residual / MBConv blocks with the same ``out_channels`` into stages."""
    stages: list[list[nn.Module]] = []
    width = None
    for module in modules:
        if module.out_channels != width:
            stages.append([])
            width = module.out_channels
        stages[-1].append(module)
    return stages


def _group(modules: list[nn.Module]) -> nn.Module:
    """One module as itself; several as an unregistered ``nn.Sequential`` holding references to them."""
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


class TorchvisionModel(TlModel):
    """Base of the torchvision wrappers: ``self.net`` is the torchvision model; ``forward`` is its forward."""

    def __init__(self, *, arch: str, num_classes: int, weights_enum: str, **kwargs: Any) -> None:
        super().__init__(arch=arch, num_classes=num_classes)
        self.net = _build_torchvision(arch, num_classes=num_classes, **kwargs)
        self.torchvision_name = arch
        self.torchvision_weights_enum = weights_enum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, 3, H, W) -> (N, num_classes)


class _FeaturesModel(TorchvisionModel):
    """MobileNetV2/V3 and EfficientNet: ``net.features`` = stem, stages..., last 1x1 conv."""

    def _feature_blocks(self) -> list[tuple[str, nn.Module]]:
        features = list(self.net.features.children())
        stem, middle, last_conv = features[0], features[1:-1], features[-1]
        # EfficientNet's features[1..7] are already one nn.Sequential per stage.
        stages = [[m] for m in middle] if self.arch.startswith("efficientnet") else _stages_by_width(middle)
        named = [("stem", stem)]
        named += [(f"stage{i + 1}", _group(stage)) for i, stage in enumerate(stages)]
        named.append(("last_conv", last_conv))
        return named


class MobileNetV2(_FeaturesModel):
    _classifier_path = "net.classifier.1"  # classifier = Dropout, Linear

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return self._feature_blocks()

    def _init_classifier(self, linear: nn.Linear) -> None:
        nn.init.normal_(linear.weight, 0, 0.01)  # as torchvision's MobileNetV2
        nn.init.zeros_(linear.bias)


class MobileNetV3(_FeaturesModel):
    _classifier_path = "net.classifier.3"  # classifier = Linear, Hardswish, Dropout, Linear

    def blocks(self) -> list[tuple[str, nn.Module]]:
        classifier = self.net.classifier
        pre_logits = nn.Sequential(self.net.avgpool, nn.Flatten(1), classifier[0], classifier[1], classifier[2])
        return [*self._feature_blocks(), ("pre_logits", pre_logits)]

    def _init_classifier(self, linear: nn.Linear) -> None:
        nn.init.normal_(linear.weight, 0, 0.01)  # as torchvision's MobileNetV3
        nn.init.zeros_(linear.bias)


class EfficientNet(_FeaturesModel):
    _classifier_path = "net.classifier.1"  # classifier = Dropout, Linear

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return self._feature_blocks()

    def _init_classifier(self, linear: nn.Linear) -> None:
        init_range = 1.0 / linear.out_features**0.5  # as torchvision's EfficientNet
        nn.init.uniform_(linear.weight, -init_range, init_range)
        nn.init.zeros_(linear.bias)


class ResNet(TorchvisionModel):
    _classifier_path = "net.fc"  # PyTorch's default nn.Linear init, as torchvision's ResNet

    def blocks(self) -> list[tuple[str, nn.Module]]:
        net = self.net
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [
            ("stem", stem),
            ("layer1", net.layer1),
            ("layer2", net.layer2),
            ("layer3", net.layer3),
            ("layer4", net.layer4),
        ]


@register_model(
    "mobilenet_v2",
    family="mobilenet",
    description="torchvision MobileNetV2 (with the 1000-class ImageNet head: 3.5M params, 0.30 GMACs at 224 px)",
    default_size=224,
)
def mobilenet_v2(*, num_classes: int, dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(
        arch="mobilenet_v2", num_classes=num_classes, weights_enum="MobileNet_V2_Weights.IMAGENET1K_V1", dropout=dropout
    )


@register_model(
    "mobilenet_v3_small",
    family="mobilenet",
    description="torchvision MobileNetV3-Small (with the 1000-class ImageNet head: 2.5M params, 0.06 GMACs at 224 px)",
    default_size=224,
)
def mobilenet_v3_small(*, num_classes: int, dropout: float = 0.2) -> MobileNetV3:
    return MobileNetV3(
        arch="mobilenet_v3_small",
        num_classes=num_classes,
        weights_enum="MobileNet_V3_Small_Weights.IMAGENET1K_V1",
        dropout=dropout,
    )


@register_model(
    "mobilenet_v3_large",
    family="mobilenet",
    description="torchvision MobileNetV3-Large (with the 1000-class ImageNet head: 5.5M params, 0.22 GMACs at 224 px)",
    default_size=224,
)
def mobilenet_v3_large(*, num_classes: int, dropout: float = 0.2) -> MobileNetV3:
    return MobileNetV3(
        arch="mobilenet_v3_large",
        num_classes=num_classes,
        weights_enum="MobileNet_V3_Large_Weights.IMAGENET1K_V1",
        dropout=dropout,
    )


@register_model(
    "efficientnet_b0",
    family="efficientnet",
    description="torchvision EfficientNet-B0 (with the 1000-class ImageNet head: 5.3M params, 0.39 GMACs at 224 px)",
    default_size=224,
)
def efficientnet_b0(*, num_classes: int, dropout: float = 0.2) -> EfficientNet:
    return EfficientNet(
        arch="efficientnet_b0",
        num_classes=num_classes,
        weights_enum="EfficientNet_B0_Weights.IMAGENET1K_V1",
        dropout=dropout,
    )


@register_model(
    "resnet18",
    family="resnet",
    description="torchvision ResNet-18 (with the 1000-class ImageNet head: 11.7M params, 1.8 GMACs at 224 px)",
    default_size=224,
)
def resnet18(*, num_classes: int) -> ResNet:
    return ResNet(arch="resnet18", num_classes=num_classes, weights_enum="ResNet18_Weights.IMAGENET1K_V1")


@register_model(
    "resnet50",
    family="resnet",
    description="torchvision ResNet-50 (with the 1000-class ImageNet head: 25.6M params, 4.1 GMACs at 224 px)",
    default_size=224,
)
def resnet50(*, num_classes: int) -> ResNet:
    return ResNet(arch="resnet50", num_classes=num_classes, weights_enum="ResNet50_Weights.IMAGENET1K_V1")
