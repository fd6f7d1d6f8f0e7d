"""Where source weights come from: ImageNet (torch hub cache), a weights file, or an earlier tlcompile build.

``model.pretrained`` in a recipe is one of

- ``imagenet``: the torchvision ImageNet weights of the model, read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<file torchvision names>``). Nothing is downloaded: builds run on machines
  without internet, so a missing file is a :class:`WeightsNotFoundError` naming the file, the folder and how
  to put it there.
- ``PATH``: a state_dict saved with ``torch.save`` (``.pt`` / ``.pth`` / ``.bin``) or a ``.safetensors`` file.
  Loaded with ``torch.load(weights_only=True)``: tensors only, never pickled code.
- ``build:DIR``: the FP32 checkpoint (``DIR/02_train/fp32.pt``) of an earlier ``tlcompile build``, so a source
  task with plenty of data feeds a target task with little (Transfusion's T1 -> T2).

:func:`load_weight_source` reads the tensors once; :func:`apply_source_weights` loads them into a model,
reports missing / unexpected keys and adapts the classifier when the number of classes differs (the
model's own freshly initialised classifier is kept instead of the source's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tlcompile.errors import ModelError, UnsafeFileError, WeightsNotFoundError
from tlcompile.io import sha256_file
from tlcompile.models.registry import TlModel, list_models, model_info

# Keys under which training scripts commonly nest the state_dict inside a checkpoint dict.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
BUILD_CHECKPOINT = Path("02_train") / "fp32.pt"
TASK_NUM_CLASSES = {"referable": 2, "grade": 5}


@dataclass
class SourceWeights:
    """Tensors read from one weight source, with where they came from."""

    spec: str  # as written in the recipe (paths resolved): "imagenet", "/abs/w.pt", "build:/abs/dir"
    kind: str  # imagenet | file | build
    file: Path
    state_dict: dict[str, torch.Tensor]
    sha256: str
    arch: str | None = None  # the architecture the weights were trained for, when the source says
    num_classes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """What the report records about the source (no tensors)."""
        return {
            "spec": self.spec,
            "kind": self.kind,
            "file": str(self.file),
            "sha256": self.sha256,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "tensors": len(self.state_dict),
            **self.details,
        }


def source_kind(spec: str) -> str:
    """none | imagenet | build | file, from the text of ``model.pretrained``."""
    if spec == "none":
        return "none"
    if spec == "imagenet":
        return "imagenet"
    return "build" if spec.startswith("build:") else "file"


# ------------------------------------------------------------------------------------------- reading
def imagenet_weights_file(model: TlModel) -> tuple[Path, str, str]:
    """(path in the hub cache, download url, weights enum) of ``model``'s torchvision ImageNet weights."""
    enum = getattr(model, "torchvision_weights_enum", None)
    if enum is None:
        with_imagenet = [name for name in list_models() if model_info(name).family != "cbr"]
        raise ModelError(
            f"model.pretrained 'imagenet': {model.arch} has no ImageNet weights (the Transfusion CBR nets are "
            f"trained from scratch or from a build); valid: model.arch one of {', '.join(with_imagenet)}, "
            "or model.pretrained a weights file or build:DIR"
        )
    import torchvision

    url = torchvision.models.get_weight(enum).url
    # torch.hub.get_dir() reads $TORCH_HOME at call time; torchvision caches its weights in <hub>/checkpoints.
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return folder / os.path.basename(url), url, enum


def _read_imagenet(spec: str, model: TlModel) -> SourceWeights:
    path, url, enum = imagenet_weights_file(model)
    if not path.is_file():
        torch_home = os.environ.get("TORCH_HOME")
        raise WeightsNotFoundError(
            f"model.pretrained 'imagenet': the ImageNet weights of {model.arch} are not on this machine: expected "
            f"the file '{path.name}' in the folder '{path.parent}' ($TORCH_HOME is "
            f"{torch_home or 'unset: ~/.cache/torch'}); "
            f'nothing is downloaded during a build: download {url} (or run python -c "import torchvision; '
            f"torchvision.models.get_weight('{enum}').get_state_dict()\" on a machine with internet) and copy the file "
            "into that folder, or set model.pretrained: none"
        )
    state = _read_state_dict(path, "model.pretrained 'imagenet'")
    digest = sha256_file(path)
    # torchvision names its files <name>-<first hex digits of sha256>.pth; a mismatch means another file.
    expected = path.stem.rsplit("-", 1)[-1]
    details = {
        "url": url,
        "weights": enum,
        "sha256_prefix_expected": expected,
        "sha256_matches": digest.startswith(expected),
    }
    return SourceWeights(
        spec=spec,
        kind="imagenet",
        file=path,
        state_dict=state,
        sha256=digest,
        arch=model.arch,
        num_classes=1000,
        details=details,
    )


def _read_file(spec: str) -> SourceWeights:
    path = Path(spec)
    where = f"model.pretrained '{spec}'"
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{where}: no such file"
            + (" (it is a folder; for an earlier build write build:DIR)" if path.is_dir() else "")
            + "; valid: none, imagenet, a .pt/.pth/.safetensors state_dict file, or build:DIR"
        )
    return SourceWeights(
        spec=spec, kind="file", file=path, state_dict=_read_state_dict(path, where), sha256=sha256_file(path)
    )


def _read_build(spec: str) -> SourceWeights:
    folder = Path(spec[len("build:") :])
    where = f"model.pretrained '{spec}'"
    if not folder.is_dir():
        raise WeightsNotFoundError(
            f"{where}: no build folder '{folder}'; build the source task first (tlcompile build SOURCE.yaml --out "
            f"{folder})"
        )
    checkpoint = folder / BUILD_CHECKPOINT
    if not checkpoint.is_file():
        raise WeightsNotFoundError(
            f"{where}: '{checkpoint}' is missing, so that build did not finish training; "
            f"finish it with tlcompile build SOURCE.yaml --out {folder} --resume"
        )
    arch, num_classes, details = _build_metadata(folder, where)
    return SourceWeights(
        spec=spec,
        kind="build",
        file=checkpoint,
        state_dict=_read_state_dict(checkpoint, where),
        sha256=sha256_file(checkpoint),
        arch=arch,
        num_classes=num_classes,
        details=details,
    )


def _build_metadata(folder: Path, where: str) -> tuple[str, int, dict[str, Any]]:
    """arch and classes of an earlier build, from report.json (complete builds) or recipe.resolved.yaml."""
    report_path, recipe_path = folder / "report.json", folder / "recipe.resolved.yaml"
    try:
        if report_path.is_file():
            report = json.loads(report_path.read_text(encoding="utf-8"))
            recipe = report["recipe"]
            class_names = list(report["class_names"])
            return (
                recipe["model"]["arch"],
                len(class_names),
                {
                    "build": str(folder),
                    "build_name": report.get("name"),
                    "build_recipe_sha256": report.get("recipe_sha256"),
                    "task": report.get("task"),
                    "class_names": class_names,
                },
            )
        if recipe_path.is_file():
            recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
            task = recipe["data"]["task"]
            return (
                recipe["model"]["arch"],
                TASK_NUM_CLASSES[task],
                {"build": str(folder), "build_name": recipe.get("name"), "task": task},
            )
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        raise ModelError(
            f"{where}: cannot read the source build's arch and classes from {folder} ({type(err).__name__}: {err})"
        ) from err
    raise ModelError(
        f"{where}: '{folder}' has neither report.json nor recipe.resolved.yaml, so its arch and classes are unknown"
    )


def _read_state_dict(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a state_dict / checkpoint / safetensors file, read by :func:`tlcompile.checkpoint.load_state`
    (``weights_only=True``: never executes pickled code); errors gain the recipe key."""
    from tlcompile.checkpoint import load_state

    try:
        obj = load_state(path)
    except (UnsafeFileError, ModelError) as err:
        raise type(err)(f"{where}: {err}") from err
    return _tensors_of(obj, path, where)


def _tensors_of(obj: Any, path: Path, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), dict):
                nested = {k: v for k, v in obj[key].items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
                if nested:
                    return nested
        keys = ", ".join(map(str, list(obj)[:8]))
        raise ModelError(
            f"{where}: '{path}' holds a dict without tensors (keys: {keys}); valid: a state_dict or a checkpoint "
            f"with one under {', '.join(NESTED_STATE_KEYS)}"
        )
    raise ModelError(f"{where}: '{path}' holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")


def load_weight_source(spec: str, model: TlModel) -> SourceWeights:
    """Read the weights ``model.pretrained`` names, for a model like ``model`` (its arch picks ImageNet files).

    Raises :class:`WeightsNotFoundError` when the file or build is not there, :class:`UnsafeFileError` for a
    pickle with code, :class:`ModelError` for anything unreadable or a build of another architecture.
    """
    kind = source_kind(spec)
    if kind == "none":
        raise ModelError("model.pretrained is none: there are no source weights to load")
    if kind == "imagenet":
        return _read_imagenet(spec, model)
    source = _read_build(spec) if kind == "build" else _read_file(spec)
    if source.arch is not None and source.arch != model.arch:
        raise ModelError(
            f"model.pretrained '{spec}' was built with model.arch {source.arch}, but this recipe's model.arch is "
            f"{model.arch}; valid: model.arch: {source.arch} (weights only fit their own architecture)"
        )
    return source


# ------------------------------------------------------------------------------------------- loading
def _key_candidates(keys: list[str]) -> dict[str, dict[str, str]]:
    """Ways a source key may map to a model key: as is, without DataParallel's 'module.', with or without 'net.'."""

    def strip(prefix: str):
        return lambda k: k[len(prefix) :] if k.startswith(prefix) else k

    rules = {
        "as is": lambda k: k,
        "strip module.": strip("module."),
        "add net.": lambda k: "net." + strip("module.")(k),
        "strip net.": strip("net."),
    }
    return {name: {k: rule(k) for k in keys} for name, rule in rules.items()}


def apply_source_weights(model: TlModel, source: SourceWeights) -> dict[str, Any]:
    """Load ``source`` into ``model`` (in place); returns what happened (for the report).

    Every model tensor with a source tensor of the same name and shape is loaded. The classifier is kept
    from the source only when its shape fits; otherwise the model keeps its fresh classifier ("adapted").
    A shape mismatch anywhere else, or no tensor in common, is a :class:`ModelError`.
    """
    target = model.state_dict()
    candidates = _key_candidates(list(source.state_dict))
    rule, mapping = max(candidates.items(), key=lambda item: sum(v in target for v in item[1].values()))
    renamed = {mapping[k]: v for k, v in source.state_dict.items()}
    matched = [k for k in renamed if k in target]
    where = f"model.pretrained '{source.spec}'"
    if not matched:
        raise ModelError(
            f"{where}: none of its {len(renamed)} tensors matches {model.arch} (source keys e.g. "
            f"{', '.join(list(source.state_dict)[:3])}; model keys e.g. {', '.join(list(target)[:3])}); "
            "valid: weights saved from the same architecture"
        )
    classifier_prefix = model._classifier_path + "."
    classifier_keys = [k for k in target if k.startswith(classifier_prefix)]
    mismatched = [k for k in matched if renamed[k].shape != target[k].shape]
    classifier_adapted = any(k.startswith(classifier_prefix) for k in mismatched) or not all(
        k in renamed for k in classifier_keys
    )
    others = [k for k in mismatched if not k.startswith(classifier_prefix)]
    if others:
        shapes = "; ".join(f"{k}: {tuple(renamed[k].shape)} vs {tuple(target[k].shape)}" for k in others[:3])
        raise ModelError(
            f"{where}: {len(others)} tensors do not fit {model.arch} ({shapes}); valid: weights of the same "
            "architecture"
        )
    to_load = {k: renamed[k] for k in matched if not (classifier_adapted and k.startswith(classifier_prefix))}
    result = model.load_state_dict(to_load, strict=False)
    missing = [k for k in result.missing_keys if not (classifier_adapted and k.startswith(classifier_prefix))]
    unexpected = sorted(set(renamed) - set(target))
    source_classes = source.num_classes
    if source_classes is None and classifier_adapted and f"{model._classifier_path}.weight" in renamed:
        source_classes = int(renamed[f"{model._classifier_path}.weight"].shape[0])
    return {
        "loaded": len(to_load),
        "model_tensors": len(target),
        "key_rule": rule,
        "missing_keys": sorted(missing),
        "unexpected_keys": unexpected,
        "classifier": (
            f"adapted: source {source_classes} classes -> fresh {model.num_classes}-class classifier"
            if classifier_adapted
            else "loaded from the source"
        ),
        "classifier_loaded": not classifier_adapted,
        "classifier_keys_not_loaded": sorted(k for k in classifier_keys if classifier_adapted and k in renamed),
    }
