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
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlcompile.errors import RecipeError
from tlcompile.runtime.backends import backend

# Largest recipe file we read: a recipe is a few KiB; anything huge is a mistake (or an attack).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 32  # sections nest 3-4 levels; deeper YAML is malformed (and deep enough would exhaust the stack)
# model.pretrained file names we accept; anything else is most likely a typo of a keyword (e.g. 'imagnet').
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_other_types(cls, value: Any, info: Any) -> Any:
        # pydantic's lax mode reads true as 1 (--set train.batch_size=true gave batch 1): a yes/no value is only
        # accepted by a yes/no key.
        if (
            isinstance(value, bool)
            and info.field_name in cls.model_fields
            and not _admits_bool(cls.model_fields[info.field_name].annotation)
        ):
            raise ValueError(f"{value!r} is a YAML boolean (true/false/yes/no), not a valid value for this key")
        return value


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(a) for a in get_args(annotation))


# ----------------------------------------------------------------------------------------------- data
class SplitConfig(Section):
    val: float = Field(
        0.15, gt=0, lt=1, description="Fraction of images held out for validation (model selection, operating point)."
    )
    test: float = Field(0.2, gt=0, lt=1, description="Fraction of images held out for the final test metrics.")
    column: str | None = Field(
        None,
        min_length=1,
        description="Label-CSV column giving each image's split (train, val or test) instead of drawing one; val and "
        "test fractions are then not used. A patient found in two splits is reported as a data problem.",
    )

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitConfig:
        if self.val + self.test >= 0.9:
            raise ValueError(
                f"val + test = {self.val + self.test:.2f} leaves under 10% of the images for training; "
                "valid: val + test < 0.9"
            )
        return self


class DataConfig(Section):
    source: Literal["synthetic", "aptos", "eyepacs", "idrid", "messidor", "folder", "csv", "dicom"] = Field(
        "synthetic",
        description="synthetic: built-in fundus generator. Layout presets under data.root: aptos (train.csv id_code,"
        "diagnosis + train_images/<id>.png); eyepacs (trainLabels.csv image,level + train/<image>.jpeg; the patient is "
        "the part before _left/_right); idrid (the IDRiD grading CSV 'Image name','Retinopathy grade' + <id>.jpg); "
        "messidor (Messidor-2 messidor_data.csv image_id,adjudicated_dr_grade + IMAGES/; ungradable rows left out); "
        "folder (one sub-folder per class: 0..4 or data.label_map's names); csv (any label CSV: data.csv with "
        "image_column, label_column, path_template, optional patient_column or patient_regex); dicom (labels.csv "
        "file,grade keyed by SOPInstanceUID or file name + a folder of .dcm files; the patient is the DICOM PatientID, "
        "pseudonymised; needs tlcompile[dicom]).",
    )
    root: Path | None = Field(
        None,
        description="Dataset folder of a layout preset (relative to the recipe file); data.csv / data.images override "
        "where the preset looks.",
    )
    num_images: int = Field(1500, ge=20, le=200_000, description="Synthetic source: how many images to generate.")
    difficulty: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Synthetic source: lesion subtlety and nuisance strength (None = generator default).",
    )
    style: str = Field("default", description="Synthetic source: camera look (default, camera_b).")
    image_size: int = Field(112, ge=32, le=1024, description="Side of the square network input in pixels.")
    task: Literal["referable", "grade"] = Field(
        "referable", description="referable: binary, DR grade >= 2; grade: the 5-grade international scale."
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="train/val/test: stratified by label and grouped by patient (both eyes of a patient in one split), "
        "fixed by the seed; or read from a CSV column.",
    )
    csv: Path | None = Field(
        None, description="The label CSV (relative to the recipe file): needed by the csv source; overrides a preset's."
    )
    images: Path | None = Field(
        None,
        description="Folder holding the images (relative to the recipe file); default: the preset's folder under "
        "data.root (csv source: data.root, else the CSV's folder). folder source: the folder with one sub-folder per "
        "class.",
    )
    image_column: str | None = Field(
        None,
        min_length=1,
        description="CSV column holding the image id or file name (None: the preset's; csv source: id_code).",
    )
    label_column: str | None = Field(
        None, min_length=1, description="CSV column holding the label (None: the preset's; csv source: diagnosis)."
    )
    path_template: str | None = Field(
        None,
        description="File name of an image from its id, e.g. '{id}.png' or 'images/{id}.jpeg' (None: the preset's; "
        "csv source: '{id}.png').",
    )
    patient_column: str | None = Field(
        None, min_length=1, description="CSV column holding the patient id (eyes of one patient share a split)."
    )
    patient_regex: str | None = Field(
        None,
        min_length=1,
        description="Regular expression whose first group (or group 'patient') is the patient id, searched in the "
        "image id (folder source: the file name without extension), e.g. '^(.+)_(left|right)$'. Without "
        "patient_column or patient_regex (and no preset rule), each image is its own patient.",
    )
    label_map: dict[str, int | None] = Field(
        default_factory=dict,
        description="Raw label (as written in the CSV, or the class folder's name) -> DR grade 0-4; null leaves those "
        "images out (e.g. ungradable). Empty: the labels are the grades 0-4 themselves.",
    )
    balance: Literal["none", "weighted_sampler", "weighted_loss"] = Field(
        "none",
        description="Class imbalance in training: none; weighted_sampler (each epoch draws training images with "
        "replacement, weighted by inverse class frequency); weighted_loss (cross-entropy weighted by inverse class "
        "frequency of the training split).",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="Bad data (unreadable, truncated, empty or blank images, missing files, bad labels, duplicates, "
        "images too small): fail stops with the list; skip leaves exactly those images out. Either way the list is "
        "written beside splits.csv; an image is never replaced by a black one.",
    )
    min_image_side: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Images whose shorter side is below this many pixels are reported as too small (None: "
        "data.image_size).",
    )
    cache: Path | None = Field(
        None,
        description="Folder for the preprocessed-image cache, keyed by file content and preprocessing (relative to the "
        "recipe file): later builds and checks read it instead of decoding the photographs again. None: no cache.",
    )
    store: Literal["memory", "disk"] = Field(
        "memory",
        description="Where the preprocessed images live while the build runs. memory: one array in RAM (RAM grows with "
        "the data set). disk: one uint8 file per split under data.cache (needed), written once and reused by later "
        "builds, checks and sweeps of the same images and preprocessing; training reads it a batch at a time (with "
        "data.loader_workers processes). Both give the same checkpoints byte for byte.",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="data.store: disk: processes reading training batches from the store ahead of the model (0: the "
        "training process reads them itself: measured flat memory; spawned loaders each add memory and, on a 2-core "
        "box, compete with training).",
    )
    crop_fov: bool = Field(True, description="Crop the black surround to the circular field of view before resizing.")
    ben_graham: bool = Field(
        False,
        description="Ben Graham's local-average colour subtraction: 4 x (image - Gaussian blur, sigma = field radius "
        "/ 30) + 128.",
    )
    circular_mask: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Blank outside a circle of this fraction of the field radius (Ben Graham used 0.9); None: no mask.",
    )

    @field_validator("path_template")
    @classmethod
    def _template_has_id(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "{id}" not in value:
            raise ValueError(f"{value!r} does not contain '{{id}}'; valid: a file name pattern such as '{{id}}.png'")
        try:
            value.format(id="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"{value!r} has a placeholder other than {{id}} ({err}); valid: a pattern such as '{{id}}.png'"
            ) from err
        return value

    @field_validator("patient_regex")
    @classmethod
    def _regex_has_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            pattern = re.compile(value)
        except re.error as err:
            raise ValueError(f"{value!r} is not a regular expression ({err})") from err
        if pattern.groups < 1:
            raise ValueError(f"{value!r} has no group to take the patient id from; valid: e.g. '^(.+)_(left|right)$'")
        return value

    @field_validator("label_map", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value: Any) -> Any:
        # YAML reads `0: 0` with an int key; labels are compared as the text written in the CSV or folder name.
        if isinstance(value, dict):
            return {str(k).strip(): v for k, v in value.items()}
        return value

    @field_validator("label_map")
    @classmethod
    def _grades_in_range(cls, value: dict[str, int | None]) -> dict[str, int | None]:
        for key, grade in value.items():
            if grade is not None and grade not in range(5):
                raise ValueError(f"'{key}' maps to {grade}; valid: a DR grade 0-4, or null to leave those images out")
        return value

    @model_validator(mode="after")
    def _paths_for_source(self) -> DataConfig:
        if self.store == "disk" and self.cache is None:
            raise ValueError(
                "data.store: disk needs data.cache (the folder the store is written to, e.g. cache: .tlcache); or use "
                "data.store: memory"
            )
        if self.source == "csv" and self.csv is None:
            raise ValueError(
                "source 'csv' needs data.csv (the label file); data.images (the image folder) defaults to the CSV's "
                "folder"
            )
        if (
            self.source in ("aptos", "eyepacs", "idrid", "messidor", "dicom")
            and self.root is None
            and (self.csv is None or self.images is None)
        ):
            raise ValueError(
                f"source '{self.source}' needs data.root (the dataset folder), or both data.csv and data.images"
            )
        if self.source == "folder" and self.root is None and self.images is None:
            raise ValueError(
                "source 'folder' needs data.root (a folder with one sub-folder per class: 0..4 or data.label_map's "
                "names)"
            )
        if self.patient_column is not None and self.patient_regex is not None:
            raise ValueError("give data.patient_column or data.patient_regex, not both")
        if self.source in ("synthetic", "folder") and (
            self.patient_column is not None or self.split.column is not None
        ):
            raise ValueError(
                f"source '{self.source}' has no label CSV: data.patient_column and data.split.column need a CSV "
                "source (aptos, eyepacs, idrid, messidor, csv)"
            )
        if self.source == "synthetic":
            from tlcompile.data.synthetic import FUNDUS_STYLES

            if self.style not in FUNDUS_STYLES:
                raise ValueError(f"style '{self.style}' is not known; valid: {', '.join(sorted(FUNDUS_STYLES))}")
        return self


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    arch: str = Field("mobilenet_v3_small", description="Registered model name; `tlcompile models` lists them.")
    pretrained: str = Field(
        "none",
        description="Source weights: none (random init); imagenet (torchvision weights from "
        "$TORCH_HOME/hub/checkpoints, never downloaded); a weights file (.pt/.pth/.bin/.safetensors state_dict); "
        "build:DIR (the FP32 checkpoint of an earlier tlcompile build). Paths are relative to the recipe file.",
    )

    @field_validator("pretrained")
    @classmethod
    def _known_source(cls, value: str) -> str:
        value = value.strip()
        if value in ("none", "imagenet"):
            return value
        if value.startswith("build:"):
            if not value[len("build:") :].strip():
                raise ValueError(
                    "'build:' names no folder; valid: build:DIR, the --out folder of an earlier tlcompile build"
                )
            return value
        if not value.lower().endswith(WEIGHT_FILE_SUFFIXES):
            raise ValueError(
                f"{value!r} is not a weight source; valid: none, imagenet, build:DIR, or a weights file ending in "
                f"{', '.join(WEIGHT_FILE_SUFFIXES)}"
            )
        return value

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
            raise ValueError(f"{value!r} is not a known model; known: {', '.join(known)}")
        return value


# ---------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    epochs: int = Field(
        10, ge=1, le=1000, description="Training epochs; the epoch with the best validation AUC is kept."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Mini-batch size.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(0.002, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="Weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="Learning-rate schedule over epochs.")
    step_size: int = Field(5, ge=1, description="step schedule: epochs between decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor.")
    augment: bool = Field(True, description="Random flips and brightness jitter during training.")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto", description="Where to train: auto picks cuda when available."
    )
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none",
        description="Mixed-precision training: bf16 (autocast; GPUs from Ampere, recent CPUs) or fp16 (autocast + "
        "gradient scaler).",
    )
    channels_last: bool = Field(
        False, description="NHWC memory layout for the model and batches (faster convolutions on tensor-core GPUs)."
    )
    precise_bn: int = Field(
        512,
        ge=0,
        le=1_000_000,
        description="After every epoch, re-estimate the BatchNorm statistics exactly on this many un-augmented "
        "training images (a fixed seeded subset; 0 = keep the momentum average training leaves). On small data the "
        "momentum average can be far off: the quickstart's test AUC was 0.951 with it, 0.982 with exact statistics.",
    )


# ------------------------------------------------------------------------------------------- transfer
TransferStrategy = Literal["linear_probe", "two_phase", "full", "scratch"]
INIT_DESCRIPTION = (
    "How the network starts: pretrained (model.pretrained's weights); random (fresh init); mean_var (Transfusion's "
    "Mean Var Init: each source layer re-drawn i.i.d. with its own mean and std); partial:K (the first K blocks from "
    "the source, the rest re-initialised; `tlcompile models --blocks ARCH` lists the blocks)."
)
STRATEGY_DESCRIPTION = (
    "How it trains for train.epochs: linear_probe (blocks frozen, only the classifier learns); two_phase (head_epochs "
    "of classifier only, then the last unfreeze_last blocks too, with the finetune optimizer); full (every layer, "
    "train.optimizer); scratch (full from init: random)."
)


def check_transfer_init(value: str) -> str:
    """pretrained | random | mean_var | partial:K with K >= 1."""
    k = value[len("partial:") :] if value.startswith("partial:") else None
    if value in ("pretrained", "random", "mean_var") or (k is not None and k.isdigit() and int(k) >= 1):
        return value
    raise ValueError(
        f"{value!r} is not an init; valid: pretrained, random, mean_var, partial:K (keep the first K >= 1 blocks)"
    )


class FinetuneConfig(Section):
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="Optimizer of two_phase's phase two (the seed advises SGD on a pretrained base)."
    )
    lr: float = Field(
        0.001,
        gt=0,
        le=10,
        description="Learning rate of phase two: small, so the unfrozen pretrained blocks move little.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of phase two.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay of phase two.")


class TransferVariant(Section):
    name: str | None = Field(
        None, min_length=1, max_length=60, description="Row name in the transfer table (default: init/strategy)."
    )
    init: str = Field(description=INIT_DESCRIPTION)
    strategy: TransferStrategy = Field(description=STRATEGY_DESCRIPTION)
    head_epochs: int | None = Field(
        None, ge=1, le=1000, description="two_phase: epochs of phase one (None: transfer.head_epochs)."
    )
    unfreeze_last: int | None = Field(
        None, ge=1, le=1000, description="two_phase: blocks unfrozen in phase two (None: transfer.unfreeze_last)."
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        return check_transfer_init(value)


class TransferConfig(Section):
    init: str = Field("pretrained", description=INIT_DESCRIPTION)
    strategy: TransferStrategy = Field("two_phase", description=STRATEGY_DESCRIPTION)
    head_epochs: int = Field(
        2, ge=1, le=1000, description="two_phase: epochs training only the classifier before any block is unfrozen."
    )
    unfreeze_last: int = Field(
        1, ge=1, le=1000, description="two_phase: how many of the last blocks train in phase two (with the classifier)."
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="two_phase: optimizer of phase two.")
    freeze_bn_stats: bool = Field(
        True,
        description="Frozen blocks keep their BatchNorm running statistics (eval mode); false lets them adapt to the "
        "new data.",
    )
    compare: list[TransferVariant] = Field(
        default_factory=list,
        description="Variants trained and evaluated exactly like the main one (same data, seeds, epochs); the best on "
        "val goes on to compression and the report gets a transfer table.",
    )
    repeats: int = Field(
        1,
        ge=1,
        le=20,
        description="Train every variant with this many seeds (seed, seed+1, ...); the table gives mean and sd.",
    )
    target_val_auc: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Val AUC counted as reached for epochs_to_target; None = 0.95 x the best val AUC of any run.",
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        return check_transfer_init(value)

    def variants(self) -> list[TransferVariant]:
        """The main variant (this section's init/strategy) followed by ``compare``, each with its row name set."""
        main = TransferVariant(
            init=self.init, strategy=self.strategy, head_epochs=self.head_epochs, unfreeze_last=self.unfreeze_last
        )
        out = []
        for v in [main, *self.compare]:
            out.append(
                v.model_copy(
                    update={
                        "name": v.name or f"{v.init}/{v.strategy}",
                        "head_epochs": v.head_epochs or self.head_epochs,
                        "unfreeze_last": v.unfreeze_last or self.unfreeze_last,
                    }
                )
            )
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> TransferConfig:
        seen: set[str] = set()
        for i, v in enumerate(self.variants()):
            if v.name in seen:
                raise ValueError(
                    f"compare.{i - 1}: a variant named '{v.name}' is already in the table; valid: give it its own "
                    f"name, e.g. name: {v.name}-2"
                )
            seen.add(v.name)
        return self


# ----------------------------------------------------------------------------------------- compression
class GuardLimits(Section):
    """The accuracy guard of a compression step, judged on val against the model it was made from."""

    max_auc_drop: float | None = Field(
        0.01,
        ge=0,
        le=1,
        description="Guard: largest allowed val AUC drop against the model compressed (None = not limited).",
    )
    max_sensitivity_drop: float | None = Field(
        0.02,
        ge=0,
        le=1,
        description="Guard: largest allowed drop of val sensitivity at the locked operating point (the referrals that "
        "are kept).",
    )
    max_specificity_drop: float | None = Field(
        0.05, ge=0, le=1, description="Guard: largest allowed drop of val specificity at the locked operating point."
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Guard: largest allowed drop of the share of right referral decisions (locked operating point) on "
        "val.",
    )
    realign: bool = Field(
        True,
        description="When the guard fails on the referral decisions (sensitivity/specificity at the locked threshold) "
        "while the AUC is within its limit: shift the classifier's referable bias so the compressed model's val "
        "decisions match the reference's again (the ranking, hence the AUC, is unchanged). The first remedy, tried "
        "again after the others.",
    )


class PruneConfig(GuardLimits):
    method: Literal["channel", "magnitude"] = Field(
        "channel",
        description="channel: structured (torch-pruning) -- whole channels are removed, so the exported graph is "
        "smaller and faster; magnitude: unstructured (NNCF) -- single weights are zeroed, the file compresses but "
        "dense CPU kernels do not get faster.",
    )
    ratio: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="channel: fraction of each layer's output channels removed; magnitude: fraction of weights zeroed.",
    )
    importance: Literal["l2", "taylor"] = Field(
        "l2",
        description="channel: how channels are ranked -- l2: weight magnitude; taylor: |weight x gradient| on the "
        "calibration images.",
    )
    scope: Literal["local", "global"] = Field(
        "local",
        description="local: every layer loses `ratio` of its channels (weights); global: channels (weights) are ranked "
        "across the whole network, so robust layers lose more and sensitive ones less.",
    )
    layer_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="channel: per-layer ratios overriding `ratio`, keyed by block name (`tlcompile models --blocks "
        "ARCH`) or module path, e.g. {layer4: 0.7}.",
    )
    keep: list[str] = Field(
        default_factory=list,
        description="Blocks or module paths kept whole (never pruned); the classifier is always kept.",
    )
    max_layer_ratio: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="channel, global scope: no layer loses more than this fraction of its channels (where it binds, "
        "the network loses less than `ratio`).",
    )
    round_to: int | None = Field(
        8,
        ge=1,
        le=128,
        description="channel: round kept channel counts to a multiple of this (SIMD-friendly widths); None = exact.",
    )
    steps: int = Field(
        2, ge=1, le=20, description="Prune in this many equal steps (ratio/steps each), fine-tuning after each."
    )
    finetune_epochs: int = Field(
        2, ge=0, le=1000, description="Fine-tuning epochs after each pruning step (0 = BatchNorm adaptation only)."
    )
    lr: float = Field(
        0.0005, gt=0, le=10, description="Peak learning rate of the fine-tuning (cosine over each step's epochs)."
    )
    distill: bool = Field(
        False,
        description="Fine-tune with knowledge distillation from the unpruned FP32 model (KL on softened logits plus "
        "cross-entropy) instead of cross-entropy alone. Off by default: a teacher whose logits barely move between "
        "images (an under-trained or badly calibrated FP32 model) teaches the pruned net almost nothing.",
    )
    distill_temperature: float = Field(
        2.0, gt=0, le=100, description="prune.distill: softmax temperature of teacher and student logits."
    )
    distill_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="prune.distill: weight of the KL term; 1 - alpha weighs the cross-entropy on labels.",
    )
    calibration_images: int = Field(
        300, ge=8, le=100_000, description="Stratified training images for BatchNorm adaptation and Taylor importance."
    )
    recovery_epochs: int = Field(
        2,
        ge=0,
        le=1000,
        description="When the guard fails: extra fine-tuning epochs before the artifact is marked as failing it.",
    )

    @field_validator("layer_ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for name, ratio in value.items():
            if not 0 < ratio < 1:
                raise ValueError(f"layer_ratios['{name}'] = {ratio} is out of range; valid: 0 < ratio < 1")
        return value

    @model_validator(mode="after")
    def _channel_options_need_channel_method(self) -> PruneConfig:
        # NNCF's magnitude pruning ranks single weights by |w|: there is no Taylor ranking or per-layer ratio to honour.
        if self.method == "magnitude" and self.importance != "l2":
            raise ValueError(
                f"importance '{self.importance}' applies to method channel only; valid with magnitude: l2 (the default)"
            )
        if self.method == "magnitude" and self.layer_ratios:
            raise ValueError(
                "layer_ratios applies to method channel only; valid with magnitude: one ratio (and scope local/global)"
            )
        return self


class QuantizeConfig(GuardLimits):
    method: Literal["ptq", "qat"] = Field(
        "qat",
        description="ptq: NNCF post-training quantization on the calibration images; qat: PTQ as the start, then "
        "quantization-aware training for `epochs`.",
    )
    epochs: int = Field(
        2,
        ge=1,
        le=1000,
        description="qat: quantization-aware training epochs (the best on val is kept; PTQ counts as epoch 0).",
    )
    lr: float = Field(
        0.0001,
        gt=0,
        le=1,
        description="qat: peak learning rate (cosine); small, the weights only settle onto the int8 grid.",
    )
    calibration_images: int = Field(
        300, ge=8, le=100_000, description="Stratified training images for the activation ranges."
    )
    overflow_fix: Literal["enable", "first_layer", "disable"] = Field(
        "enable",
        description="NNCF's OverflowFix: weights of these layers use 7 of their 8 bits. CPUs without VNNI (AVX2, "
        "AVX-512 without VNNI) sum u8 x s8 products in pairs into int16 (VPMADDUBSW), which saturates with full 8-bit "
        "weights and moved int8 logits by ~1 on an AVX2 box; 7-bit weights cannot overflow there, so the int8 model "
        "computes the same on every x86 ISA (QAT trains on the 7-bit grid). first_layer: NNCF's default; disable: "
        "full 8-bit everywhere (only for boxes known to have VNNI or AMX, or ARM).",
    )
    distill: bool = Field(
        True,
        description="qat: knowledge distillation from the FP32 model being quantized (KL on softened logits plus "
        "cross-entropy).",
    )
    distill_temperature: float = Field(
        1.0,
        gt=0,
        le=100,
        description="qat distillation: softmax temperature; 1 matches the probabilities the operating point was "
        "locked on.",
    )
    distill_alpha: float = Field(
        1.0,
        ge=0,
        le=1,
        description="qat distillation: weight of the KL term (1 - alpha weighs the cross-entropy on labels). 1 by "
        "default: QAT should reproduce the FP32 model's scores; label cross-entropy re-calibrates them and moves the "
        "referral decisions at the locked threshold (the README's compression section has the measurement).",
    )
    keep_fp32: list[str] = Field(
        default_factory=list,
        description="Module paths or blocks kept in FP32 from the start (NNCF ignored scope), e.g. [features.layer1].",
    )
    recovery_epochs: int = Field(2, ge=0, le=1000, description="When the guard fails: extra QAT epochs (first remedy).")
    fp32_fallback_layers: int = Field(
        2,
        ge=0,
        le=100,
        description="When the guard still fails: keep this many most sensitive layers in FP32 and quantize again "
        "(second remedy; 0 = off).",
    )


# --------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    formats: list[Literal["onnx", "openvino"]] = Field(
        default_factory=lambda: ["onnx", "openvino"],
        description="Export formats; each is checked against the torch model.",
    )
    opset: int = Field(18, ge=13, le=23, description="ONNX opset version (the torchscript exporter caps it at 20).")
    onnx_exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript",
        description="torchscript: torch.onnx's TorchScript exporter (fast; the path NNCF documents for quantized "
        "models); dynamo: the torch.export-based exporter (about 30x slower on these CNNs).",
    )
    parity_images: int = Field(64, ge=1, le=10_000, description="Real validation images used for the parity check.")
    parity_max_abs_diff: float = Field(
        1e-3, gt=0, description="Largest allowed |logit difference| when the runtime executes in f32."
    )


# ---------------------------------------------------------------------------------------------- bench
class BenchConfig(Section):
    runtimes: list[Literal["openvino", "onnxruntime", "torch"]] = Field(
        default_factory=lambda: ["openvino", "onnxruntime", "torch"],
        description="Runtimes to measure every artifact on.",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="Inference threads; None = all cores of this machine.")
    precision: Literal["auto", "f32", "bf16", "f16"] = Field(
        "f32",
        description="OpenVINO execution precision: f32 = what the bundle deploys (its latencies and accuracy are "
        "then those of the model the clinic runs); auto = the device default (bf16 on CPUs with AMX/AVX512-BF16), to "
        "see what bf16 would give. The precision that really ran is recorded either way.",
    )
    warmup: int = Field(10, ge=0, le=10_000, description="Warm-up inferences before timing.")
    iterations: int = Field(50, ge=1, le=1_000_000, description="Timed batch-1 inferences per artifact and runtime.")
    max_seconds: float | None = Field(
        2.0,
        gt=0,
        le=86_400,
        description="Stop timing a row after this many seconds once 10 inferences (or all `iterations`, if fewer) are "
        "timed: a slow row, such as a fake-quantized model in torch, gets fewer samples; null = always `iterations`.",
    )


# ------------------------------------------------------------------------------------------- evaluate
class EndpointsConfig(Section):
    min_sensitivity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Referable-DR sensitivity every artifact must reach at the locked operating point (e.g. 0.85).",
    )
    min_specificity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Referable-DR specificity every artifact must reach at the locked operating point (e.g. 0.825).",
    )
    min_auc: float | None = Field(None, gt=0, le=1, description="Referable-DR AUC every artifact must reach.")
    rule: Literal["point_estimate", "ci_lower_bound"] = Field(
        "point_estimate",
        description="point_estimate: the measured value must reach the target (how IDx-DR's pivotal trial judged its "
        "endpoints); ci_lower_bound: the lower 95% confidence bound must, the stricter claim.",
    )


class EvaluateConfig(Section):
    operating_point: Literal["youden", "sensitivity"] = Field(
        "youden",
        description="How the referral threshold is locked on the FP32 model's validation split: youden maximises "
        "sensitivity + specificity - 1; sensitivity takes the highest threshold reaching target_sensitivity.",
    )
    target_sensitivity: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="operating_point sensitivity: the validation sensitivity to reach, e.g. 0.87 (what IDx-DR's "
        "pivotal trial reported).",
    )
    endpoints: EndpointsConfig = Field(
        default_factory=EndpointsConfig, description="Pass/fail targets judged for every artifact on the test split."
    )
    temperature_scaling: bool = Field(
        False,
        description="Fit a softmax temperature on the FP32 model's validation logits and use it for every artifact's "
        "P(referable).",
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, le=100_000, description="Bootstrap resamples for the AUC, kappa and paired-delta 95% CIs."
    )
    calibration_bins: int = Field(
        10, ge=2, le=100, description="Equal-width probability bins of the ECE and the reliability plot."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Seed of the bootstrap resamples; None = the recipe's seed."
    )

    @model_validator(mode="after")
    def _target_sensitivity_with_its_method(self) -> EvaluateConfig:
        # Both directions are errors rather than silent defaults: a clinic must know which rule locked its threshold.
        if self.operating_point == "sensitivity" and self.target_sensitivity is None:
            raise ValueError("operating_point 'sensitivity' needs target_sensitivity; valid: a fraction such as 0.87")
        if self.operating_point != "sensitivity" and self.target_sensitivity is not None:
            raise ValueError(
                f"target_sensitivity is {self.target_sensitivity} but operating_point is '{self.operating_point}', "
                "which ignores it; valid: operating_point: sensitivity with target_sensitivity, or drop "
                "target_sensitivity"
            )
        return self


# -------------------------------------------------------------------------------------------- quality
class QualityLimits(Section):
    """Limits of the image-quality gate's measures (tlcompile.runtime.quality); a limit left out is calibrated."""

    coverage: float | None = Field(
        None, ge=0, le=1, description="Least share of the field that must be in the frame and not black (e.g. 0.85)."
    )
    focus: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Least vessel visibility: 95th percentile of |green - its 3x3 mean| over the median green, at a "
        "field radius of 64 px (e.g. 0.08).",
    )
    brightness: float | None = Field(
        None, ge=0, le=255, description="Least median brightness (max of R, G, B) of the field (e.g. 40)."
    )
    saturated: float | None = Field(
        None, ge=0, le=1, description="Largest share of the field whose green channel is >= 200 (over-exposure)."
    )
    evenness: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Least 10th percentile of block brightness over its ring's median (uneven illumination, shadows).",
    )
    glare: float | None = Field(
        None, ge=0, le=1, description="Largest share of the field with glare (green >= 200 and > 2x its median)."
    )


class QualityConfig(Section):
    enabled: bool = Field(
        True,
        description="Put an image-quality gate into the bundle: predict, serve and verify answer 'ungradable' with "
        "the reasons (out of focus, too dark, over-exposed, uneven illumination, glare, partial field) and the advice "
        "to retake, and give no referral decision for such a photo.",
    )
    target_gradable: float = Field(
        0.97,
        ge=0.5,
        le=1.0,
        description="Share of gradable validation photos (as taken, and mildly degraded copies) the calibrated gate "
        "must pass; the cleared devices report 96-99% imageability.",
    )
    limits: QualityLimits = Field(
        default_factory=QualityLimits,
        description="Fixed limits per measure; a measure without one is calibrated on val to target_gradable.",
    )
    copies_per_image: int = Field(
        2,
        ge=1,
        le=20,
        description="Degraded copies drawn per val and test photo (tlcompile.data.degrade: blur, exposure, partial "
        "field, glare, eyelash shadow, uneven light; each labelled gradable or not) to calibrate and measure the gate.",
    )
    max_photos_per_split: int = Field(
        3000,
        ge=10,
        description="Most val and most test photos the quality stage degrades and measures (a split with more is "
        "sampled without replacement from the recipe's seed): photos are streamed one at a time, so this bounds the "
        "stage's time (about 0.13 s per 1600-px PNG photo with 2 copies on a 2-core VM), not its memory.",
    )


# --------------------------------------------------------------------------------------------- bundle
DEFAULT_INTENDED_USE = (
    "Aid to screening for referable diabetic retinopathy (moderate non-proliferative DR or worse) on colour fundus "
    "photographs of adults with diabetes, on the camera and population the model was validated on. A 'refer' result "
    "means: send to an eye-care professional. Not a diagnosis; not for other eye diseases; ungradable images need a "
    "retake or a referral."
)


class BundleConfig(Section):
    enabled: bool = Field(
        True, description="Write bundle/ (model, bundle.json, golden samples, manifest) at the end of the build."
    )
    select: Literal["fastest", "best_under_budget", "name"] = Field(
        "fastest",
        description="The build's choice among the bundle's candidates (what predict and serve run until tlcompile "
        "verify pins one for the clinic's CPU). Candidates are those measured on the bundle runtime(s) that meet the "
        "accuracy guard (compressed artifacts, judged on val), evaluate.endpoints and latency_budget_ms. fastest: the "
        "lowest p90, measured again on the build box in interleaved rounds, where a compressed one must beat the "
        "fastest fp32 one by more than the noise -- the guard is what makes a compressed model as good as fp32; "
        "best_under_budget: the highest test AUC (ties: the faster; note this chooses on the test split); name: the "
        "artifact named by bundle.artifact alone, whatever it measured.",
    )
    artifact: str = Field(
        "fp32", min_length=1, description="select: name: the artifact to bundle (fp32, pruned, int8, pruned-int8 ...)."
    )
    latency_budget_ms: float | None = Field(
        None,
        gt=0,
        description="select: fastest / best_under_budget: the largest p90 batch-1 latency (ms, as benched) allowed; "
        "None = no budget.",
    )
    runtime: Literal["auto", "openvino", "onnxruntime"] = Field(
        "auto",
        description="Runtime(s) of the bundle's candidates (their model files follow: OpenVINO IR or ONNX); auto = "
        "every runtime that was exported and benched, compared on the box by tlcompile verify. Models execute in f32 "
        "(not bf16), the precision the golden samples are checked in.",
    )
    candidates: Literal["non_dominated", "all", "chosen"] = Field(
        "non_dominated",
        description="Which artifacts the bundle carries for tlcompile verify to choose from on the clinic's box (it "
        "benches them there and pins the fastest that reproduces its golden outputs, in device.json). non_dominated: "
        "every one that meets the guard, endpoints and budget, less those beaten on every CPU (same runtime and "
        "precision, fewer MACs, as good on val); all: every one that meets them; chosen: only the build's choice. "
        "select: name always ships one.",
    )
    golden_samples: int = Field(
        8,
        ge=1,
        le=64,
        description="Test-split images shipped in the bundle with their expected outputs, for tlcompile verify on the "
        "box (they travel with the bundle: use de-identified data).",
    )
    explain_images: int = Field(
        60,
        ge=0,
        le=10000,
        description="Heatmaps of the bundle's model in the report (build stage explain, the method of predict "
        "--explain): the pointing game against the painted lesions is played on up to this many referable test "
        "images (synthetic data), and 2 test images per grade are shown; 0.15-0.45 s per image on 2 cores at "
        "112 px (AMD EPYC with AVX-512 / AVX2 only). 0: no explain stage.",
    )
    intended_use: str = Field(
        DEFAULT_INTENDED_USE,
        min_length=1,
        max_length=4000,
        description="Model-card intended use, written into bundle.json.",
    )


class MlflowConfig(Section):
    uri: str = Field(
        min_length=1,
        description="MLflow tracking URI: a local store such as 'file:./mlruns' (relative to where the build runs), "
        "or a server such as 'http://mlflow.team:5000'. Needs tlcompile[tracking].",
    )
    experiment: str = Field("tlcompile", min_length=1, description="MLflow experiment the build's run goes into.")

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        # A typo ('htp://...') or a blank passed validate, then MLflow's client refused it mid-build.
        valid = (
            "valid: file:PATH or a folder path (a local store), http(s)://HOST[:PORT] (a tracking server), databricks, "
            "or a database URI (sqlite:///PATH, postgresql://, mysql://, mssql://)"
        )
        if not value.strip() or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError(f"{value!r} is blank or has a space or control character in it; {valid}")
        match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", value)
        scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else None  # 'C:' is a drive, not a scheme
        base = scheme.split("+")[0] if scheme else None  # postgresql+psycopg2
        if base is not None and base not in _MLFLOW_SCHEMES and not _mlflow_plugin_scheme(scheme):
            raise ValueError(f"{value!r}: '{scheme}' is not a scheme MLflow tracks to; {valid}, or a plugin's")
        if base in ("http", "https"):
            parts = urllib.parse.urlsplit(value)
            try:
                parts.port  # noqa: B018 - raises for a port that is not a number or out of range
            except ValueError as err:
                raise ValueError(f"{value!r}: {err}; {valid}") from err
            if not parts.hostname:
                raise ValueError(f"{value!r} has no host; {valid}")
        return value


def _mlflow_plugin_scheme(scheme: str) -> bool:
    """A scheme an installed MLflow tracking-store plugin registers (its ``mlflow.tracking_store`` entry point), so
    a plugin's store (azureml://, ...) stays valid; False without MLflow (the build would then say it is missing)."""
    from importlib.metadata import entry_points

    return any(ep.name == scheme for ep in entry_points(group="mlflow.tracking_store"))


#: The tracking URI schemes MLflow's client takes (a database store's driver after '+', as in postgresql+psycopg2).
_MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc", "sqlite", "postgresql", "mysql",
                   "mssql")  # fmt: skip


class TrackingConfig(Section):
    mlflow: MlflowConfig | None = Field(
        None,
        description="Log the build to MLflow: the resolved recipe as params, per-epoch training metrics, stage times, "
        "each artifact row's key metrics, and report + bundle as artifacts; a sweep logs its variants as child runs.",
    )


# ------------------------------------------------------------------------------------------------ top
class Recipe(Section):
    name: str = Field(
        "build",
        min_length=1,
        max_length=100,
        description="Name of the build (used in reports and in the default output folder runs/<name>-<time>).",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # It names the default output folder: 'name: ../../x' or '/tmp/x' put a build outside runs/.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(
                f"{value!r} is not a plain name; valid: letters, digits, '.', '_' and '-', starting with a letter or "
                "digit (it names the build's folder under runs/)"
            )
        return value

    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed for data generation, splits, initialisation and training order."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Dataset, preprocessing and split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Architecture and source weights.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Supervised training.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export formats and parity checks.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Latency and accuracy measurement.")
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig,
        description="Clinical evaluation: operating point, endpoints, 95% CIs and calibration.",
    )
    bundle: BundleConfig = Field(
        default_factory=BundleConfig,
        description="The deployment bundle: which artifact, runtime, golden samples, model card.",
    )
    quality: QualityConfig = Field(
        default_factory=QualityConfig,
        description="The image-quality gate: calibrated on val, measured on test, shipped in the bundle.",
    )
    transfer: TransferConfig | None = Field(
        None,
        description="Transfer learning: init, strategy, phases and an optional comparison of variants. None: train "
        "from scratch, or two_phase from model.pretrained when it is set.",
    )
    prune: PruneConfig | None = Field(None, description="Pruning after training (artifact 'pruned'); None: no pruning.")
    quantize: QuantizeConfig | None = Field(
        None,
        description="INT8 quantization of the trained (and pruned) model (artifacts 'int8', 'pruned-int8'); None: "
        "FP32 only.",
    )

    tracking: TrackingConfig | None = Field(
        None,
        description="Where the build is logged for the team (MLflow); None: nowhere. Changes no stage and no "
        "fingerprint: where results are logged is not what was built.",
    )

    def effective_transfer(self) -> TransferConfig:
        """The transfer section that applies: the recipe's; without one, scratch (no source) or two_phase (a source)."""
        if self.transfer is not None:
            return self.transfer
        if self.model.pretrained == "none":
            return TransferConfig(init="random", strategy="scratch")
        return TransferConfig()

    @model_validator(mode="after")
    def _transfer_fits_model_and_train(self) -> Recipe:
        transfer = self.effective_transfer()
        implicit = (
            ""
            if self.transfer is not None
            else " (the default when model.pretrained is set and there is no transfer section)"
        )
        for i, v in enumerate(transfer.variants()):
            key = "transfer" if i == 0 else f"transfer.compare.{i - 1}"
            if v.init != "random" and self.model.pretrained == "none":
                raise ValueError(
                    f"{key}.init '{v.init}' needs source weights but model.pretrained is none; valid: model.pretrained "
                    "imagenet, a weights file or build:DIR, or init: random"
                )
            if v.strategy == "scratch" and v.init != "random":
                raise ValueError(
                    f"{key}: strategy scratch trains from a random init, not '{v.init}'; valid: init: random, or "
                    "strategy: full"
                )
            if v.strategy == "two_phase" and v.head_epochs >= self.train.epochs:
                raise ValueError(
                    f"{key}: two_phase{implicit} trains {v.head_epochs} head epochs, leaving none of train.epochs = "
                    f"{self.train.epochs} to fine-tune; valid: train.epochs > {v.head_epochs}, a smaller head_epochs, "
                    "or another strategy"
                )
        return self

    def artifact_names(self) -> list[str]:
        """The artifacts this recipe's build makes, in order: fp32, pruned (a prune section), int8 and pruned-int8 (a
        quantize section: INT8 of each FP32 one; see the prune and quantize stages)."""
        fp32 = ["fp32", *(["pruned"] if self.prune is not None else [])]
        return fp32 + ([f"{n}-int8" if n != "fp32" else "int8" for n in fp32] if self.quantize is not None else [])

    @model_validator(mode="after")
    def _bundle_artifact_is_built(self) -> Recipe:
        # select: name with an artifact the build makes no way to make failed at the very end of the build
        if self.bundle.enabled and self.bundle.select == "name" and self.bundle.artifact not in self.artifact_names():
            need = {
                "pruned": "a prune section",
                "int8": "a quantize section",
                "pruned-int8": "a prune and a quantize section",
            }.get(self.bundle.artifact)
            raise ValueError(
                f"bundle.artifact '{self.bundle.artifact}' is not made by this recipe"
                + (f" (it needs {need})" if need else "")
                + f"; valid: {', '.join(self.artifact_names())}"
            )
        return self

    @model_validator(mode="after")
    def _bundle_runtime_is_built(self) -> Recipe:
        # The bundle ships a measured export: its runtime must have been exported to and benched, or there is nothing
        # to ship.
        runtime = self.bundle.runtime
        if self.bundle.enabled and runtime != "auto":
            fmt = backend(runtime).format
            if fmt not in self.export.formats or runtime not in self.bench.runtimes:
                raise ValueError(
                    f"bundle.runtime '{runtime}' needs '{fmt}' in export.formats and '{runtime}' in bench.runtimes "
                    "(the bundle ships a measured export); valid: add them, or bundle.runtime: auto"
                )
        return self

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML/JSON types (paths as strings); ``tracking`` only when it is set."""
        resolved = json.loads(self.model_dump_json())
        if resolved.get("tracking") is None:
            resolved.pop("tracking", None)
        return resolved

    def fingerprint(self, sections: tuple[str, ...] | None = None) -> str:
        """sha256 of the resolved recipe (or of the listed top-level ``sections`` only): two builds with the same
        fingerprint did the same thing. Each build stage declares the sections it reads (``SECTIONS`` in
        :mod:`tlcompile.build.stages`): their fingerprint is what --resume compares."""
        resolved = self.to_yaml_dict()
        resolved.pop("tracking", None)  # where the build is logged does not change what it built
        for key in ("store", "loader_workers"):  # nor where its images wait (the same arrays either way)
            (resolved.get("data") or {}).pop(key, None)
        if sections is not None:
            resolved = {key: resolved.get(key) for key in sections}
        return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- loading
def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set '{text}': expected key.path=value, e.g. --set train.epochs=3")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set '{text}': '{key}' is not a key path; valid: dotted names such as train.lr")
    try:
        _check_events(raw, f"--set '{text}'")
        value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise RecipeError(
            f"--set '{text}': the value '{raw}' is not valid YAML ({getattr(err, 'problem', None) or err}); "
            f"quote a text value inside the --set: \"{key}='{raw}'\""
        ) from err
    return parts, value


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key '{key_node.value}' appears twice in one section (lines {seen[key_node.value]} and "
                        f"{line}); keep one",
                        key_node.start_mark,
                    )
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def _check_events(text: str, source: str) -> None:
    """On the event stream (no recursion): refuse aliases (alias bombs) and nesting deeper than MAX_RECIPE_DEPTH
    (the composer recurses per level, so a deep enough file would exhaust the stack). Syntax errors are left to
    the loader, which reports them with their line."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise RecipeError(f"{source}: YAML aliases (*name) are not allowed in recipes; write the values out")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_RECIPE_DEPTH:
                    raise RecipeError(
                        f"{source}: nested more than {MAX_RECIPE_DEPTH} levels deep (line "
                        f"{event.start_mark.line + 1}); a recipe's sections nest a few levels"
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        pass  # reported by the loader with its line


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[tuple[str, ...], str]:
    """Apply ``key.path=value`` overrides to a raw recipe dict, in place (values parsed as YAML scalars/lists).
    Returns each override's key path -> its text (a value that came from --set is blamed on the --set)."""
    set_keys: dict[tuple[str, ...], str] = {}
    for text in overrides:
        parts, value = _parse_override(text)
        set_keys[tuple(parts)] = text
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
    return set_keys


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


def _shown_key(key: Any) -> str:
    """A key as the one-line message shows it: a key with a newline or another control character is escaped."""
    text = str(key)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        valid = _section_fields(parent)
        return f"unknown key '{_shown_key(loc[-1])}'" + (f"; valid keys here: {', '.join(valid)}" if valid else "")
    if kind == "literal_error":
        return f"{err.get('input')!r} is not valid; {msg[0].lower() + msg[1:]}"
    value = err.get("input")
    if kind in ("model_type", "dict_type") or isinstance(value, dict) or repr(value) in msg:
        return msg
    return f"{value!r}: {msg[0].lower() + msg[1:]}"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class inside an annotation: ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((t for t in map(_section_type, get_args(annotation)) if t is not None), None)


def _section_fields(path: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in path:
        if part.isdigit():  # an item of a list of sections (transfer.compare.0): the item's fields
            continue
        field = model.model_fields.get(part)
        section = _section_type(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return sorted(model.model_fields)


def format_validation_error(
    err: ValidationError, source: str, text: str | None = None, set_keys: dict[tuple[str, ...], str] | None = None
) -> str:
    """One line: ``recipe.yaml: model.arch (line 9): 'x' is not a known model; known: ...``; a value given with
    ``--set`` (``set_keys``: its key path -> the --set text) is named by its --set instead of a line."""
    lines = _key_lines(text) if text else {}
    parts = []
    errors = err.errors()
    for e in errors[:3]:
        loc = tuple(str(p) for p in e["loc"])
        # the --set that gave this value, or whose path holds this unknown key (data.preprocessing.size=10 makes an
        # unknown 'preprocessing'), not the recipe line of its section
        given = next((o for key, o in (set_keys or {}).items() if loc[: len(key)] == key), None) or next(
            (o for key, o in (set_keys or {}).items() if e["type"] == "extra_forbidden" and key[: len(loc)] == loc),
            None,
        )
        # a check of a whole section (data.split: val + test) may be about values given by --set: named beside its line
        under = [o for key, o in (set_keys or {}).items() if loc and key[: len(loc)] == loc] if given is None else []
        line = None if given else lines.get(loc) or lines.get(loc[:-1])
        # A check across sections (loc empty) names its keys in its own message.
        origin = (
            f" (--set {given})"
            if given
            else f" ({f'line {line}, ' if line else ''}with --set {', --set '.join(under)})"
            if under
            else f" (line {line})"
            if line
            else ""
        )
        where = ".".join(_shown_key(p) for p in loc) + origin + ": " if loc else ""
        parts.append(f"{where}{_describe_error(e)}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    model = raw.get("model")
    pretrained = model.get("pretrained") if isinstance(model, dict) else None
    if isinstance(pretrained, str) and pretrained.strip() not in ("", "none", "imagenet", "build:"):
        # model.pretrained is a weights file or build:DIR; like data.csv it is relative to the recipe file.
        prefix = "build:" if pretrained.startswith("build:") else ""
        path = Path(pretrained[len(prefix) :].strip()).expanduser()
        model["pretrained"] = prefix + str(
            path if path.is_absolute() else _resolve(base_dir / path, "model.pretrained")
        )
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("root", "csv", "images", "cache"):
        value = data.get(key)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = _resolve(base_dir / path, f"data.{key}")
            else:
                _resolve(path, f"data.{key}")  # kept as written; a symbolic-link loop is refused now, in one line
            data[key] = str(path)


def _resolve(path: Path, key: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as err:  # Python < 3.13 raises RuntimeError for a symbolic-link loop
        raise RecipeError(
            f"{key} '{path}': cannot be resolved ({err}); a symbolic link in it points back at itself"
        ) from err


def _check_paths_exist(recipe: Recipe, source: str) -> None:
    if recipe.data.source == "synthetic":
        return
    from tlcompile.data.sources import resolve_layout
    from tlcompile.errors import DataError

    try:  # the label CSV and image folder a preset points at exist (before minutes are spent on anything else)
        resolve_layout(recipe.data)
    except DataError as err:
        raise RecipeError(f"{source}: {err}") from err


def read_recipe_text(path: Path) -> str:
    """Read a recipe file with clear errors for missing, huge, binary or non-UTF-8 files."""
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give the path of a .yaml recipe file")
    if not path.is_file():  # a FIFO would block for ever, /dev/zero never ends
        raise RecipeError(
            f"{path}: is not a regular file (a device, pipe or socket); give the path of a .yaml recipe file"
        )
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size} bytes is too large for a recipe (limit {MAX_RECIPE_BYTES} bytes)")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from err


def parse_recipe_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML safely (no Python objects); aliases are refused to defuse alias bombs."""
    _check_events(text, source)
    try:
        raw = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError as err:  # pragma: no cover - _check_events bounds the depth first
        raise RecipeError(f"{source}: nested too deeply") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from err
    if raw is None:
        raise RecipeError(f"{source}: the recipe is empty; start from recipes/quickstart.yaml")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{source}: the top level must be a mapping of sections (name, data, model, ...), not {type(raw).__name__}"
        )
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises :class:`RecipeError` with one line on any problem."""
    path = Path(path)
    text = read_recipe_text(path)
    source = str(path)
    raw = parse_recipe_yaml(text, source)
    set_keys = apply_overrides(raw, list(overrides or []))
    _resolve_paths(raw, path.resolve().parent)
    recipe = validate_recipe_dict(raw, source, text, set_keys)
    _check_paths_exist(recipe, source)
    return recipe


def validate_recipe_dict(
    raw: dict[str, Any],
    source: str = "recipe",
    text: str | None = None,
    set_keys: dict[tuple[str, ...], str] | None = None,
) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, text, set_keys)) from err


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe, for editors (yaml-language-server)."""
    return Recipe.model_json_schema()
