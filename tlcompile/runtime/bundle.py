"""A deployment bundle on the clinic's box: load it, check its hashes, run its golden samples (never imports torch).

A bundle is the folder ``tlcompile build`` writes as ``out/bundle/``::

    bundle.json        what the model is and how to use it: input size, preprocessing, class names, the
                       referable-DR threshold, endpoints and measured values, model-card fields
    model/             every candidate's model: OpenVINO IR (.xml/.bin) and/or ONNX, e.g. fp32.onnx, int8.xml
    golden/            camera-like frames (PNG) and golden.npz: what the build box computed from them, per candidate
    manifest.json      {"files": {relpath: {"sha256", "size"}}} of every other file
    device.json        written on the clinic's box by ``tlcompile verify``: the candidate pinned for this CPU

A bundle carries several *candidates* (an artifact on a runtime, e.g. ``int8@openvino``): every one that met the
accuracy guard and the endpoints at build time. bundle.json's top-level ``artifact``/``model``/``golden`` describe the
build's own choice (``default_candidate``); ``candidates`` lists them all. Which one is fastest depends on the CPU, so
:func:`verify_bundle` -- the first thing to run on a new box -- proves the files are the ones the build wrote, runs
every candidate's golden samples on this box's runtime, benches those that pass and pins the fastest
(:mod:`tlcompile.runtime.pinning`). predict and serve then run the pinned candidate.
"""

from __future__ import annotations

import functools
import json
import math
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.errors import BundleError, TlcompileError, UnsafeFileError
from tlcompile.evaluate.metrics import referable_classes, softmax
from tlcompile.runtime.backends import SHIPPABLE_RUNTIMES
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.inference import InferenceSession, open_session, predict_logits
from tlcompile.runtime.manifest import MANIFEST_JSON, ManifestCheck, check_manifest, inside
from tlcompile.runtime.pinning import (
    DEFAULT_ROUNDS,
    DEVICE_JSON,
    bench_interleaved,
    choose,
    device_record,
    noise_warning,
    read_device,
    write_device,
)
from tlcompile.runtime.pipeline import model_threads
from tlcompile.runtime.preprocess import PreprocessSpec, prepare_image, to_input
from tlcompile.runtime.quality import QualityCheck, QualityGate, check_quality
from tlcompile.runtime.signing import SignatureCheck, check_signature

BUNDLE_FORMAT_VERSION = 2  # 2: several candidates (artifact@runtime), each with its golden logits
BUNDLE_JSON = "bundle.json"
GOLDEN_NPZ = "golden/golden.npz"
REFER, NO_REFERRAL, UNGRADABLE = "refer", "no referral", "ungradable"

# bundle.json keys predict/verify/serve rely on, with the type each must have.
_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "name": str,
    "task": str,
    "class_names": list,
    "preprocessing": dict,
    "model.entry": str,
    "model.files": list,
    "model.runtime": str,
    "model.precision": str,
    "operating_point.threshold": (int, float),
    "operating_point.temperature": (int, float),
    "golden.file": str,
    "golden.images": list,
    "golden.tolerance.max_abs_logit": (int, float),
    "golden.tolerance.max_abs_pixel": int,
}


def _lookup(meta: dict[str, Any], dotted: str) -> Any:
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


@dataclass(frozen=True)
class Reading:
    """What the bundle says about one image: the referral decision at the locked threshold, and the grade."""

    referral: str  # refer | no referral | ungradable
    referable_dr: bool | None
    referable_dr_probability: float | None
    grade: int | None = None  # 5-grade bundles only
    grade_name: str | None = None
    grade_probability: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle.json and where its files are; open a session with :meth:`open_session`."""

    root: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocessing(self) -> PreprocessSpec:
        try:
            return PreprocessSpec.from_dict(self.meta["preprocessing"])
        except TlcompileError as err:  # out of range: a size that would allocate hundreds of GiB, a zero std ...
            raise BundleError(f"{self.root / BUNDLE_JSON}: {err}") from err

    @functools.cached_property
    def quality_gate(self) -> QualityGate | None:
        """The image-quality gate (bundle.json ``quality``); None for a bundle built without one (before the gate)."""
        block = self.meta.get("quality")
        return None if block is None else QualityGate.from_dict(block, f"{self.root / BUNDLE_JSON}: quality")

    @property
    def threshold(self) -> float:
        """The referable-DR operating point, locked on the validation split of the FP32 model."""
        return float(self.meta["operating_point"]["threshold"])

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on validation (1.0 without temperature scaling); the threshold is on its scale."""
        return float(self.meta["operating_point"].get("temperature", 1.0))

    @property
    def runtime(self) -> str:
        return self.meta["model"]["runtime"]

    @property
    def precision(self) -> str:
        return self.meta["model"]["precision"]

    @property
    def model_path(self) -> Path:
        return inside(self.root, self.meta["model"]["entry"], f"{self.root / BUNDLE_JSON}: model.entry")

    @property
    def artifact(self) -> str:
        return str(self.meta.get("artifact", {}).get("name", "?"))

    @property
    def candidate_id(self) -> str:
        """``artifact@runtime`` of the model this view runs."""
        return self.meta.get("candidate_id") or f"{self.artifact}@{self.runtime}"

    @property
    def compressed(self) -> bool:
        """Pruned or quantized (anything but the fp32 artifact the others were made from)."""
        art = self.meta.get("artifact", {})
        return bool(art.get("compressed", art.get("name") != "fp32"))

    @property
    def candidates(self) -> list[str]:
        """Every candidate's id (a format-1 bundle has one: its model)."""
        listed = self.meta.get("candidates")
        if not listed:
            return [self.candidate_id]
        return [c["id"] for c in listed]

    @property
    def default_candidate(self) -> str:
        """The build's choice: what predict and serve run on a box that has no pin (device.json)."""
        return self.meta.get("default_candidate") or self.candidate_id

    def candidate(self, cid: str) -> Bundle:
        """A view of the bundle as if ``cid`` were its only model: its artifact, model files and golden logits."""
        listed = self.meta.get("candidates")
        if not listed:
            if cid != self.candidate_id:
                raise BundleError(f"{self.root / BUNDLE_JSON}: no candidate '{cid}'; candidates: {self.candidate_id}")
            return self
        for c in listed:
            if c["id"] == cid:
                meta = {
                    **self.meta,
                    "artifact": c["artifact"],
                    "model": c["model"],
                    "measured": c.get("measured", {}),
                    "golden": {**self.meta["golden"], **c["golden"]},
                    "candidate_id": cid,
                }
                return Bundle(root=self.root, meta=meta)
        raise BundleError(f"{self.root / BUNDLE_JSON}: no candidate '{cid}'; candidates: {', '.join(self.candidates)}")

    def open_session(self, threads: int | None = None, *, busy_wait: bool = True) -> InferenceSession:
        """The model on the runtime and execution precision the golden samples were produced with (``busy_wait``:
        see :func:`tlcompile.runtime.inference.open_session`)."""
        return open_session(
            self.model_path, self.runtime, threads=threads, precision=self.precision, busy_wait=busy_wait
        )

    def interpret(self, logits: np.ndarray) -> list[Reading]:
        """Logits (N, C) -> one :class:`Reading` per row.

        The referable-DR probability is the same score the threshold was locked on: softmax(logits / temperature),
        then p[1] with 2 classes or p[moderate] + p[severe] + p[proliferative] with 5 grades. A score at or above
        the threshold means refer, exactly as in the build's metrics.
        """
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise BundleError(
                f"the model returned logits of shape {logits.shape}; bundle.json lists "
                f"{len(self.class_names)} classes ({', '.join(self.class_names)})"
            )
        p = softmax(logits / self.temperature)
        five_grades = p.shape[1] == 5
        score = p[:, referable_classes(p.shape[1])].sum(axis=1)
        readings = []
        for i in range(p.shape[0]):
            refer = bool(score[i] >= self.threshold)
            grade = int(p[i].argmax()) if five_grades else None
            readings.append(
                Reading(
                    referral=REFER if refer else NO_REFERRAL,
                    referable_dr=refer,
                    referable_dr_probability=float(score[i]),
                    grade=grade,
                    grade_name=self.class_names[grade] if grade is not None else None,
                    grade_probability=float(p[i, grade]) if grade is not None else None,
                )
            )
        return readings


def bundle_root(path: str | Path) -> Path:
    """The bundle's folder, from the folder or its bundle.json (what every command accepts)."""
    path = Path(path)
    return path.parent if path.name == BUNDLE_JSON and path.is_file() else path


def load_bundle(path: str | Path) -> Bundle:
    """Read ``bundle.json`` from a bundle folder (or the file itself); checks its shape, not its hashes."""
    path = Path(path)
    root = bundle_root(path)
    meta_path = root / BUNDLE_JSON
    if not root.is_dir():
        raise BundleError(f"bundle '{path}' is not a folder; give the bundle/ folder a build wrote (BUILD_DIR/bundle)")
    if not meta_path.is_file():
        raise BundleError(
            f"bundle '{root}' has no {BUNDLE_JSON}; give the bundle/ folder a build wrote (BUILD_DIR/bundle)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise BundleError(f"{meta_path}: not UTF-8 text; the bundle is damaged (run tlcompile verify)") from err
    except json.JSONDecodeError as err:
        raise BundleError(
            f"{meta_path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the bundle is damaged"
        ) from err
    except RecursionError as err:  # arrays within arrays, thousands deep: json's parser gives up
        raise BundleError(f"{meta_path}: not a bundle file (nested too deeply); the bundle is damaged") from err
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: the top level must be an object, not {type(meta).__name__}")
    version = meta.get("format_version")
    if isinstance(version, int) and version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{meta_path}: format_version {version} is newer than this tlcompile reads ({BUNDLE_FORMAT_VERSION}); "
            "upgrade tlcompile on this box"
        )
    for key, kind in _REQUIRED_KEYS.items():
        try:
            value = _lookup(meta, key)
        except KeyError as err:
            raise BundleError(
                f"{meta_path}: key '{key}' is missing; the bundle is damaged or not from tlcompile"
            ) from err
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{meta_path}: key '{key}' is {value!r}; expected {_kind_name(kind)}")
    bundle = Bundle(root=root, meta=meta)
    if bundle.runtime not in SHIPPABLE_RUNTIMES:
        raise BundleError(
            f"{meta_path}: model.runtime '{bundle.runtime}' is not valid; valid: {', '.join(SHIPPABLE_RUNTIMES)}"
        )
    if bundle.task not in ("referable", "grade") or len(bundle.class_names) != (2 if bundle.task == "referable" else 5):
        raise BundleError(
            f"{meta_path}: task '{bundle.task}' with {len(bundle.class_names)} class names; "
            "valid: referable (2), grade (5)"
        )
    if not (0.0 < bundle.threshold < 1.0):  # 'not' also catches NaN
        raise BundleError(
            f"{meta_path}: operating_point.threshold {bundle.threshold}; valid: a probability strictly between 0 and 1 "
            "(0 refers everyone, 1 no one)"
        )
    if not (math.isfinite(bundle.temperature) and bundle.temperature > 0):
        raise BundleError(f"{meta_path}: operating_point.temperature {bundle.temperature}; valid: a finite number > 0")
    bundle.preprocessing  # noqa: B018 - raises BundleError now for an out-of-range spec (PreprocessSpec bounds it)
    bundle.quality_gate  # noqa: B018 - raises BundleError now for a damaged quality block (absent: no gate, as before)
    _check_candidates(meta, meta_path)
    bundle.model_path  # noqa: B018 - raises UnsafeFileError now for an entry outside the bundle, not at first use
    if meta.get("candidates") and bundle.candidate(bundle.default_candidate).meta["model"] != meta["model"]:
        raise BundleError(
            f"{meta_path}: model and the default candidate {bundle.default_candidate}'s model disagree; "
            "the bundle is damaged"
        )
    for cid in bundle.candidates:  # raises UnsafeFileError now for an entry outside the bundle, not at first use
        view = bundle.candidate(cid)
        view.model_path  # noqa: B018
        if view.runtime not in SHIPPABLE_RUNTIMES:
            raise BundleError(
                f"{meta_path}: candidate {cid}: model.runtime '{view.runtime}' is not valid; "
                f"valid: {', '.join(SHIPPABLE_RUNTIMES)}"
            )
    return bundle


def _check_candidates(meta: dict[str, Any], meta_path: Path) -> None:
    listed = meta.get("candidates")
    if listed is None:
        return
    if not isinstance(listed, list) or not listed:
        raise BundleError(f"{meta_path}: candidates is {listed!r}; expected a non-empty list")
    ids = []
    for i, c in enumerate(listed):
        for key, kind in (("id", str), ("artifact", dict), ("model", dict), ("golden", dict)):
            if not isinstance(c, dict) or not isinstance(c.get(key), kind):
                raise BundleError(f"{meta_path}: candidates[{i}].{key} is missing or not {_kind_name(kind)}")
        for key, kind in (("entry", str), ("files", list), ("runtime", str), ("precision", str)):
            if not isinstance(c["model"].get(key), kind):
                raise BundleError(f"{meta_path}: candidates[{i}].model.{key} is missing or not {_kind_name(kind)}")
        if not isinstance(c["golden"].get("logits_key"), str) or not isinstance(c["golden"].get("expected"), list):
            raise BundleError(f"{meta_path}: candidates[{i}].golden needs logits_key and expected")
        ids.append(c["id"])
    if len(set(ids)) != len(ids):
        raise BundleError(f"{meta_path}: candidate ids repeat: {', '.join(ids)}")
    if meta.get("default_candidate") not in ids:
        raise BundleError(
            f"{meta_path}: default_candidate {meta.get('default_candidate')!r} is not one of the candidates "
            f"({', '.join(ids)})"
        )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"int": "an integer", "float": "a number", "str": "a string", "list": "a list", "dict": "an object"}[k.__name__]
        for k in kinds
    )


# ------------------------------------------------------------------------------------------------ golden
@dataclass
class GoldenCheck:
    """This box's outputs on the golden samples against what the build box computed."""

    samples: int = 0
    max_abs_logit_diff: float = math.nan  # stored inputs -> model, against the stored logits
    max_abs_input_diff: float = math.nan  # stored prepared images -> to_input, against the stored inputs
    max_abs_pixel_diff: int = -1  # golden PNG -> prepare_image, against the stored prepared images
    max_abs_probability_diff: float = math.nan  # golden PNG end to end, referable-DR probability
    fov_agree: int = 0
    decisions_agree: int = 0
    readings_inconsistent: int = (
        0  # stored readings that do not follow from the stored logits at bundle.json's operating point
    )
    tolerance_logit: float = 0.0
    tolerance_pixel: int = 0
    runtime: str = ""
    exec_precision: str = ""
    threads: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.samples > 0


def _load_golden(bundle: Bundle) -> dict[str, np.ndarray]:
    path = inside(bundle.root, bundle.meta["golden"]["file"], f"{bundle.root / BUNDLE_JSON}: golden.file")
    key = bundle.meta["golden"].get("logits_key", "logits")
    try:
        # allow_pickle=False: a bundle arrives from elsewhere, and a pickled object array could run code.
        with np.load(path, allow_pickle=False) as npz:
            golden = {k: npz[k] for k in ("prepared", "fov_found", "inputs")}
            golden["logits"] = npz[key]
    except FileNotFoundError as err:
        raise BundleError(f"{path}: golden samples missing") from err
    except KeyError as err:
        raise BundleError(f"{path}: golden array {err} is missing; the bundle is damaged") from err
    # A damaged archive fails in many ways (bad zip, truncated member, bad deflate stream, bad header): all are damage.
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise BundleError(
            f"{path}: cannot read the golden samples ({type(err).__name__}: {str(err)[:120]}); the bundle is damaged"
        ) from err
    n = golden["logits"].shape[0] if golden["logits"].ndim else 0
    if (
        not n
        or any(v.ndim == 0 or v.shape[0] != n for v in golden.values())
        or len(bundle.meta["golden"]["images"]) != n
    ):
        raise BundleError(f"{path}: golden arrays and golden.images in bundle.json disagree in length")
    if golden["logits"].ndim != 2 or not np.all(np.isfinite(golden["logits"])):
        raise BundleError(
            f"{path}: golden logits of {bundle.candidate_id} are not a finite (N, classes) array; the bundle is damaged"
        )
    return golden


def _expected_readings(bundle: Bundle, n: int) -> list[dict[str, Any]]:
    expected = bundle.meta["golden"].get("expected")
    if not isinstance(expected, list) or len(expected) != n or not all(isinstance(e, dict) for e in expected):
        raise BundleError(
            f"{bundle.root / BUNDLE_JSON}: golden.expected of {bundle.candidate_id} "
            "must list one stored reading per golden image"
        )
    return expected


def _same_reading(a: Reading, e: dict[str, Any], tolerance: float) -> bool:
    p = e.get("referable_dr_probability")
    return (
        a.referral == e.get("referral")
        and a.grade == e.get("grade")
        and isinstance(p, (int, float))
        and abs(a.referable_dr_probability - p) <= tolerance
    )


def check_golden(bundle: Bundle, *, threads: int | None = None, session: InferenceSession | None = None) -> GoldenCheck:
    """Run the golden samples through this box's preprocessing and runtime and compare with what the build stored:
    the network inputs, the logits, and the readings (referral, grade, P(referable DR)) in bundle.json.

    The stored readings are also checked against the stored logits read with bundle.json's own threshold and
    temperature: an operating point edited after the build (threshold 1.0 refers no one) cannot pass."""
    tol = bundle.meta["golden"]["tolerance"]
    check = GoldenCheck(tolerance_logit=float(tol["max_abs_logit"]), tolerance_pixel=int(tol["max_abs_pixel"]))
    golden = _load_golden(bundle)
    check.samples = int(golden["logits"].shape[0])
    spec = bundle.preprocessing
    stored = _expected_readings(bundle, check.samples)
    # Moving every logit by at most d moves P(referable DR) by at most d / (2 T) (see export.bundle._pick_golden).
    p_tolerance = check.tolerance_logit / (2 * bundle.temperature) + 1e-6

    # 0. bundle.json's operating point reproduces the stored readings from the stored logits.
    from_stored = bundle.interpret(golden["logits"])
    mismatched = check.readings_inconsistent = sum(
        not _same_reading(a, e, 1e-6) for a, e in zip(from_stored, stored, strict=True)
    )
    if mismatched:
        check.problems.append(
            f"{mismatched} of {check.samples} stored golden readings do not follow from the stored logits at "
            f"bundle.json's threshold {bundle.threshold:.6g} / temperature {bundle.temperature:.6g}: "
            "the operating point or the expected outputs were changed after the build"
        )

    # 1. Normalisation: the stored prepared images give the stored network inputs.
    check.max_abs_input_diff = float(np.abs(to_input(golden["prepared"], spec) - golden["inputs"]).max())
    if not check.max_abs_input_diff <= 1e-5:
        check.problems.append(f"normalisation differs: max |Δinput| {check.max_abs_input_diff:.2e} > 1e-05")

    # 2. The model on this runtime: stored inputs -> logits.
    session = session or bundle.open_session(threads)
    check.runtime, check.exec_precision, check.threads = session.runtime, session.exec_precision, int(session.threads)
    logits = predict_logits(session, golden["inputs"].astype(np.float32))
    if logits.shape != golden["logits"].shape:
        check.problems.append(
            f"the model returns logits of shape {logits.shape}; the stored ones are {golden['logits'].shape}"
        )
        return check
    check.max_abs_logit_diff = float(np.abs(logits.astype(np.float64) - golden["logits"]).max())
    if not check.max_abs_logit_diff <= check.tolerance_logit:  # 'not <=' also catches NaN
        check.problems.append(
            f"model outputs differ: max |Δlogit| {check.max_abs_logit_diff:.2e} > tolerance {check.tolerance_logit:g}"
        )

    # 3. End to end from the camera-like frames: decode -> field of view -> resize -> model -> decision.
    prepared, fov = [], []
    for rel in bundle.meta["golden"]["images"]:
        image, found = prepare_image(inside(bundle.root, rel, f"{bundle.root / BUNDLE_JSON}: golden.images"), spec)
        prepared.append(image)
        fov.append(found)
    prepared_here = np.stack(prepared)
    if prepared_here.shape != golden["prepared"].shape:
        check.problems.append(
            f"preprocessing gives images of shape {prepared_here.shape[1:]}; "
            f"the stored ones are {golden['prepared'].shape[1:]}"
        )
        return check
    check.max_abs_pixel_diff = int(np.abs(prepared_here.astype(np.int16) - golden["prepared"].astype(np.int16)).max())
    if check.max_abs_pixel_diff > check.tolerance_pixel:
        check.problems.append(
            f"preprocessing differs: max |Δpixel| {check.max_abs_pixel_diff} > tolerance {check.tolerance_pixel}"
        )
    check.fov_agree = int((np.asarray(fov) == golden["fov_found"].astype(bool)).sum())
    if check.fov_agree != check.samples:
        check.problems.append(
            f"field of view found differently on {check.samples - check.fov_agree} of {check.samples} golden images"
        )
    here = bundle.interpret(predict_logits(session, to_input(prepared_here, spec)))
    check.max_abs_probability_diff = max(
        abs(a.referable_dr_probability - float(e.get("referable_dr_probability", math.nan)))
        for a, e in zip(here, stored, strict=True)
    )
    check.decisions_agree = sum(_same_reading(a, e, p_tolerance) for a, e in zip(here, stored, strict=True))
    if check.decisions_agree != check.samples:
        check.problems.append(
            f"{check.samples - check.decisions_agree} of {check.samples} golden readings on this box differ from "
            f"the stored ones (referral, grade, or P(referable DR) by more than {p_tolerance:.1e})"
        )
    return check


@dataclass
class CandidateCheck:
    """One candidate on this box: its golden check and, when it passed, its latency here."""

    id: str
    artifact: str
    runtime: str
    compressed: bool
    golden: GoldenCheck | None = None
    latency: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # could not be opened or checked at all
    damaged: bool = False  # a file of the bundle is unreadable or inconsistent (not: this box computes differently)

    @property
    def ok(self) -> bool:
        return not self.problems and self.golden is not None and self.golden.ok

    def why_failed(self) -> str:
        return (self.problems + (self.golden.problems if self.golden else []) + ["no golden samples were run"])[0]


@dataclass
class VerifyResult:
    bundle: Path
    name: str = ""
    artifact: str = ""
    manifest: ManifestCheck = field(default_factory=ManifestCheck)
    golden: GoldenCheck | None = None  # the pinned (else the build's default) candidate's check
    candidates: list[CandidateCheck] = field(default_factory=list)
    default_candidate: str = ""
    pin: dict[str, Any] | None = None  # {chosen, why, reused, path, error}
    signature: SignatureCheck = field(default_factory=SignatureCheck)
    quality: QualityCheck = field(default_factory=QualityCheck)  # the image-quality gate (absent in older bundles)
    problems: list[str] = field(default_factory=list)  # problems outside the checks (unreadable bundle.json ...)

    @property
    def ok(self) -> bool:
        """Every hash matches, bundle.json and every candidate's files are sound, and at least one candidate
        reproduces its golden outputs here (one that does not is reported and never pinned: this box computes it
        differently, or its runtime cannot run it here)."""
        return (
            not self.problems
            and self.manifest.ok
            and self.signature.ok
            and self.quality.ok
            and not any(c.damaged for c in self.candidates)
            and any(c.ok for c in self.candidates)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "passed": self.ok,
            "name": self.name,
            "artifact": self.artifact,
            "manifest": {
                "ok": self.manifest.ok,
                "files_checked": self.manifest.checked,
                "sha256": self.manifest.manifest_sha256,
                "problems": self.manifest.problems,
            },
            "signature": {**asdict(self.signature), "ok": self.signature.ok},
            "golden": None if self.golden is None else {**asdict(self.golden), "ok": self.golden.ok},
            "default_candidate": self.default_candidate,
            "candidates": [
                {
                    "id": c.id,
                    "artifact": c.artifact,
                    "runtime": c.runtime,
                    "compressed": c.compressed,
                    "ok": c.ok,
                    "golden": None if c.golden is None else {**asdict(c.golden), "ok": c.golden.ok},
                    "latency": c.latency,
                    "problems": c.problems,
                }
                for c in self.candidates
            ],
            "pin": self.pin,
            "quality": {**asdict(self.quality), "ok": self.quality.ok},
            "problems": self.problems,
        }


def _check_candidate(
    bundle: Bundle, cid: str, threads: int | None, failed: Iterable[str] = ()
) -> tuple[CandidateCheck, InferenceSession | None]:
    """``failed``: the files that fail the manifest; a candidate with a model file among them is not loaded (a file
    that is not the one built could be crafted to attack the runtime's parser)."""
    view = bundle.candidate(cid)
    result = CandidateCheck(id=cid, artifact=view.artifact, runtime=view.runtime, compressed=view.compressed)
    if tampered := sorted(set(view.meta["model"]["files"]).intersection(failed)):
        result.problems.append(f"not run: {', '.join(tampered)} fails the manifest (see above)")
        result.damaged = True
        return result, None
    try:
        session = view.open_session(threads)
        result.golden = check_golden(view, session=session)
    except TlcompileError as err:  # an unreadable model or golden file is a failed check, reported like the others
        result.problems.append(str(err))
        # A file of the bundle that cannot be read is damage (verify fails); a runtime that cannot run the model on
        # this box (RuntimeBackendError) only rules the candidate out here.
        result.damaged = isinstance(err, (BundleError, UnsafeFileError))
        return result, None
    except Exception as err:  # noqa: BLE001 - the runtime itself failed on this CPU (OpenVINO int8 on an ARMv8.0 core
        # raised "Convolution node ... is not initialized" at inference): this candidate cannot run here,
        # the others may.
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        result.problems.append(f"{view.runtime} failed running {cid} on this box ({type(err).__name__}: {first})")
        return result, None
    if result.golden.readings_inconsistent:
        result.damaged = True  # bundle.json's operating point or expectations were changed after the build
    return result, session


def bench_and_choose(
    bundle: Bundle, sessions: dict[str, InferenceSession], *, rounds: int | None = None, iterations: int | None = None
) -> tuple[dict[str, dict[str, Any]], str | None, str]:
    """Bench the candidates' open sessions on a golden input, interleaved, and apply the pinning rule
    (:func:`tlcompile.runtime.pinning.choose`): (measurements, the choice, why)."""
    # Every candidate shares the golden frames and their network inputs: one read of golden.npz serves them all.
    x = np.ascontiguousarray(_load_golden(bundle.candidate(next(iter(sessions))))["inputs"][:1].astype(np.float32))
    runs = {cid: (lambda s=session: s.run(x)) for cid, session in sessions.items()}
    measured = bench_interleaved(runs, rounds=rounds or DEFAULT_ROUNDS, iterations=iterations)
    chosen, why = choose(
        measured, {cid: bundle.candidate(cid).compressed for cid in sessions}, dict.fromkeys(sessions, True)
    )
    return measured, chosen, why


def verify_bundle(
    path: str | Path,
    *,
    threads: int | None = None,
    pin: bool = True,
    repin: bool = False,
    rounds: int | None = None,
    iterations: int | None = None,
    trust: list[str | Path] | None = None,
) -> VerifyResult:
    """Check every hash (and, with ``trust``, that a trusted key signed the manifest), then run every candidate's
    golden samples on this box's runtime; with ``pin``, bench the candidates that pass and pin the fastest in
    device.json (kept from an earlier run on this CPU unless ``repin``). Never raises for a bad bundle: every problem is
    collected (each naming its file) so one run tells the whole story; a bad ``trust`` key file is the user's mistake
    and raises."""
    result = VerifyResult(bundle=Path(path))
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    result.signature = check_signature(root, trust)
    result.manifest = check_manifest(root)
    try:
        bundle = load_bundle(path)
    except TlcompileError as err:
        result.problems.append(str(err))
        return result
    result.bundle, result.name, result.default_candidate = bundle.root, bundle.name, bundle.default_candidate
    result.artifact = bundle.artifact
    if not result.signature.ok:  # a model nobody trusted is not even loaded on this box; its gate is not run either
        result.quality = QualityCheck(
            present=bundle.meta.get("quality") is not None, skipped="not checked: the signature check failed"
        )
        return result
    try:
        result.quality = check_quality(
            bundle.root, bundle.meta, str(bundle.root / BUNDLE_JSON), bundle.preprocessing.draft_size
        )
    except TlcompileError as err:  # a golden frame that cannot be read
        result.quality = QualityCheck(present=True, problems=[str(err)])
    sessions: dict[str, InferenceSession] = {}
    for cid in bundle.candidates:
        check, session = _check_candidate(bundle, cid, threads, result.manifest.failed)
        result.candidates.append(check)
        if session is not None and check.ok:
            sessions[cid] = session
    by_id = {c.id: c for c in result.candidates}
    chosen = bundle.default_candidate
    damaged = any(c.damaged for c in result.candidates)
    if pin and result.manifest.ok and not damaged and sessions:  # a damaged bundle is never measured, nor pinned
        record, why_not = (
            (None, "--repin")
            if repin
            else read_device(bundle.root, manifest_sha256=result.manifest.manifest_sha256, candidates=list(sessions))
        )
        if record is not None:
            chosen = record["chosen"]
            result.pin = {
                "chosen": chosen,
                "why": record["why"],
                "reused": True,
                "path": str(bundle.root / DEVICE_JSON),
                "created": record.get("created"),
                "noise": record.get("noise"),
            }
            for cid, c in by_id.items():
                c.latency = record["candidates"].get(cid, {}).get("latency")
        else:
            records = {cid: {"golden_ok": c.ok} for cid, c in by_id.items()}
            measured, picked, why = bench_and_choose(bundle, sessions, rounds=rounds, iterations=iterations)
            chosen = picked or chosen
            for cid, m in measured.items():
                by_id[cid].latency = m
                records[cid]["latency"] = m
            for cid, c in by_id.items():
                if not c.ok:
                    records[cid]["why_not"] = c.why_failed()
            threads_used = max((int(s.threads) for s in sessions.values()), default=0)
            noise = noise_warning(measured)
            result.pin = {
                "chosen": chosen,
                "why": why,
                "reused": False,
                "path": str(bundle.root / DEVICE_JSON),
                "replaced_because": why_not,
                "noise": noise,
            }
            try:
                write_device(
                    bundle.root,
                    device_record(
                        manifest_sha256=result.manifest.manifest_sha256,
                        candidates=records,
                        chosen=chosen,
                        why=why,
                        threads=threads_used,
                        noise=noise,
                    ),
                )
            except OSError as err:
                result.pin["error"] = (
                    f"could not write {bundle.root / DEVICE_JSON} ({err.strerror or err}); predict and serve "
                    f"will run the build's choice {bundle.default_candidate}"
                )
    elif sessions and not by_id[chosen].ok:
        chosen = next(iter(sessions))  # nothing pinned: show a candidate that passes here
    shown = by_id.get(chosen) or result.candidates[0]
    result.artifact, result.golden = shown.artifact, shown.golden
    return result


@dataclass
class VerifiedBundle:
    bundle: Bundle  # the view of the candidate that runs (pinned, else the build's choice)
    session: InferenceSession
    manifest_sha256: str
    golden: GoldenCheck
    pinned: bool = False
    notice: str = ""  # one line to show once: which candidate runs and why
    signed_by: str = ""  # the trusted key id that signed the manifest ("" without --trust)


def open_verified(
    path: str | Path,
    *,
    threads: int | None = None,
    trust: list[str | Path] | None = None,
    workers: int = 1,
    explain: bool = False,
) -> VerifiedBundle:
    """Load a bundle, check every hash (and, with ``trust``, its signature), pick the candidate pinned for this box in
    device.json (else the build's choice, with a notice saying so) and run its golden samples; raise
    :class:`BundleError` on the first problem.

    predict and serve start with this, so they never decide a single image with a bundle that verify would refuse.
    ``workers``: their threads that prepare photos beside the model. With more than one, the runtime's threads sleep
    between runs instead of spinning (see :func:`tlcompile.runtime.inference.open_session`): ONNX Runtime's spinning
    held a core that two workers on two cores needed (99 -> 136 photos/s); alone, spinning answers sooner (the model's
    time per photo 1.0 -> 0.6 ms on the quickstart bundle), and the other core has nothing else to do. ``threads``
    (None: :func:`tlcompile.runtime.pipeline.model_threads` of ``workers``, ``explain`` and the candidate's
    multiply-accumulates): the model's threads.
    """
    bundle = load_bundle(path)
    signature = check_signature(bundle.root, trust)
    if not signature.ok:
        raise BundleError(
            f"bundle {bundle.root} fails its signature check: {signature.problems[0]}; "
            f"run tlcompile verify {bundle.root} --trust KEY"
        )
    manifest = check_manifest(bundle.root)
    if not manifest.ok:
        more = f" (and {len(manifest.problems) - 1} more)" if len(manifest.problems) > 1 else ""
        raise BundleError(
            f"bundle {bundle.root} fails its manifest: {manifest.problems[0]}{more}; run tlcompile verify {bundle.root}"
        )
    record, why_not = read_device(bundle.root, manifest_sha256=manifest.manifest_sha256, candidates=bundle.candidates)
    if record is not None:
        cid, pinned = record["chosen"], True
        notice = f"running {cid}, pinned for this CPU by tlcompile verify ({record.get('created', '?')})"
    else:
        cid, pinned = bundle.default_candidate, False
        notice = f"running the build's choice {cid}: {why_not}"
    view = bundle.candidate(cid)
    if threads is None:
        threads = model_threads(workers, explain=explain, macs=(view.meta.get("artifact") or {}).get("macs"))
    session = view.open_session(threads, busy_wait=workers <= 1)
    try:
        golden = check_golden(view, session=session)
    except TlcompileError:
        raise
    except Exception as err:  # noqa: BLE001 - the runtime failed on this CPU: one line, and what to do
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        raise BundleError(
            f"bundle {bundle.root} ({cid}): {view.runtime} failed running it on this box ({type(err).__name__}: "
            f"{first}); run tlcompile verify {bundle.root} to pin a candidate that runs here"
        ) from err
    if not golden.ok:
        raise BundleError(
            f"bundle {bundle.root} ({cid}) fails its golden samples on this box: {golden.problems[0]}; "
            f"run tlcompile verify {bundle.root}"
        )
    quality = check_quality(bundle.root, bundle.meta, str(bundle.root / BUNDLE_JSON), bundle.preprocessing.draft_size)
    if not quality.ok:
        raise BundleError(
            f"bundle {bundle.root} fails its quality gate check: {quality.problems[0]}; "
            f"run tlcompile verify {bundle.root}"
        )
    return VerifiedBundle(
        bundle=view,
        session=session,
        manifest_sha256=manifest.manifest_sha256,
        golden=golden,
        pinned=pinned,
        notice=notice,
        signed_by=signature.key_id if signature.valid else "",
    )


def verify_lines(result: VerifyResult) -> list[str]:
    """What ``tlcompile verify`` prints: the checks with their largest deviations, each candidate's golden parity and
    latency here, the pin, then PASS or FAIL with the reasons."""
    m = result.manifest
    lines = [
        f"bundle {result.bundle}"
        + (
            f": {result.name}, {len(result.candidates)} candidate(s), build's choice {result.default_candidate}"
            if result.name
            else ""
        )
    ]
    lines.append(
        f"  files: {m.checked} listed in {MANIFEST_JSON}, "
        + ("every sha256 matches" if m.ok else f"{len(m.problems)} problem(s)")
        + (f" (manifest sha256 {m.manifest_sha256[:16]})" if m.manifest_sha256 else "")
    )
    lines += [f"    {p}" for p in m.problems]
    s = result.signature
    if s.required:
        state = "valid, by trusted key " + s.key_id if s.valid else ("NOT valid" if s.present else "missing")
        lines.append(f"  signature: {state}")
    else:
        lines.append(
            "  signature: "
            + (
                "signed by key " + (s.key_id or "?") + " (not checked: give --trust PUBKEY)"
                if s.present
                else "none (unsigned bundle)"
            )
        )
    lines += [f"    {p}" for p in s.problems]
    if result.candidates:  # golden parity and latencies hold for this CPU: name it, as bench and device.json do
        cpu = cpu_info()
        lines.append(
            f"  this box: {cpu['model']} ({cpu['machine']}), {cpu['usable_cores']} usable core(s), "
            f"ISA: {', '.join(cpu['isa']) or '-'}"
        )
    for c in result.candidates:
        g = c.golden
        verdict = "pass" if c.ok else "FAIL"
        head = f"  {c.id}: golden {verdict}"
        if g is not None and g.samples:
            head += (
                f" on {g.runtime} ({g.exec_precision}, {g.threads} threads): max |Δlogit| {g.max_abs_logit_diff:.2e} "
                f"(tolerance {g.tolerance_logit:g}), decisions {g.decisions_agree}/{g.samples}, "
                f"max |Δpixel| {g.max_abs_pixel_diff}"
            )
        if c.latency:
            head += (
                f"; p50 {c.latency['p50_ms']:.3f} ms, p90 {c.latency['p90_ms']:.3f} ms "
                f"(spread {c.latency['p90_spread_ms']:.3f})"
            )
        lines.append(head)
        lines += [f"    {p}" for p in c.problems + (g.problems if g else [])]
    if result.pin:
        p = result.pin
        how = (
            "kept from an earlier verify on this CPU (--repin re-measures)"
            if p.get("reused")
            else f"written to {p['path']}"
        )
        lines.append(f"  pinned: {p['chosen']}: {p['why']}; {how}")
        if p.get("noise"):
            lines.append(f"    note: {p['noise']}")
        if p.get("error"):
            lines.append(f"    {p['error']}")
    if result.name:
        lines.append(result.quality.line())
        lines += [f"    {p}" for p in result.quality.problems]
    lines += [f"  {p}" for p in result.problems]
    failing = [c for c in result.candidates if not c.ok]
    failing.sort(key=lambda c: not c.damaged)  # damage first: it is what fails the bundle
    if result.ok and failing:
        lines.append(
            f"  {len(failing)} of {len(result.candidates)} candidates "
            "do not reproduce their golden outputs on this box "
            "and will not run here"
        )
    reasons = (
        result.problems
        + s.problems
        + m.problems
        + result.quality.problems
        + [f"{c.id}: {c.why_failed()}" for c in failing]
    )
    lines.append("PASS" if result.ok else f"FAIL: {reasons[0] if reasons else 'no golden samples were run'}")
    return lines
