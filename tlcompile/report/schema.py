"""The typed contract of report.json: what ``tlcompile build`` writes and what other tools may read.

Every object whose keys are fixed forbids others (``extra="forbid"``), so a misspelt or smuggled key fails validation;
maps keyed by data (classes, splits, stages, candidates, layers) are ``dict[str, X]``. A value the build may write as
null is ``X | None``; a key the build leaves out where it does not apply (``transfer``, ``bundle``, a row's ``guard``
and ``compression`` ...) has no default value in the JSON and is *absent or X*, never null. Values are checked
strictly (a number written as text fails); a JSON integer is accepted where a float is expected.

Who writes what (the code this mirrors): the top level, ``data``, ``evaluation``, ``environment`` and the rows come
from the build (``assemble_report``, the bench stage); ``operating_point`` and each row's ``clinical`` from
:mod:`tlcompile.evaluate.clinical`; ``training`` and ``transfer`` from :mod:`tlcompile.train.transfer`; a row's
``guard`` and ``compression`` from the compress stages and :mod:`tlcompile.compress.guard`; ``bundle`` from
:mod:`tlcompile.export.bundle` (or its ``error`` / ``skipped`` forms). ``recipe`` is the resolved recipe, whose own
schema is ``tlcompile recipe schema``.

Only pydantic is imported: the module is torch-free and imports nothing else of tlcompile but its errors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from tlcompile.errors import TlcompileError
from tlcompile.report.quality import QualitySection


class ReportSchemaError(TlcompileError):
    """A report does not match the report.json schema; the message names the path of the first bad key."""


class _Strict(BaseModel):
    """An object with a fixed set of keys; values are not coerced (no "0.9" for 0.9, no 1 for true)."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------------------------- shared pieces
class SplitMetrics(_Strict):
    """Val or test metrics of a torch model at the locked operating point (None where undefined)."""

    auc: float | None
    sensitivity: float | None
    specificity: float | None
    accuracy: float | None


class Estimate(_Strict):
    """A point estimate and its 95% interval (bootstrap); None where undefined."""

    value: float | None
    ci: list[float] | None


class Proportion(_Strict):
    """``k`` of ``n`` with a Wilson 95% interval; value and ci are None when n is 0."""

    value: float | None
    ci: list[float] | None
    k: int
    n: int


class Distill(_Strict):
    teacher: str
    temperature: float
    alpha: float


class FinetuneEpoch(_Strict):
    """One fine-tuning epoch of a compression stage (loop.fit's record, plus the guard's verdict on it)."""

    epoch: int
    loss: float
    val_auc: float
    lr: float
    seconds: float
    guard_met: bool
    world_size: int = Field(None, description="Absent unless trained under torchrun.")


# ------------------------------------------------------------------------------------------------ evaluation
class OperatingPointVal(_Strict):
    n: int
    referable: int
    auc: float | None
    sensitivity: float | None
    specificity: float | None
    nll_before: float
    nll_after: float


class OperatingPoint(_Strict):
    """The referral threshold (and temperature) locked on the FP32 model's val split; every artifact is judged at it."""

    threshold: float
    method: Literal["youden", "sensitivity"]
    target_sensitivity: float | None
    temperature: float
    val: OperatingPointVal
    locked_on: str
    model: str


class EndpointTargets(_Strict):
    min_sensitivity: float | None
    min_specificity: float | None
    min_auc: float | None
    rule: Literal["point_estimate", "ci_lower_bound"]


class Evaluation(_Strict):
    """How the clinical numbers of the rows were computed."""

    split: str
    score: str
    ci_level: float
    ci_methods: dict[str, str]
    bootstrap_resamples: int
    bootstrap_seed: int
    calibration_bins: int
    endpoints: EndpointTargets
    reference: str
    test_targets_path: str


# -------------------------------------------------------------------------------------------------- clinical
class Roc(_Strict):
    fpr: list[float]
    tpr: list[float]


class CalibrationBin(_Strict):
    lo: float
    hi: float
    n: int
    mean_predicted: float | None
    observed: float | None


class Calibration(_Strict):
    ece: float
    brier: float
    bins: list[CalibrationBin]


class Grading(_Strict):
    """Five grades: quadratic weighted kappa and the grade confusion matrix (rows: truth)."""

    qwk: Estimate
    confusion: list[list[int]]
    accuracy: float | None


class VsReference(_Strict):
    """Paired against the fp32 row of the same runtime: deltas (new - reference) and changed referral decisions."""

    delta_auc: Estimate
    delta_sensitivity: Estimate
    delta_specificity: Estimate
    disagreement: Proportion
    newly_referred: int
    no_longer_referred: int
    missed_referable: int
    reference: str


class EndpointCheck(_Strict):
    target: float
    value: float | None
    ci_low: float | None
    passed: bool = Field(alias="pass")


EndpointName = Literal["min_sensitivity", "min_specificity", "min_auc"]


class EndpointVerdict(_Strict):
    rule: Literal["point_estimate", "ci_lower_bound"]
    checks: dict[EndpointName, EndpointCheck]
    passed: bool | None = Field(alias="pass", description="None when the recipe sets no endpoint.")


class Clinical(_Strict):
    """One row on the test split at the locked operating point (tlcompile.evaluate.clinical)."""

    n: int
    referable: int
    threshold: float
    temperature: float
    auc: Estimate
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion
    referral_confusion: list[list[int]] = Field(description="[[tn, fp], [fn, tp]]: rows truth, columns the decision.")
    roc: Roc
    calibration: Calibration
    calibration_unscaled: Calibration = Field(None, description="Absent unless temperature scaling is on.")
    grading: Grading = Field(None, description="Absent for the 2-class task.")
    vs_reference: VsReference = Field(None, description="Absent on the fp32 rows (the reference).")
    endpoints: EndpointVerdict


# ----------------------------------------------------------------------------------------------------- guard
class GuardItem(_Strict):
    """One metric of a guard check: the reference's value, the new value, the drop and its limit."""

    reference: float | None
    value: float | None
    drop: float | None
    max_drop: float | None
    met: bool = Field(None, description="Absent when the metric has no limit (max_drop null).")


class Evidence(_Strict):
    """What a guard verdict rests on, in val cases (tlcompile.compress.guard.evidence)."""

    referable: int
    referable_newly_missed: int
    referable_newly_caught: int
    non_referable: int
    non_referable_newly_referred: int
    non_referable_no_longer_referred: int
    decisions_changed: int
    n: int
    auc_drop_ci95: list[float] | None


class GuardCheck(_Strict):
    against: str
    split: Literal["val"]
    auc: GuardItem
    sensitivity: GuardItem
    specificity: GuardItem
    accuracy: GuardItem
    met: bool
    evidence: Evidence = Field(None, description="Absent when the check was made without the reference model's logits.")


class VsFp32(_Strict):
    auc_drop: float | None
    sensitivity_drop: float | None
    specificity_drop: float | None
    accuracy_drop: float | None


class Guard(_Strict):
    """The accuracy guard of a compressed artifact on val: met when every check is met; what was done when not."""

    met: bool
    checks: list[GuardCheck]
    actions: list[str]
    vs_fp32: VsFp32 = Field(None, description="Quantized artifacts: the final val drops against fp32.")


class TestFlag(_Strict):
    """A compressed row's test-split drop beyond its guard's own limit (the guard judged val)."""

    __test__ = False  # not a pytest class

    metric: str
    reference: str
    drop: float
    max_drop: float
    text: str


# ----------------------------------------------------------------------------------------------- compression
class Finetune(_Strict):
    history: list[FinetuneEpoch]
    kept_epoch: int


class ChannelPruneStep(_Strict):
    step: int
    params: int
    macs: int
    val_after_pruning: SplitMetrics
    finetune: Finetune = Field(None, description="Absent when prune.finetune_epochs is 0.")
    val: SplitMetrics


class MagnitudePruneStep(_Strict):
    step: int
    sparsity_target: float
    val_after_pruning: SplitMetrics
    finetune: Finetune = Field(None, description="Absent when prune.finetune_epochs is 0.")
    val: SplitMetrics


class PruneVal(_Strict):
    fp32: SplitMetrics
    pruned: SplitMetrics


class ChannelPrune(_Strict):
    """Structured channel pruning (torch-pruning): channels physically removed."""

    method: Literal["channel"]
    library: str
    ratio: float
    importance: str
    scope: str
    steps: list[ChannelPruneStep]
    params: list[int] = Field(description="[before, after]")
    macs: list[int] = Field(description="[before, after]")
    widths: dict[str, list[int]] = Field(description="Layer -> [width before, width after], where it changed.")
    kept_whole: list[str]
    calibration_images: int
    batchnorm: str
    distill: Distill | None
    val: PruneVal


class Sparsity(_Strict):
    sparsity: float
    weights: int
    zeros: int
    per_layer: dict[str, float]


class MagnitudePrune(_Strict):
    """Unstructured magnitude pruning (NNCF): zeroed weights in a dense model."""

    method: Literal["magnitude"]
    library: str
    ratio: float
    scope: str
    steps: list[MagnitudePruneStep]
    params: list[int] = Field(description="[before, after]")
    macs: list[int] = Field(description="[before, after]")
    sparsity: Sparsity
    weights_gzip_bytes: list[int] = Field(description="[before, after]")
    latency_note: str
    calibration_images: int
    batchnorm: str
    distill: Distill | None
    val: PruneVal


class QuantizerSummary(_Strict):
    weight_quantizers: int
    activation_quantizers: int
    per_channel_activations: int


class LayerSensitivity(_Strict):
    layer: str
    error_removed: float


class QuantizeSplits(_Strict):
    val: SplitMetrics
    test: SplitMetrics


class QuantizeFinal(_Strict):
    val: SplitMetrics
    test: SplitMetrics
    kept_epoch: int
    history: list[FinetuneEpoch]


class Quantize(_Strict):
    """INT8 by NNCF: post-training quantization, then (qat) quantization-aware fine-tuning."""

    method: Literal["ptq", "qat"]
    library: str
    source: str
    calibration_images: int
    batchnorm_folded: int
    quantizers: QuantizerSummary
    keep_fp32: list[str]
    fp32_layers: list[str]
    sensitivity: list[LayerSensitivity]
    distill: Distill | None
    ptq: QuantizeSplits
    final: QuantizeFinal
    reference_val: SplitMetrics
    kept: Literal["qat", "ptq"]


def _compression_kind(value: Any) -> str | None:
    method = value.get("method") if isinstance(value, dict) else getattr(value, "method", None)
    tags = {"channel": "channel prune", "magnitude": "magnitude prune", "ptq": "quantize", "qat": "quantize"}
    return tags.get(method)


Compression = Annotated[
    Annotated[ChannelPrune, Tag("channel prune")]
    | Annotated[MagnitudePrune, Tag("magnitude prune")]
    | Annotated[Quantize, Tag("quantize")],
    Discriminator(
        _compression_kind,
        custom_error_type="compression_method",
        custom_error_message="method must be channel, magnitude, ptq or qat",
    ),
]


# ------------------------------------------------------------------------------------------------------ rows
class Latency(_Strict):
    """Batch-1 latency in ms on the build box."""

    p50: float
    p90: float
    p99: float
    mean: float
    first_ms: float


class Metrics(_Strict):
    """Test-split metrics at the locked operating point (NaN where undefined)."""

    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    threshold: float
    n: int


class ExportParity(_Strict):
    """An exported file's logits against the torch model's on the same inputs."""

    runtime: str
    exec_precision: str
    n: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float


class SelfParity(_Strict):
    """A torch row: the reference itself."""

    max_abs_diff: float
    top1_agreement: float
    reference: Literal["self"]


def _parity_kind(value: Any) -> str:
    has = (lambda k: k in value) if isinstance(value, dict) else (lambda k: hasattr(value, k))
    return "self parity" if has("reference") else "export parity"


Parity = Annotated[
    Annotated[ExportParity, Tag("export parity")] | Annotated[SelfParity, Tag("self parity")],
    Discriminator(_parity_kind),
]


class Row(_Strict):
    """One artifact on one runtime (report["artifacts"][i])."""

    name: str
    format: str
    precision: str
    path: str
    size_bytes: int
    params: int
    macs: int
    runtime: str
    threads: int
    exec_precision: str
    latency_ms: Latency
    latency_iterations: int = Field(
        50, description="Timed calls behind latency_ms: fewer than bench.iterations where bench.max_seconds ended them."
    )
    metrics: Metrics
    parity: Parity
    lineage: str
    logits_path: str
    guard: Guard = Field(None, description="Compressed artifacts only.")
    compression: Compression = Field(None, description="Compressed artifacts only: what the last compression step did.")
    clinical: Clinical
    test_flags: list[TestFlag] = Field(None, description="Rows with a guard only.")


# -------------------------------------------------------------------------------------------------- training
class TrainEpoch(_Strict):
    epoch: int
    loss: float
    val_auc: float
    lr: float
    seconds: float
    phase: str
    optimizer: str
    trainable_params: int
    world_size: int = Field(None, description="Absent unless trained under torchrun.")


class Phase(_Strict):
    name: str
    epochs: int
    trainable_blocks: list[str]
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    first_epoch: int
    last_epoch: int
    trainable_params: int


class SourceLoad(_Strict):
    """What loading the source weights did (tlcompile.models.pretrained.apply_source_weights)."""

    loaded: int
    model_tensors: int
    key_rule: str
    missing_keys: list[str]
    unexpected_keys: list[str]
    classifier: str
    classifier_loaded: bool
    classifier_keys_not_loaded: list[str]


class Initialisation(_Strict):
    init: str
    source: SourceLoad = Field(None, description="Absent for init: random.")
    redrawn_blocks: list[str] = Field(None, description="init: mean_var only.")
    kept_blocks: list[str] = Field(None, description="init: partial:K only.")
    reinitialised_blocks: list[str] = Field(None, description="init: partial:K only.")


class Training(_Strict):
    """The selected variant's training run."""

    history: list[TrainEpoch]
    best_epoch: int
    best_val_auc: float
    wall_s: float
    variant: str
    init: str
    strategy: str
    seed: int
    phases: list[Phase]
    initialisation: Initialisation
    device: str
    amp: str
    channels_last: bool
    fast_training: bool = Field(
        False,
        description="TLCOMPILE_FAST_TRAINING=1: the fused optimizer update and tlcompile.train.depthwise's weight "
        "gradient trained this build (and fine-tuned its compressed models); off in reports written before it existed.",
    )


class TransferRun(_Strict):
    seed: int
    val_auc: float | None
    test_auc: float | None
    best_epoch: int | None
    epochs_to_target: int | None
    wall_s: float | None
    error: str | None


class TransferRow(_Strict):
    """One variant: mean and sd over its seeds (sd None with one seed)."""

    variant: str
    init: str
    strategy: str
    val_auc: float | None
    val_auc_sd: float | None
    test_auc: float | None
    test_auc_sd: float | None
    epochs_to_target: float | None
    epochs_to_target_sd: float | None
    wall_s: float | None
    wall_s_sd: float | None
    target_reached: int
    repeats: int
    selected: bool
    errors: list[str]
    runs: list[TransferRun]


class TransferSource(BaseModel):
    """The source weights' provenance; further keys depend on the kind (imagenet: url, weights, sha256 check; build:
    what the source build says about itself), so this object is open."""

    model_config = ConfigDict(extra="allow", strict=True)

    spec: str
    kind: str
    file: str
    sha256: str
    arch: str
    num_classes: int
    tensors: int


class Transfer(_Strict):
    """report["transfer"]: the variant table, the selection and the source (tlcompile.train.transfer.transfer_table)."""

    columns: list[str]
    rows: list[TransferRow]
    selected: str
    selected_seed: int
    selected_by: str
    target_val_auc: float | None
    target_rule: str
    repeats: int
    source: TransferSource | None


# ---------------------------------------------------------------------------------------------------- bundle
class SelectionCandidate(_Strict):
    id: str
    name: str
    runtime: str
    p90_ms: float | None
    auc: float | None
    guard_met: bool | None
    endpoints_pass: bool | None
    eligible: bool
    why_not: str | None
    in_bundle: bool


class MeasuredOnBuildBox(_Strict):
    p50_ms: float
    p90_ms: float
    p90_spread_ms: float
    p50_spread_ms: float
    rounds: int
    iterations_per_round: int


class Selection(_Strict):
    """How the bundle's default candidate was chosen; the last four keys only when it was measured on the build box
    (select: fastest with several candidates)."""

    rule: str
    runtime: str
    latency_budget_ms: float | None
    chosen: str
    chosen_id: str
    ranked_by: str
    candidates: list[SelectionCandidate]
    measured_on_build_box: dict[str, MeasuredOnBuildBox] = Field(None, description="Candidate id -> its latency.")
    load_average: list[float] | None = Field(None, description="Absent, or null where the OS has none.")
    noise: str | None = Field(None, description="Absent, or null when the measurement was not noisy.")
    why: str = Field(None)


class VerifyCandidate(_Strict):
    max_abs_logit_diff: float


class BundleVerify(_Strict):
    passed: bool
    max_abs_logit_diff: float
    max_abs_pixel_diff: int
    candidates: dict[str, VerifyCandidate]


class Bundle(_Strict):
    """The bundle written to ``bundle/`` (tlcompile.export.bundle.write_bundle)."""

    path: str
    artifact: str
    runtime: str
    precision: str
    default_candidate: str
    candidates: list[str]
    manifest_sha256: str
    selection: Selection
    golden_samples: int
    verify: BundleVerify


class BundleFailed(_Strict):
    """No bundle could be made (the build raises this error after writing the report)."""

    error: str


class BundleSkipped(_Strict):
    """Nothing to bundle (no OpenVINO or ONNX Runtime row)."""

    skipped: str


def _bundle_kind(value: Any) -> str:
    has = (lambda k: k in value) if isinstance(value, dict) else (lambda k: hasattr(value, k))
    return "bundle error" if has("error") else "bundle skipped" if has("skipped") else "bundle written"


BundleRecord = Annotated[
    Annotated[Bundle, Tag("bundle written")]
    | Annotated[BundleFailed, Tag("bundle error")]
    | Annotated[BundleSkipped, Tag("bundle skipped")],
    Discriminator(_bundle_kind),
]


# ----------------------------------------------------------------------------------------------- environment
class Cpu(_Strict):
    model: str
    machine: str
    logical_cores: int | None
    usable_cores: int
    isa: list[str]


class Cuda(_Strict):
    version: str | None
    device: str
    count: int


class Environment(_Strict):
    tlcompile: str
    python: str
    torch: str
    openvino: str | None = Field(description="None where it is not installed.")
    onnxruntime: str | None = Field(description="None where it is not installed.")
    platform: str
    cpu: Cpu
    cuda: Cuda = Field(None, description="Absent where no GPU was available.")


# ----------------------------------------------------------------------------------------------------- explain
class ExplainTiming(_Strict):
    median: float | None = Field(description="Milliseconds per explained image (heatmap only), this CPU.")
    p90: float | None
    n: int


class ExplainExample(_Strict):
    id: str
    grade: int
    referable_dr_probability: float
    refer: bool
    file: str = Field(description="The overlay PNG, relative to the build folder.")
    peak: list[int] = Field(description="(row, column) of the heatmap's peak in the network input.")


class PointingGame(_Strict):
    """Hit: the heatmap's peak within ``tolerance_px`` of a painted lesion (opacity >= ``lesion_level``)."""

    n: int
    hit_rate: Proportion
    chance: Estimate = Field(description="Mean share of the field within the tolerance of a lesion: a random peak.")
    centre: Proportion = Field(description="The same hit test for a peak at the field's centre.")
    tolerance_px: float
    input_size: int
    lesion_level: float
    images: str


class Explain(_Strict):
    """Heatmaps of the shipped model through its deployed runtime (build stage explain)."""

    method: str
    method_detail: str
    candidate: str
    runtime: str
    threads: int
    latency_ms: ExplainTiming = Field(description="Per explained image (the heatmap alone), on the build box.")
    examples: list[ExplainExample]
    sheet: str | None
    pointing_game: PointingGame | None
    pointing_note: str = Field(
        None, description="Why the pointing game was not played (data without lesion positions)."
    )


class ExplainSkipped(_Strict):
    skipped: str


# ------------------------------------------------------------------------------------------------------- top
class Preprocessing(_Strict):
    size: int
    crop_fov: bool
    mean: list[float]
    std: list[float]
    fov_threshold: float
    ben_graham: bool
    circular_mask: float | None
    extra: dict[str, Any]
    version: int = Field(2, description="The preprocessing arithmetic (PREPROCESS_VERSION); reports without it: 2.")


class DataSummary(_Strict):
    counts: dict[str, dict[str, int]] = Field(description="Split -> class name -> images.")
    images: int


class Report(_Strict):
    """report.json of a build."""

    model_config = ConfigDict(extra="forbid", strict=True, title="tlcompile report.json")

    tlcompile_version: str
    created: str
    name: str
    recipe: dict[str, Any] = Field(description="The resolved recipe (its schema: tlcompile recipe schema).")
    recipe_sha256: str
    task: Literal["referable", "grade"]
    class_names: list[str]
    preprocessing: Preprocessing
    data: DataSummary
    operating_point: OperatingPoint
    evaluation: Evaluation
    training: Training
    transfer: Transfer = Field(None, description="Absent unless the recipe transfers from source weights or compares.")
    artifacts: list[Row]
    stage_seconds: dict[str, float]
    environment: Environment
    bundle: BundleRecord = Field(None, description="Absent when the recipe makes no bundle (bundle.enabled: false).")
    explain: Explain | ExplainSkipped = Field(None, description="Absent when the recipe makes no bundle.")
    quality: QualitySection = Field(None, description="The image-quality gate; absent when quality.enabled is false.")


# ------------------------------------------------------------------------------------------------ validation
def _path(loc: tuple[Any, ...], data: Any) -> str:
    """The error location as a path into the data (``artifacts.3.guard.checks.0.met``), without the union tags
    pydantic puts in it (a tag -- "bundle error", "quantize" ... -- is a step that is no key or index of the data)."""
    parts: list[str] = []
    node = data
    for i, step in enumerate(loc):
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif i < len(loc) - 1 or step == "[key]":
            continue  # a union tag (or a dict-key marker)
        parts.append(str(step))
    return ".".join(parts) or "(top level)"


def _problem(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key (not in the report.json schema)"
    if kind == "missing":
        return "required key is missing"
    value = error.get("input")
    got = "" if isinstance(value, (dict, list)) else f" (got {repr(value)[:60]})"
    return f"{error['msg'][:1].lower()}{error['msg'][1:]}{got}"


def validate_report(obj: Any) -> Report:
    """``obj`` (report.json, parsed) as a :class:`Report`; raises :class:`ReportSchemaError` naming the path of the
    first key that does not match, and how many problems there are in all."""
    try:
        return Report.model_validate(obj)
    except ValidationError as err:
        errors = err.errors()
        first, hint = errors[0], ""
        if first["type"] == "missing":  # a misspelt key is missing under its own name and unknown under the other
            parent = first["loc"][:-1]
            unknown = next((e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == parent), None)
            if unknown is not None:
                first, hint = unknown, f"; '{first['loc'][-1]}' is missing: misspelt?"
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ReportSchemaError(f"report.json: {_path(first['loc'], obj)}: {_problem(first)}{hint}{more}") from err


def report_json_schema() -> dict[str, Any]:
    """The JSON Schema of report.json (for readers in other languages and for editors)."""
    return Report.model_json_schema()
