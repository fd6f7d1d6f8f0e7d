"""The model registry, the TlModel contract (blocks / classifier), and parameter / MAC counts."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn

from tlcompile.errors import ModelError
from tlcompile.models import (
    ModelInfo,
    TlModel,
    count_macs,
    count_params,
    freeze,
    get_model,
    list_models,
    model_info,
    register_model,
)

ALL_MODELS = [
    "cbr_large_t",
    "cbr_large_w",
    "cbr_small",
    "cbr_tiny",
    "efficientnet_b0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet18",
    "resnet50",
]
TORCHVISION_MODELS = [name for name in ALL_MODELS if not name.startswith("cbr")]

EXPECTED_BLOCKS = {
    "cbr_large_t": ["layer1", "layer2", "layer3", "layer4", "layer5"],
    "cbr_large_w": ["layer1", "layer2", "layer3", "layer4"],
    "cbr_small": ["layer1", "layer2", "layer3", "layer4"],
    "cbr_tiny": ["layer1", "layer2", "layer3", "layer4"],
    "efficientnet_b0": ["stem", *[f"stage{i}" for i in range(1, 8)], "last_conv"],
    "mobilenet_v2": ["stem", *[f"stage{i}" for i in range(1, 8)], "last_conv"],
    "mobilenet_v3_large": ["stem", *[f"stage{i}" for i in range(1, 7)], "last_conv", "pre_logits"],
    "mobilenet_v3_small": ["stem", *[f"stage{i}" for i in range(1, 6)], "last_conv", "pre_logits"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["stem", "layer1", "layer2", "layer3", "layer4"],
}


@pytest.fixture(scope="module")
def models_2() -> dict[str, TlModel]:
    """One 2-class model of every architecture, in eval mode (built once for this module)."""
    torch.manual_seed(0)
    return {name: get_model(name, num_classes=2).eval() for name in ALL_MODELS}


def _images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


# --- registry -------------------------------------------------------------------------------------


def test_list_models_is_sorted_and_complete() -> None:
    assert list_models() == ALL_MODELS


def test_model_info() -> None:
    info = model_info("cbr_small")
    assert isinstance(info, ModelInfo)
    assert (info.name, info.family, info.default_size) == ("cbr_small", "cbr", 224)
    assert "CBR-Small" in info.description
    assert {model_info(n).family for n in ALL_MODELS} == {"cbr", "mobilenet", "efficientnet", "resnet"}


def test_duplicate_registration_raises_and_keeps_the_original() -> None:
    with pytest.raises(ValueError, match="'cbr_small' is already registered"):

        @register_model("cbr_small", family="cbr", description="impostor", default_size=32)
        def impostor(*, num_classes: int) -> TlModel:  # pragma: no cover - never called
            raise AssertionError

    assert "impostor" not in model_info("cbr_small").description
    assert get_model("cbr_small", num_classes=2).arch == "cbr_small"


def test_unknown_model_lists_the_known_ones() -> None:
    expected = f"'mobilenet_v9' is not a known model; known: {', '.join(ALL_MODELS)}"
    with pytest.raises(ModelError) as excinfo:
        get_model("mobilenet_v9", num_classes=2)
    assert str(excinfo.value) == expected
    with pytest.raises(ModelError, match="'mobilenet_v9' is not a known model"):
        model_info("mobilenet_v9")


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True, "2"])
def test_bad_num_classes_is_a_model_error(num_classes: object) -> None:
    with pytest.raises(ModelError, match=r"num_classes for model 'cbr_small' must be an int >= 1"):
        get_model("cbr_small", num_classes=num_classes)


def test_builder_arguments_are_checked() -> None:
    with pytest.raises(
        ModelError, match=r"'resnet18' does not accept the arguments \['dropout'\]; it accepts: only num_classes"
    ):
        get_model("resnet18", num_classes=2, dropout=0.5)
    with pytest.raises(
        ModelError, match=r"'mobilenet_v2' does not accept the arguments \['widht'\]; it accepts: dropout"
    ):
        get_model("mobilenet_v2", num_classes=2, widht=0.5)
    model = get_model("mobilenet_v3_small", num_classes=2, dropout=0.5)
    assert model.net.classifier[2].p == 0.5


# --- the TlModel contract ------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_builds_and_forwards(name: str, num_classes: int, models_2: dict[str, TlModel]) -> None:
    model = models_2[name] if num_classes == 2 else get_model(name, num_classes=num_classes).eval()
    assert isinstance(model, TlModel) and isinstance(model, nn.Module)
    assert (model.arch, model.num_classes) == (name, num_classes)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == num_classes
    with torch.no_grad():
        logits = model(_images(64))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_blocks_are_the_models_own_modules_in_order(name: str, models_2: dict[str, TlModel]) -> None:
    model = models_2[name]
    blocks = model.blocks()
    assert [block_name for block_name, _ in blocks] == EXPECTED_BLOCKS[name]

    module_ids = {id(m) for m in model.modules()}
    classifier = model.get_classifier()
    for block_name, block in blocks:
        # A block is a submodule, or an unregistered container of submodules (plus parameter-free glue
        # such as nn.Flatten): never a copy.
        if id(block) not in module_ids:
            for child in block.children():
                assert id(child) in module_ids or not any(True for _ in child.parameters()), (block_name, child)
        assert classifier not in list(block.modules()), block_name

    # Blocks and classifier partition the parameters: disjoint, and together all of them.
    param_index = {id(p): i for i, p in enumerate(model.parameters())}
    block_params = [[id(p) for p in block.parameters()] for _, block in blocks]
    flat = [pid for params in block_params for pid in params]
    classifier_params = [id(p) for p in classifier.parameters()]
    assert len(flat) == len(set(flat))
    assert set(flat).isdisjoint(classifier_params)
    assert set(flat) | set(classifier_params) == set(param_index)

    # Input -> output order: each block's parameters come after the previous block's.
    firsts = [min(param_index[pid] for pid in params) for params in block_params]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_applying_the_blocks_in_order_gives_the_classifier_input(name: str, models_2: dict[str, TlModel]) -> None:
    model = models_2[name]
    captured: list[torch.Tensor] = []
    handle = model.get_classifier().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    x = _images(64)
    try:
        with torch.no_grad():
            model(x)
            features = x
            for _, block in model.blocks():
                features = block(features)
    finally:
        handle.remove()
    pooled = features.mean(dim=(2, 3)) if features.dim() == 4 else features  # (N, C)
    torch.testing.assert_close(pooled, captured[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cbr_small", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "resnet18"])
def test_reset_classifier(name: str) -> None:
    model = get_model(name, num_classes=2).eval()
    old = model.get_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(7)
    new = model.get_classifier()
    assert new is not old and old not in list(model.modules())
    assert (new.in_features, new.out_features, model.num_classes) == (old.in_features, 7, 7)
    assert new.weight.requires_grad and new.bias is not None
    with torch.no_grad():
        assert model(_images(64)).shape == (2, 7)
    after = model.state_dict()
    classifier_keys = {k for k in before if k not in after or after[k].shape != before[k].shape}
    assert len(classifier_keys) == 2  # weight and bias of the final Linear, nothing else changed
    assert all(torch.equal(before[k], after[k]) for k in before if k not in classifier_keys)
    with pytest.raises(ModelError):
        model.reset_classifier(0)


# --- torchvision wrappers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_imagenet_state_dict_loads_into_net(name: str) -> None:
    imagenet = torchvision.models.get_model(name, weights=None).state_dict()  # stands in for the hub file
    model = get_model(name, num_classes=1000)
    assert all(key.startswith("net.") for key in model.state_dict())
    model.net.load_state_dict(imagenet, strict=True)

    two_class = get_model(name, num_classes=2)
    classifier = [k for k, v in two_class.net.state_dict().items() if v.shape != imagenet[k].shape]
    assert len(classifier) == 2  # only the final Linear differs in shape
    trunk = {k: v for k, v in imagenet.items() if k not in classifier}
    result = two_class.net.load_state_dict(trunk, strict=False)
    assert sorted(result.missing_keys) == sorted(classifier) and not result.unexpected_keys


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_weights_enum_names_the_hub_file(name: str, models_2: dict[str, TlModel]) -> None:
    model = models_2[name]
    assert model.torchvision_name == name
    weights = torchvision.models.get_weight(model.torchvision_weights_enum)
    assert weights is torchvision.models.get_model_weights(name).IMAGENET1K_V1
    assert os.path.basename(weights.url).endswith(".pth")


def test_mobilenet_v3_head_keeps_torchvision_structure(models_2: dict[str, TlModel]) -> None:
    classifier = models_2["mobilenet_v3_small"].net.classifier
    assert [type(m) for m in classifier] == [nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear]
    assert (classifier[0].out_features, classifier[3].in_features, classifier[3].out_features) == (1024, 1024, 2)


# --- CBR -----------------------------------------------------------------------------------------


def test_cbr_structure(models_2: dict[str, TlModel]) -> None:
    large_t = models_2["cbr_large_t"]
    pools = [hasattr(layer, "pool") for _, layer in large_t.blocks()]
    assert pools == [True, True, True, True, False]
    assert [layer.conv.out_channels for _, layer in large_t.blocks()] == [32, 64, 128, 256, 512]
    tiny = models_2["cbr_tiny"]
    assert {layer.conv.kernel_size for _, layer in tiny.blocks()} == {(5, 5)}
    for _, layer in tiny.blocks():
        assert layer.conv.bias is None and layer.conv.padding == (2, 2) and layer.conv.stride == (1, 1)
    with torch.no_grad():
        # 64 px: four halvings -> 4 x 4 for cbr_small; cbr_large_t's last conv keeps 4 x 4
        assert models_2["cbr_small"].features(_images(64)).shape == (2, 256, 4, 4)
        assert large_t.features(_images(64)).shape == (2, 512, 4, 4)


# --- complexity ----------------------------------------------------------------------------------


def test_cbr_small_params_and_macs_by_formula() -> None:
    model = get_model("cbr_small", num_classes=2)
    channels = [3, 32, 64, 128, 256]
    convs = [(channels[i], channels[i + 1]) for i in range(4)]
    expected_params = sum(cin * cout * 49 + 2 * cout for cin, cout in convs) + 256 * 2 + 2
    assert count_params(model) == expected_params

    # 32 px input: conv i runs at 32 / 2**i px (stride 1, 'same'), each pool then halves it.
    sides = [32, 16, 8, 4]
    expected_macs = sum(side * side * cout * cin * 49 for side, (cin, cout) in zip(sides, convs, strict=True)) + 256 * 2
    assert count_macs(model, 32) == expected_macs


def _on_meta(name: str) -> TlModel:
    """A model on the meta device: shapes without storage, so counting MACs at 224 px costs ~nothing."""
    with torch.device("meta"):
        return get_model(name, num_classes=1000)


def test_resnet18_params_and_macs() -> None:
    model = _on_meta("resnet18")
    assert count_params(model) == 11_689_512
    assert count_macs(model, 224) == pytest.approx(1.82e9, rel=0.02)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_macs_match_torchvision_published_ops(name: str) -> None:
    """torchvision's weight metadata publishes GFLOPS (really GMACs, rounded to 3 decimals) at 224 px."""
    model = _on_meta(name)
    published = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta["_ops"]
    assert count_macs(model, 224) / 1e9 == pytest.approx(published, abs=0.0006)
    if name == "mobilenet_v3_small":
        assert count_macs(model, 224) == pytest.approx(0.06e9, rel=0.1)


def test_count_macs_restores_each_modules_mode() -> None:
    model = get_model("resnet18", num_classes=2)
    freeze([model.net.layer1])
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    assert not model.net.layer1[0].bn1.training and model.net.bn1.training
    count_macs(model, 32)
    assert {name: m.training for name, m in model.named_modules()} == modes

    model.eval()
    count_macs(model, 32)
    assert not any(m.training for m in model.modules())


def test_count_macs_counts_linear_leading_dims_and_grouped_convs() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(3, 6, 3, padding=1, groups=3)  # (1, 6, 8, 8): 384 * 1 * 9
            self.linear = nn.Linear(8, 4)  # on (1, 6, 8, 8) along the last dim: 48 rows of 8 -> 4

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.depthwise(x))

    assert count_macs(Tiny(), 8) == (6 * 8 * 8) * (3 // 3) * 9 + 48 * (8 * 4)
    with pytest.raises(ValueError, match="input_size"):
        count_macs(Tiny(), 0)
