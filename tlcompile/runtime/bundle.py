"""A deployment bundle on the clinic's box: load it, check its hashes, run its golden samples (never imports torch).

A bundle is the folder ``tlcompile build`` writes as ``out/bundle/``::

    bundle.json        what the model is and how to use it: input size, preprocessing, class names, the
                       referable-DR threshold, endpoints and measured values, model-card fields
    model.xml/.bin     the model (OpenVINO IR) or model.onnx (ONNX Runtime)
    golden/            camera-like frames (PNG) and golden.npz: what the build box computed from them
    manifest.json      {"files": {relpath: {"sha256", "size"}}} of every other file

:func:`verify_bundle` is the first thing to run on a new box: it proves the files are the ones the build wrote
and that this box's runtime reproduces the build's outputs on the golden samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.errors import BundleError, TlcompileError, UnsafeFileError
from tlcompile.evaluate.metrics import referable_classes, softmax
from tlcompile.io import sha256_file
from tlcompile.runtime.inference import InferenceSession, open_session, predict_logits
from tlcompile.runtime.preprocess import PreprocessSpec, prepare_image, to_input
from tlcompile.runtime.signing import SignatureCheck, check_signature

BUNDLE_FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
MANIFEST_JSON = "manifest.json"
GOLDEN_NPZ = "golden/golden.npz"
# Files a bundle may hold that manifest.json does not list: the signature (it signs the manifest, so it cannot be
# in it) and what `tlcompile verify` records about this box. Neither can change a decision.
UNLISTED_OK = frozenset({"signature.json", "device.json"})
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


def _inside(root: Path, relpath: str, source: str) -> Path:
    """``root / relpath``, refusing absolute paths and '..' that would read outside the bundle."""
    rel = Path(relpath)
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(root.resolve()):
        raise UnsafeFileError(f"{source}: '{relpath}' points outside the bundle folder {root}; a bundle only names its own files")
    return path


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
        return _inside(self.root, self.meta["model"]["entry"], f"{self.root / BUNDLE_JSON}: model.entry")

    @property
    def artifact(self) -> str:
        return str(self.meta.get("artifact", {}).get("name", "?"))

    def open_session(self, threads: int | None = None) -> InferenceSession:
        """The model on the runtime and execution precision the golden samples were produced with."""
        return open_session(self.model_path, self.runtime, threads=threads, precision=self.precision)

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
            readings.append(Reading(
                referral=REFER if refer else NO_REFERRAL,
                referable_dr=refer,
                referable_dr_probability=float(score[i]),
                grade=grade,
                grade_name=self.class_names[grade] if grade is not None else None,
                grade_probability=float(p[i, grade]) if grade is not None else None,
            ))
        return readings


def load_bundle(path: str | Path) -> Bundle:
    """Read ``bundle.json`` from a bundle folder (or the file itself); checks its shape, not its hashes."""
    path = Path(path)
    root = path.parent if path.name == BUNDLE_JSON and path.is_file() else path
    meta_path = root / BUNDLE_JSON
    if not root.is_dir():
        raise BundleError(f"bundle '{path}' is not a folder; give the bundle/ folder a build wrote (BUILD_DIR/bundle)")
    if not meta_path.is_file():
        raise BundleError(f"bundle '{root}' has no {BUNDLE_JSON}; give the bundle/ folder a build wrote (BUILD_DIR/bundle)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise BundleError(f"{meta_path}: not UTF-8 text; the bundle is damaged (run tlcompile verify)") from err
    except json.JSONDecodeError as err:
        raise BundleError(f"{meta_path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the bundle is damaged") from err
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
            raise BundleError(f"{meta_path}: key '{key}' is missing; the bundle is damaged or not from tlcompile") from err
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"{meta_path}: key '{key}' is {value!r}; expected {_kind_name(kind)}")
    bundle = Bundle(root=root, meta=meta)
    if bundle.runtime not in ("openvino", "onnxruntime"):
        raise BundleError(f"{meta_path}: model.runtime '{bundle.runtime}' is not valid; valid: openvino, onnxruntime")
    if bundle.task not in ("referable", "grade") or len(bundle.class_names) != (2 if bundle.task == "referable" else 5):
        raise BundleError(f"{meta_path}: task '{bundle.task}' with {len(bundle.class_names)} class names; valid: referable (2), grade (5)")
    if not (0.0 <= bundle.threshold <= 1.0 and bundle.temperature > 0):
        raise BundleError(f"{meta_path}: operating_point threshold {bundle.threshold} / temperature {bundle.temperature}; "
                          "valid: a probability in [0, 1] and a temperature > 0")
    bundle.model_path  # noqa: B018 - raises UnsafeFileError now for an entry outside the bundle, not at first use
    return bundle


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"int": "an integer", "float": "a number", "str": "a string", "list": "a list", "dict": "an object"}[k.__name__] for k in kinds)


# ---------------------------------------------------------------------------------------------- manifest
def manifest_entries(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` except manifest.json, keyed by POSIX relative path."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST_JSON:
            entries[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return entries


@dataclass
class ManifestCheck:
    checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    manifest_sha256: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and self.checked > 0


def check_manifest(root: str | Path) -> ManifestCheck:
    """Every file the manifest lists is present with its size and sha256; no file is there that it does not list."""
    root = Path(root)
    result = ManifestCheck()
    manifest_path = root / MANIFEST_JSON
    if not manifest_path.is_file():
        result.problems.append(f"{MANIFEST_JSON}: missing; without it nothing in the bundle can be trusted")
        return result
    result.manifest_sha256 = sha256_file(manifest_path)
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        result.problems.append(f"{MANIFEST_JSON}: not a valid manifest ({err})")
        return result
    for rel, expected in sorted(files.items()):
        try:
            path = _inside(root, rel, str(manifest_path))
        except UnsafeFileError as err:
            result.problems.append(str(err))
            continue
        result.checked += 1
        if not isinstance(expected, dict):
            result.problems.append(f"{rel}: the manifest entry is {expected!r}, not {{'sha256', 'size'}}")
            continue
        if not path.is_file():
            result.problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            result.problems.append(f"{rel}: size {size} bytes, manifest says {expected.get('size')}")
        digest = sha256_file(path)
        if digest != expected.get("sha256"):
            result.problems.append(f"{rel}: sha256 {digest[:16]}... does not match the manifest's {str(expected.get('sha256'))[:16]}...")
    listed = set(files) | {MANIFEST_JSON} | UNLISTED_OK
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in listed:
            result.problems.append(f"{rel}: not in the manifest (a file was added to the bundle after the build)")
    return result


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
    path = _inside(bundle.root, bundle.meta["golden"]["file"], f"{bundle.root / BUNDLE_JSON}: golden.file")
    try:
        # allow_pickle=False: a bundle arrives from elsewhere, and a pickled object array could run code.
        with np.load(path, allow_pickle=False) as npz:
            golden = {k: npz[k] for k in ("prepared", "fov_found", "inputs", "logits")}
    except FileNotFoundError as err:
        raise BundleError(f"{path}: golden samples missing") from err
    except (KeyError, ValueError, OSError) as err:
        raise BundleError(f"{path}: cannot read the golden samples ({err})") from err
    n = golden["logits"].shape[0]
    if not n or any(v.shape[0] != n for v in golden.values()) or len(bundle.meta["golden"]["images"]) != n:
        raise BundleError(f"{path}: golden arrays and golden.images in bundle.json disagree in length")
    return golden


def check_golden(bundle: Bundle, *, threads: int | None = None, session: InferenceSession | None = None) -> GoldenCheck:
    """Run the golden samples through this box's preprocessing and runtime and compare with the build's outputs."""
    tol = bundle.meta["golden"]["tolerance"]
    check = GoldenCheck(tolerance_logit=float(tol["max_abs_logit"]), tolerance_pixel=int(tol["max_abs_pixel"]))
    golden = _load_golden(bundle)
    check.samples = int(golden["logits"].shape[0])
    spec = bundle.preprocessing
    expected = bundle.interpret(golden["logits"])

    # 1. Normalisation: the stored prepared images give the stored network inputs.
    check.max_abs_input_diff = float(np.abs(to_input(golden["prepared"], spec) - golden["inputs"]).max())
    if check.max_abs_input_diff > 1e-5:
        check.problems.append(f"normalisation differs: max |Δinput| {check.max_abs_input_diff:.2e} > 1e-05")

    # 2. The model on this runtime: stored inputs -> logits.
    session = session or bundle.open_session(threads)
    check.runtime, check.exec_precision, check.threads = session.runtime, session.exec_precision, int(session.threads)
    logits = predict_logits(session, golden["inputs"].astype(np.float32))
    check.max_abs_logit_diff = float(np.abs(logits.astype(np.float64) - golden["logits"]).max())
    if not check.max_abs_logit_diff <= check.tolerance_logit:  # 'not <=' also catches NaN
        check.problems.append(f"model outputs differ: max |Δlogit| {check.max_abs_logit_diff:.2e} > tolerance {check.tolerance_logit:.0e}")

    # 3. End to end from the camera-like frames: decode -> field of view -> resize -> model -> decision.
    prepared, fov = [], []
    for rel in bundle.meta["golden"]["images"]:
        image, found = prepare_image(_inside(bundle.root, rel, f"{bundle.root / BUNDLE_JSON}: golden.images"), spec)
        prepared.append(image)
        fov.append(found)
    prepared_here = np.stack(prepared)
    check.max_abs_pixel_diff = int(np.abs(prepared_here.astype(np.int16) - golden["prepared"].astype(np.int16)).max())
    if check.max_abs_pixel_diff > check.tolerance_pixel:
        check.problems.append(f"preprocessing differs: max |Δpixel| {check.max_abs_pixel_diff} > tolerance {check.tolerance_pixel}")
    check.fov_agree = int((np.asarray(fov) == golden["fov_found"].astype(bool)).sum())
    if check.fov_agree != check.samples:
        check.problems.append(f"field of view found differently on {check.samples - check.fov_agree} of {check.samples} golden images")
    here = bundle.interpret(predict_logits(session, to_input(prepared_here, spec)))
    check.max_abs_probability_diff = max(abs(a.referable_dr_probability - b.referable_dr_probability) for a, b in zip(here, expected, strict=True))
    check.decisions_agree = sum(a.referral == b.referral and a.grade == b.grade for a, b in zip(here, expected, strict=True))
    if check.decisions_agree != check.samples:
        check.problems.append(f"{check.samples - check.decisions_agree} of {check.samples} golden decisions differ from the build's")
    return check


@dataclass
class VerifyResult:
    bundle: Path
    name: str = ""
    artifact: str = ""
    manifest: ManifestCheck = field(default_factory=ManifestCheck)
    golden: GoldenCheck | None = None
    signature: SignatureCheck = field(default_factory=SignatureCheck)
    problems: list[str] = field(default_factory=list)  # problems outside the two checks (unreadable bundle.json ...)

    @property
    def ok(self) -> bool:
        return not self.problems and self.manifest.ok and self.signature.ok and self.golden is not None and self.golden.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "passed": self.ok,
            "name": self.name,
            "artifact": self.artifact,
            "manifest": {"ok": self.manifest.ok, "files_checked": self.manifest.checked, "sha256": self.manifest.manifest_sha256,
                         "problems": self.manifest.problems},
            "signature": {**asdict(self.signature), "ok": self.signature.ok},
            "golden": None if self.golden is None else {**asdict(self.golden), "ok": self.golden.ok},
            "problems": self.problems,
        }


def verify_bundle(path: str | Path, *, threads: int | None = None, trust: list[str | Path] | None = None) -> VerifyResult:
    """Check every hash (and, with ``trust``, that a trusted key signed the manifest), then run the golden samples
    on this box's runtime. Never raises for a bad bundle: every problem is collected (each naming its file) so one
    run tells the whole story; a bad ``trust`` key file is the user's mistake and raises."""
    result = VerifyResult(bundle=Path(path))
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    result.signature = check_signature(root, trust)
    result.manifest = check_manifest(root)
    try:
        bundle = load_bundle(path)
    except TlcompileError as err:
        result.problems.append(str(err))
        return result
    result.bundle, result.name, result.artifact = bundle.root, bundle.name, bundle.artifact
    if not result.signature.ok:
        return result  # a model nobody trusted is not even loaded on this box
    try:
        result.golden = check_golden(bundle, threads=threads)
    except TlcompileError as err:  # an unreadable model or golden file is a failed check, reported like the others
        result.problems.append(str(err))
    return result


@dataclass
class VerifiedBundle:
    bundle: Bundle
    session: InferenceSession
    manifest_sha256: str
    golden: GoldenCheck
    signed_by: str = ""  # the trusted key id that signed the manifest ("" without --trust)


def open_verified(path: str | Path, *, threads: int | None = None, trust: list[str | Path] | None = None) -> VerifiedBundle:
    """Load a bundle, check every hash (and, with ``trust``, its signature) and run its golden samples; raise
    :class:`BundleError` on the first problem.

    predict and serve start with this, so they never decide a single image with a bundle that verify would refuse.
    """
    bundle = load_bundle(path)
    signature = check_signature(bundle.root, trust)
    if not signature.ok:
        raise BundleError(f"bundle {bundle.root} fails its signature check: {signature.problems[0]}; run tlcompile verify {bundle.root} --trust KEY")
    manifest = check_manifest(bundle.root)
    if not manifest.ok:
        more = f" (and {len(manifest.problems) - 1} more)" if len(manifest.problems) > 1 else ""
        raise BundleError(f"bundle {bundle.root} fails its manifest: {manifest.problems[0]}{more}; run tlcompile verify {bundle.root}")
    session = bundle.open_session(threads)
    golden = check_golden(bundle, session=session)
    if not golden.ok:
        raise BundleError(f"bundle {bundle.root} fails its golden samples on this box: {golden.problems[0]}; run tlcompile verify {bundle.root}")
    return VerifiedBundle(bundle=bundle, session=session, manifest_sha256=manifest.manifest_sha256, golden=golden,
                          signed_by=signature.key_id if signature.valid else "")


def verify_lines(result: VerifyResult) -> list[str]:
    """What ``tlcompile verify`` prints: the checks with their largest deviations, then PASS or FAIL with the reasons."""
    m, g = result.manifest, result.golden
    lines = [f"bundle {result.bundle}" + (f": {result.name}, artifact {result.artifact}" if result.name else "")]
    lines.append(f"  files: {m.checked} listed in {MANIFEST_JSON}, "
                 + ("every sha256 matches" if m.ok else f"{len(m.problems)} problem(s)")
                 + (f" (manifest sha256 {m.manifest_sha256[:16]})" if m.manifest_sha256 else ""))
    lines += [f"    {p}" for p in m.problems]
    s = result.signature
    if s.required:
        lines.append(f"  signature: {'valid, by trusted key ' + s.key_id if s.valid else 'NOT valid'}")
    else:
        lines.append(f"  signature: {'signed by key ' + (s.key_id or '?') + ' (not checked: give --trust PUBKEY)' if s.present else 'none (unsigned bundle)'}")
    lines += [f"    {p}" for p in s.problems]
    if g is not None:
        lines.append(f"  golden: {g.samples} samples on {g.runtime} ({g.exec_precision}, {g.threads} threads) on this box")
        lines.append(f"    model:          max |Δlogit| {g.max_abs_logit_diff:.2e} (tolerance {g.tolerance_logit:.0e})")
        lines.append(f"    normalisation:  max |Δinput| {g.max_abs_input_diff:.2e}")
        lines.append(f"    preprocessing:  max |Δpixel| {g.max_abs_pixel_diff} (tolerance {g.tolerance_pixel}); "
                     f"field of view as expected on {g.fov_agree}/{g.samples}")
        lines.append(f"    decisions:      {g.decisions_agree}/{g.samples} match; max |ΔP(referable DR)| {g.max_abs_probability_diff:.2e}")
        lines += [f"    {p}" for p in g.problems]
    lines += [f"  {p}" for p in result.problems]
    reasons = result.problems + s.problems + m.problems + (g.problems if g else [])
    lines.append("PASS" if result.ok else f"FAIL: {reasons[0] if reasons else 'no golden samples were run'}")
    return lines
