"""The recipe: one YAML file that says what to build.

``load_recipe(path, overrides)`` reads YAML, applies ``--set key.path=value`` overrides, validates
against the pydantic schema below (unknown keys are rejected) and returns a :class:`Recipe`.
Every problem becomes one :class:`RecipeError` line naming the file, the YAML key (and line when known),
the bad value and what is valid.

Torch-free: validation of ``model.arch`` asks the model registry only when torch is installed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlcompile.errors import RecipeError

# Largest recipe file we read: a recipe is a few KiB; anything huge is a mistake (or an attack).
MAX_RECIPE_BYTES = 1 << 20


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- data
class SplitConfig(Section):
    val: float = Field(0.15, gt=0, lt=1, description="Fraction of images held out for validation (model selection, operating point).")
    test: float = Field(0.2, gt=0, lt=1, description="Fraction of images held out for the final test metrics.")

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitConfig:
        if self.val + self.test >= 0.9:
            raise ValueError(
                f"val + test = {self.val + self.test:.2f} leaves under 10% of the images for training; "
                "valid: val + test < 0.9"
            )
        return self


class DataConfig(Section):
    source: Literal["synthetic", "csv", "folder"] = Field(
        "synthetic",
        description="synthetic: built-in fundus generator; csv: a label CSV + image folder (APTOS/EyePACS style); "
        "folder: one sub-folder per grade (0..4).",
    )
    num_images: int = Field(1500, ge=20, le=200_000, description="Synthetic source: how many images to generate.")
    difficulty: float | None = Field(
        None, ge=0, le=1, description="Synthetic source: lesion subtlety and nuisance strength (None = generator default)."
    )
    style: str = Field("default", description="Synthetic source: camera look (default, camera_b).")
    image_size: int = Field(112, ge=32, le=1024, description="Side of the square network input in pixels.")
    task: Literal["referable", "grade"] = Field(
        "referable", description="referable: binary, DR grade >= 2; grade: the 5-grade international scale."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Stratified train/val/test split, fixed by the seed.")
    csv: Path | None = Field(None, description="csv source: path of the label CSV (relative to the recipe file).")
    images: Path | None = Field(None, description="csv source: folder with the images; folder source: the root with one sub-folder per grade.")
    image_column: str = Field("id_code", description="csv source: column holding the image id or file name.")
    label_column: str = Field("diagnosis", description="csv source: column holding the DR grade 0-4.")
    path_template: str = Field("{id}.png", description="csv source: file name of an image from its id, e.g. '{id}.png' or '{id}.jpeg'.")
    crop_fov: bool = Field(True, description="Crop the black surround to the circular field of view before resizing.")

    @field_validator("path_template")
    @classmethod
    def _template_has_id(cls, value: str) -> str:
        if "{id}" not in value:
            raise ValueError(f"'{value}' does not contain '{{id}}'; valid: a file name pattern such as '{{id}}.png'")
        return value

    @model_validator(mode="after")
    def _paths_for_source(self) -> DataConfig:
        if self.source == "csv":
            if self.csv is None or self.images is None:
                raise ValueError("source 'csv' needs data.csv (the label file) and data.images (the image folder)")
        if self.source == "folder" and self.images is None:
            raise ValueError("source 'folder' needs data.images (a folder with one sub-folder per grade 0..4)")
        if self.source == "synthetic":
            from tlcompile.data.synthetic import FUNDUS_STYLES

            if self.style not in FUNDUS_STYLES:
                raise ValueError(f"style '{self.style}' is not known; valid: {', '.join(sorted(FUNDUS_STYLES))}")
        return self


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    arch: str = Field("mobilenet_v3_small", description="Registered model name; `tlcompile models` lists them.")
    pretrained: str = Field("none", description="Source weights: none (random init).")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        from tlcompile.errors import MissingDependencyError

        try:
            from tlcompile.models import list_models
        except (ImportError, MissingDependencyError):  # torch-free install: the build checks the name later
            return value
        known = list_models()
        if value not in known:
            raise ValueError(f"'{value}' is not a known model; known: {', '.join(known)}")
        return value


# ---------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    epochs: int = Field(10, ge=1, le=1000, description="Training epochs; the epoch with the best validation AUC is kept.")
    batch_size: int = Field(32, ge=1, le=4096, description="Mini-batch size.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(0.002, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="Learning-rate schedule over epochs.")
    step_size: int = Field(5, ge=1, description="step schedule: epochs between decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor.")
    class_weighted_loss: bool = Field(False, description="Weight the cross-entropy by inverse class frequency of the training split.")
    augment: bool = Field(True, description="Random flips and brightness jitter during training.")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Where to train: auto picks cuda when available.")


# --------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    formats: list[Literal["onnx", "openvino"]] = Field(
        default_factory=lambda: ["onnx", "openvino"], description="Export formats; each is checked against the torch model."
    )
    opset: int = Field(18, ge=13, le=23, description="ONNX opset version.")
    parity_images: int = Field(64, ge=1, le=10_000, description="Real validation images used for the parity check.")
    parity_max_abs_diff: float = Field(1e-3, gt=0, description="Largest allowed |logit difference| when the runtime executes in f32.")


# ---------------------------------------------------------------------------------------------- bench
class BenchConfig(Section):
    runtimes: list[Literal["openvino", "onnxruntime", "torch"]] = Field(
        default_factory=lambda: ["openvino", "onnxruntime", "torch"], description="Runtimes to measure every artifact on."
    )
    threads: int | None = Field(None, ge=1, le=1024, description="Inference threads; None = all cores of this machine.")
    precision: Literal["auto", "f32", "bf16", "f16"] = Field(
        "auto",
        description="OpenVINO execution precision: auto = the device default (bf16 on CPUs with AMX/AVX512-BF16); "
        "the precision that really ran is recorded either way.",
    )
    warmup: int = Field(10, ge=0, le=10_000, description="Warm-up inferences before timing.")
    iterations: int = Field(50, ge=1, le=1_000_000, description="Timed batch-1 inferences per artifact and runtime.")


# ------------------------------------------------------------------------------------------------ top
class Recipe(Section):
    name: str = Field("build", min_length=1, max_length=100, description="Name of the build (used in reports).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for data generation, splits, initialisation and training order.")
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, preprocessing and split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Architecture and source weights.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Supervised training.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export formats and parity checks.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Latency and accuracy measurement.")

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML/JSON types (paths as strings)."""
        return json.loads(self.model_dump_json())

    def fingerprint(self) -> str:
        """sha256 of the resolved recipe: two builds with the same fingerprint did the same thing."""
        return hashlib.sha256(json.dumps(self.to_yaml_dict(), sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- loading
def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set '{text}': expected key.path=value, e.g. --set train.epochs=3")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set '{text}': '{key}' is not a key path; valid: dotted names such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"--set '{text}': the value '{raw}' is not valid YAML ({err.problem})") from err
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw recipe dict (values parsed as YAML scalars/lists)."""
    for text in overrides:
        parts, value = _parse_override(text)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"--set '{text}': '{where}' is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each YAML key path to its 1-based line, for error messages (best effort)."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    walk(root, ())
    return lines


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        valid = _section_fields(parent)
        return f"unknown key '{loc[-1]}'" + (f"; valid keys here: {', '.join(valid)}" if valid else "")
    if kind == "literal_error":
        return f"{err.get('input')!r} is not valid; {msg[0].lower() + msg[1:]}"
    value = err.get("input")
    if kind in ("model_type", "dict_type") or isinstance(value, dict) or repr(value) in msg:
        return msg
    return f"{value!r}: {msg[0].lower() + msg[1:]}"


def _section_fields(path: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError, source: str, text: str | None = None) -> str:
    """One line: ``recipe.yaml: model.arch (line 9): 'x' is not a known model; known: ...``."""
    lines = _key_lines(text) if text else {}
    parts = []
    errors = err.errors()
    for e in errors[:3]:
        loc = tuple(str(p) for p in e["loc"])
        where = ".".join(loc) if loc else "(top level)"
        line = lines.get(loc) or lines.get(loc[:-1])
        parts.append(f"{where}{f' (line {line})' if line else ''}: {_describe_error(e)}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("csv", "images"):
        value = data.get(key)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = (base_dir / path).resolve()
            data[key] = str(path)


def _check_paths_exist(recipe: Recipe, source: str) -> None:
    d = recipe.data
    if d.source == "csv":
        if not d.csv.is_file():
            raise RecipeError(f"{source}: data.csv: '{d.csv}' does not exist or is not a file; give the label CSV's path")
        if not d.images.is_dir():
            raise RecipeError(f"{source}: data.images: '{d.images}' is not a folder; give the folder holding the images")
    if d.source == "folder" and not d.images.is_dir():
        raise RecipeError(f"{source}: data.images: '{d.images}' is not a folder; give the root with one sub-folder per grade")


def read_recipe_text(path: Path) -> str:
    """Read a recipe file with clear errors for missing, huge, binary or non-UTF-8 files."""
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the path of a .yaml recipe file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES} bytes)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from err


def parse_recipe_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML safely (no Python objects); aliases are refused to defuse alias bombs."""
    if "*" in text or "&" in text:
        # Only anchors/aliases use these outside strings; check properly on the event stream.
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.AliasEvent):
                    raise RecipeError(f"{source}: YAML aliases (*name) are not allowed in recipes; write the values out")
        except yaml.YAMLError:
            pass  # reported below with its line
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from err
    if raw is None:
        raise RecipeError(f"{source}: the recipe is empty; start from recipes/quickstart.yaml")
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: the top level must be a mapping of sections (name, data, model, ...), not {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises :class:`RecipeError` with one line on any problem."""
    path = Path(path)
    text = read_recipe_text(path)
    source = str(path)
    raw = parse_recipe_yaml(text, source)
    raw = apply_overrides(raw, list(overrides or []))
    _resolve_paths(raw, path.resolve().parent)
    recipe = validate_recipe_dict(raw, source, text)
    _check_paths_exist(recipe, source)
    return recipe


def validate_recipe_dict(raw: dict[str, Any], source: str = "recipe", text: str | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, text)) from err


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe, for editors (yaml-language-server)."""
    return Recipe.model_json_schema()

