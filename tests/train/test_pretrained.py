"""Weight sources: ImageNet from the torch hub cache (offline), weight files (tensors only), earlier builds."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torchvision
import yaml

from tests.train.conftest import fake_build, source_like
from tlcompile.errors import ModelError, RecipeError, UnsafeFileError, WeightsNotFoundError
from tlcompile.models import get_model
from tlcompile.models.pretrained import apply_source_weights, imagenet_weights_file, load_weight_source
from tlcompile.recipe import load_recipe, validate_recipe_dict
from tlcompile.train.transfer import initialise_model

HUB_FILE = "mobilenet_v3_small-047dcff4.pth"  # what torchvision's MobileNet_V3_Small_Weights.IMAGENET1K_V1 downloads


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if args else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_imagenet_file_name_is_the_one_torchvision_downloads(torch_home) -> None:
    path, url, enum = imagenet_weights_file(get_model("mobilenet_v3_small", num_classes=2))
    assert path == torch_home / "hub" / "checkpoints" / HUB_FILE
    assert url == torchvision.models.get_weight(enum).url and url.endswith("/" + HUB_FILE)


def test_imagenet_weights_in_torch_home_load_offline(torch_home, offline) -> None:
    torch.manual_seed(5)
    imagenet = torchvision.models.mobilenet_v3_small(weights=None).state_dict()  # stands in for the real file
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet, torch_home / "hub" / "checkpoints" / HUB_FILE)

    model, record = initialise_model(
        "mobilenet_v3_small",
        2,
        "pretrained",
        load_weight_source("imagenet", get_model("mobilenet_v3_small", num_classes=2)),
        seed=0,
    )
    loaded = record["source"]
    state = model.state_dict()
    trunk = [k for k in imagenet if not k.startswith("classifier.3.")]
    for key in trunk:  # torchvision keys live under net. in the wrapper
        assert torch.equal(state["net." + key], imagenet[key]), key
    assert loaded["loaded"] == len(trunk) and loaded["key_rule"] == "add net."
    assert loaded["missing_keys"] == [] and loaded["unexpected_keys"] == []
    assert loaded["classifier_keys_not_loaded"] == ["net.classifier.3.bias", "net.classifier.3.weight"]
    assert "source 1000 classes -> fresh 2-class classifier" in loaded["classifier"]
    assert model.get_classifier().weight.shape == (2, 1024)


def test_imagenet_provenance_flags_a_file_that_is_not_torchvisions(torch_home, offline) -> None:
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        torchvision.models.mobilenet_v3_small(weights=None).state_dict(), torch_home / "hub" / "checkpoints" / HUB_FILE
    )
    source = load_weight_source("imagenet", get_model("mobilenet_v3_small", num_classes=2))
    p = source.provenance()
    assert p["kind"] == "imagenet" and p["sha256_prefix_expected"] == "047dcff4" and p["sha256_matches"] is False
    assert len(p["sha256"]) == 64 and p["num_classes"] == 1000


def test_missing_imagenet_file_is_one_clear_line(torch_home, offline) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_weight_source("imagenet", get_model("mobilenet_v3_small", num_classes=2))
    msg = str(info.value)
    assert "\n" not in msg
    folder = torch_home / "hub" / "checkpoints"
    assert f"'{HUB_FILE}' in the folder '{folder}'" in msg
    assert f"$TORCH_HOME is {torch_home}" in msg
    assert "https://download.pytorch.org/models/" + HUB_FILE in msg and "copy the file into that folder" in msg
    assert "MobileNet_V3_Small_Weights.IMAGENET1K_V1" in msg


def test_missing_imagenet_file_fails_the_build_before_any_work(
    torch_home, offline, tiny_recipe_dict, write_recipe, tmp_path, monkeypatch, capsys
) -> None:
    from tlcompile.cli import main

    recipe = {
        **tiny_recipe_dict,
        "model": {"arch": "mobilenet_v3_small", "pretrained": "imagenet"},
        "train": {"epochs": 3},
    }
    out = tmp_path / "build"
    monkeypatch.setattr(sys, "argv", ["tlcompile", "build", str(write_recipe(recipe)), "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and HUB_FILE in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # nothing was written: the source is checked before the data stage


def test_cbr_has_no_imagenet_weights() -> None:
    with pytest.raises(ModelError, match=r"cbr_small has no ImageNet weights.*mobilenet_v3_small.*build:DIR"):
        load_weight_source("imagenet", get_model("cbr_small", num_classes=2))


# ------------------------------------------------------------------------------------------ files
class _Payload:
    """A class a weights_only load must refuse to rebuild (an arbitrary pickled object)."""


def test_weight_file_with_pickled_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 256), "extra": _Payload()}, path)
    with pytest.raises(
        UnsafeFileError,
        match=r"^model\.pretrained '.*evil\.pt': .*evil\.pt: refused: not a plain state_dict "
        r".*Unsupported global: GLOBAL [a-z_.]*_Payload",
    ):
        load_weight_source(str(path), get_model("cbr_small", num_classes=2))


def test_weight_files_state_dict_checkpoint_and_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    state = source_like("cbr_small", 2)
    model = get_model("cbr_small", num_classes=2)
    # A training checkpoint, saved from a DataParallel model, with one tensor missing and one extra.
    wrapped = {"module." + k: v for k, v in state.items() if k != "features.layer4.bn.running_var"}
    wrapped["module.aux_head.weight"] = torch.zeros(3)
    torch.save({"epoch": 7, "state_dict": wrapped}, tmp_path / "ckpt.pth")
    save_file(state, str(tmp_path / "w.safetensors"))

    report = apply_source_weights(model, load_weight_source(str(tmp_path / "ckpt.pth"), model))
    assert report["key_rule"] == "strip module." and report["classifier_loaded"]
    assert report["missing_keys"] == ["features.layer4.bn.running_var"] and report["unexpected_keys"] == [
        "aux_head.weight"
    ]
    assert torch.equal(model.features.layer1.conv.weight, state["features.layer1.conv.weight"])

    fresh = get_model("cbr_small", num_classes=2)
    report = apply_source_weights(fresh, load_weight_source(str(tmp_path / "w.safetensors"), fresh))
    assert report["loaded"] == len(state) and report["missing_keys"] == [] == report["unexpected_keys"]
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    torch.save(source_like("cbr_tiny", 2), tmp_path / "tiny.pt")
    with pytest.raises(
        ModelError,
        match=r"tensors do not fit cbr_small \(features.layer1.conv.weight: \(64, 3, 5, 5\) vs \(32, 3, 7, 7\)",
    ):
        apply_source_weights(
            get_model("cbr_small", num_classes=2),
            load_weight_source(str(tmp_path / "tiny.pt"), get_model("cbr_small", num_classes=2)),
        )
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    model = get_model("cbr_small", num_classes=2)
    with pytest.raises(ModelError, match="none of its 1 tensors matches cbr_small"):
        apply_source_weights(model, load_weight_source(str(tmp_path / "other.pt"), model))
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        load_weight_source(str(tmp_path / "absent.pt"), model)
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises((ModelError, UnsafeFileError), match=r"^model\.pretrained '.*junk\.pt': .*junk\.pt: "):
        load_weight_source(str(tmp_path / "junk.pt"), model)  # refused, never unpickled with code allowed
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"holds a list, not a state_dict"):
        load_weight_source(str(tmp_path / "list.pt"), model)


# ----------------------------------------------------------------------------------------- builds
@pytest.mark.parametrize("with_report", [True, False])
def test_build_source_feeds_a_task_with_other_classes(tmp_path, with_report: bool) -> None:
    state = fake_build(tmp_path / "src", "cbr_small", "grade", with_report=with_report)
    model = get_model("cbr_small", num_classes=2)
    source = load_weight_source(f"build:{tmp_path / 'src'}", model)
    assert (source.kind, source.arch, source.num_classes) == ("build", "cbr_small", 5)
    assert source.provenance()["build_name"] == "source" and source.provenance()["task"] == "grade"
    report = apply_source_weights(model, source)
    assert report["classifier"].startswith("adapted: source 5 classes") and report["loaded"] == len(state) - 2
    assert torch.equal(model.features.layer4.conv.weight, state["features.layer4.conv.weight"])


def test_build_source_errors(tmp_path) -> None:
    model = get_model("cbr_small", num_classes=2)
    with pytest.raises(WeightsNotFoundError, match=r"no build folder .*tlcompile build SOURCE.yaml --out"):
        load_weight_source(f"build:{tmp_path / 'nothing'}", model)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"02_train/fp32.pt' is missing.*--resume"):
        load_weight_source(f"build:{tmp_path / 'unfinished'}", model)
    fake_build(tmp_path / "mobile", "mobilenet_v3_small", "referable", with_report=True)
    with pytest.raises(
        ModelError, match=r"built with model.arch mobilenet_v3_small.*valid: model.arch: mobilenet_v3_small"
    ):
        load_weight_source(f"build:{tmp_path / 'mobile'}", model)


# ----------------------------------------------------------------------------------------- recipe
def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path) -> None:
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"arch": "cbr_small", "pretrained": "build:../runs/src"}, "train": {"epochs": 3}})
    )
    assert load_recipe(path).model.pretrained == f"build:{tmp_path / 'runs' / 'src'}"
    assert load_recipe(path, ["model.pretrained=w/source.safetensors"]).model.pretrained == str(
        tmp_path / "recipes" / "w" / "source.safetensors"
    )
    assert load_recipe(path, ["model.pretrained=imagenet"]).model.pretrained == "imagenet"
    assert os.path.isabs(load_recipe(path, [f"model.pretrained=build:{tmp_path}"]).model.pretrained[len("build:") :])


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"model": {"pretrained": "imagnet"}}, "'imagnet' is not a weight source; valid: none, imagenet, build:DIR"),
        ({"model": {"pretrained": "build:"}}, "'build:' names no folder"),
        (
            {"transfer": {"init": "mean_var", "strategy": "full"}},
            "transfer.init 'mean_var' needs source weights but model.pretrained is none",
        ),
        (
            {"model": {"pretrained": "imagenet"}, "transfer": {"init": "pretrained", "strategy": "scratch"}},
            "strategy scratch trains from a random init",
        ),
        (
            {"model": {"pretrained": "imagenet"}, "train": {"epochs": 2}},
            "two_phase (the default when model.pretrained is set",
        ),
        ({"model": {"pretrained": "imagenet"}, "transfer": {"init": "partial:0"}}, "'partial:0' is not an init"),
        (
            {"model": {"pretrained": "imagenet"}, "transfer": {"init": "partial:two"}},
            "valid: pretrained, random, mean_var, partial:K",
        ),
        (
            {
                "model": {"pretrained": "imagenet"},
                "transfer": {"compare": [{"init": "random", "strategy": "scratch", "head_epoch": 1}]},
            },
            "transfer.compare.0.head_epoch: unknown key 'head_epoch'; "
            "valid keys here: head_epochs, init, name, strategy, unfreeze_last",
        ),
        (
            {
                "model": {"pretrained": "imagenet"},
                "transfer": {"compare": [{"init": "pretrained", "strategy": "two_phase"}]},
            },
            "a variant named 'pretrained/two_phase' is already in the table",
        ),
        (
            {
                "transfer": {
                    "init": "random",
                    "strategy": "scratch",
                    "compare": [{"init": "partial:2", "strategy": "full"}],
                }
            },
            "transfer.compare.0.init 'partial:2' needs source weights",
        ),
        ({"transfer": {"init": "random", "strategy": "scratch", "repeats": 0}}, "transfer.repeats"),
    ],
)
def test_transfer_recipe_errors_name_the_key_and_what_is_valid(patch: dict, expected: str) -> None:
    raw = {"model": {"arch": "cbr_small"}, "train": {"epochs": 5}}
    for section, values in patch.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(RecipeError) as info:
        validate_recipe_dict(raw, "r.yaml")
    assert expected in str(info.value) and "\n" not in str(info.value)
