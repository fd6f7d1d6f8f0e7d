"""The Transfusion CBR family (Raghu, Zhang, Kleinberg, Bengio: "Transfusion: Understanding Transfer
Learning for Medical Imaging", NeurIPS 2019).

Small plain CNNs the paper found to match ImageNet ResNet-50 / Inception-v3 transfer on retinal fundus
images at a fraction of the size. Each layer is conv (bias-free, 'same' padding, stride 1) -> BatchNorm ->
ReLU -> 3x3 max-pool with stride 2 and padding 1 (which halves the resolution, rounding up); the network
ends with global average pooling and one Linear layer.

| model       | kernel | conv channels            | max-pool after         |
|-------------|--------|--------------------------|------------------------|
| cbr_large_t | 7x7    | 32-64-128-256-512        | layers 1-4 (not 5)     |
| cbr_large_w | 7x7    | 64-128-256-512           | every layer            |
| cbr_small   | 7x7    | 32-64-128-256            | every layer            |
| cbr_tiny    | 5x5    | 64-128-256-512           | every layer            |

Blocks (``model.blocks()``): ``layer1``, ``layer2``, ... -- one per conv-BN-ReLU(-pool) layer.
state_dict keys: ``features.layer1.conv.weight``, ``features.layer1.bn.running_mean``, ..., ``fc.weight``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from tlcompile.models.registry import TlModel, register_model


class CBRLayer(nn.Sequential):
    """conv(k x k, bias=False, 'same') -> BN -> ReLU [-> MaxPool 3x3/2, pad 1]:
    (N, C_in, H, W) -> (N, C_out, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, pool: bool) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=True),
        )
        if pool:
            # H' = floor((H - 1) / 2) + 1 = ceil(H / 2)
            layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        super().__init__(layers)


class CBRNet(TlModel):
    """A Transfusion CBR network: ``features`` (the CBR layers) -> global average ``pool`` -> ``fc``."""

    _classifier_path = "fc"

    def __init__(
        self,
        *,
        arch: str,
        num_classes: int,
        channels: Sequence[int],
        kernel_size: int,
        pooled_layers: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__(arch=arch, num_classes=num_classes)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        previous = in_channels
        for index, width in enumerate(channels):
            layers[f"layer{index + 1}"] = CBRLayer(previous, width, kernel_size, pool=index < pooled_layers)
            previous = width
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return list(self.features.named_children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C_last, H', W')
        x = self.pool(x)  # (N, C_last, 1, 1)
        return self.fc(torch.flatten(x, 1))  # (N, num_classes)


@register_model(
    "cbr_large_t",
    family="cbr",
    description="Transfusion CBR-LargeT: 7x7 convs 32-64-128-256-512, max-pool after the first four (8.5M params, 5.3 "
    "GMACs at 224 px)",
    default_size=224,
)
def cbr_large_t(*, num_classes: int) -> CBRNet:
    return CBRNet(
        arch="cbr_large_t", num_classes=num_classes, channels=(32, 64, 128, 256, 512), kernel_size=7, pooled_layers=4
    )


@register_model(
    "cbr_large_w",
    family="cbr",
    description="Transfusion CBR-LargeW: 7x7 convs 64-128-256-512, max-pool after each (8.4M params, 15.6 GMACs at "
    "224 px)",
    default_size=224,
)
def cbr_large_w(*, num_classes: int) -> CBRNet:
    return CBRNet(
        arch="cbr_large_w", num_classes=num_classes, channels=(64, 128, 256, 512), kernel_size=7, pooled_layers=4
    )


@register_model(
    "cbr_small",
    family="cbr",
    description="Transfusion CBR-Small: 7x7 convs 32-64-128-256, max-pool after each (2.1M params, 4.0 GMACs at 224 "
    "px)",
    default_size=224,
)
def cbr_small(*, num_classes: int) -> CBRNet:
    return CBRNet(
        arch="cbr_small", num_classes=num_classes, channels=(32, 64, 128, 256), kernel_size=7, pooled_layers=4
    )


@register_model(
    "cbr_tiny",
    family="cbr",
    description="Transfusion CBR-Tiny: 5x5 convs 64-128-256-512, max-pool after each (4.3M params, 7.9 GMACs at 224 "
    "px)",
    default_size=224,
)
def cbr_tiny(*, num_classes: int) -> CBRNet:
    return CBRNet(
        arch="cbr_tiny", num_classes=num_classes, channels=(64, 128, 256, 512), kernel_size=5, pooled_layers=4
    )
