"""Write ``out/bundle/``: the one artifact a clinic deploys, with everything needed to check it on their box.

The values in bundle.json (threshold, temperature, endpoints, measured metrics and latency) are copied from the
build's report; nothing is recomputed here. What is new here is the golden samples: a few test images turned into
camera-like frames, run through the bundle's own preprocessing and its runtime in f32, with the outputs stored.
``tlcompile verify`` runs them again on the box. The bundle is written into a temporary folder, verified, and only
then renamed into place, so ``out/bundle`` is always a whole bundle that has passed verify once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlcompile.data.datamodule import DataModule
from tlcompile.errors import BundleError
from tlcompile.io import atomic_write_json, sha256_file
from tlcompile.recipe import Recipe
from tlcompile.runtime.backends import SHIPPABLE_RUNTIMES, backend, model_files
from tlcompile.runtime.bundle import (
    BUNDLE_FORMAT_VERSION,
    BUNDLE_JSON,
    GOLDEN_NPZ,
    Bundle,
    verify_bundle,
)
from tlcompile.runtime.inference import predict_logits
from tlcompile.runtime.manifest import MANIFEST_JSON, manifest_entries
from tlcompile.runtime.preprocess import LazyInputs, find_field, prepare_image, read_input, to_input
from tlcompile.runtime.quality import RETAKE, SHRINK_RADIUS, QualityGate, shrink

BUNDLE_PRECISION = "f32"
GOLDEN_GATE_SCORE = 0.52  # golden frames pass the quality gate by this much (0.5 is the line)
# Preprocessing of the same PNG on two boxes may differ by a rounding step in the resize (SIMD Pillow builds);
# more than that is a real difference. The decision check catches any difference that matters.
GOLDEN_PIXEL_TOLERANCE = 1
# int8 kernels differ between ISAs (AMX, AVX-512 VNNI, AVX2's VPMADDUBSW): the requantization rounds differently
# (the README's "INT8 without VNNI" has the measured logit differences across ISAs). The same bound as the export's
# int8 parity against the fake-quantized model on every ISA.
INT8_LOGIT_TOLERANCE = 0.25


# --------------------------------------------------------------------------------------------- selection
def bundle_runtimes(report: dict[str, Any], recipe: Recipe) -> list[str]:
    """The runtimes whose artifacts can go into the bundle: the recipe's, or with ``auto`` every measured one (the
    box decides between them: OpenVINO and ONNX Runtime rank differently on different CPUs)."""
    wanted = recipe.bundle.runtime
    if wanted != "auto":
        return [wanted]
    measured = {row["runtime"] for row in report.get("artifacts", [])}
    return [r for r in SHIPPABLE_RUNTIMES if r in measured]


def candidate_id(row: dict[str, Any]) -> str:
    return f"{row['name']}@{row['runtime']}"


def _endpoints_pass(row: dict[str, Any]) -> bool | None:
    """The evaluation's verdict for this row (None: the recipe sets no endpoint)."""
    return (row.get("clinical") or {}).get("endpoints", {}).get("pass")


def _finite(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


def _guard_met(row: dict[str, Any]) -> bool | None:
    """The accuracy guard's verdict for a compressed artifact (None: not compressed, nothing to guard)."""
    g = row.get("guard")
    return None if not g else bool(g.get("met"))


RANKED_BY = {
    "fastest": "p90 latency (every candidate is within the accuracy guard of fp32), then test AUC; with several "
    "candidates the default is re-measured on the build box and a compressed one must win by more than the noise",
    "best_under_budget": "test AUC, then p90 latency",
    "name": "name",
}


def select_artifact(
    report: dict[str, Any], recipe: Recipe, runtime: str | list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report row to bundle and a record of why (every candidate with the reason it was or was not taken).

    ``fastest`` and ``best_under_budget`` consider only artifacts that meet the accuracy guard (judged on val against
    the model each was compressed from), ``evaluate.endpoints`` and ``latency_budget_ms``; ``name`` ships the named one
    whatever it measured (the record still says whether it met the guard). With several runtimes, rows of all of them
    compete (``name``: the named artifact on the first runtime that has it).
    """
    cfg = recipe.bundle
    runtimes = [runtime] if isinstance(runtime, str) else list(runtime)
    shown = " / ".join(runtimes)
    rows = [row for r in runtimes for row in report.get("artifacts", []) if row["runtime"] == r]
    if not rows:
        raise BundleError(f"bundle.runtime '{shown}': no artifact was benched on {shown}; add it to bench.runtimes")
    candidates = []
    for row in rows:
        p90 = row.get("latency_ms", {}).get("p90")
        verdict, guarded = _endpoints_pass(row), _guard_met(row)
        why_not = []
        if cfg.select == "name" and row["name"] != cfg.artifact:
            why_not.append("not the named artifact")
        if cfg.select != "name":
            if guarded is False:
                why_not.append("fails the accuracy guard on val")
            if verdict is False:
                failed = [k for k, c in row["clinical"]["endpoints"].get("checks", {}).items() if not c.get("pass")]
                why_not.append(f"misses endpoints {', '.join(failed)}")
            if cfg.latency_budget_ms is not None and not (p90 is not None and p90 <= cfg.latency_budget_ms):
                why_not.append(f"p90 {p90} ms > budget {cfg.latency_budget_ms} ms")
        candidates.append(
            {
                "id": candidate_id(row),
                "name": row["name"],
                "runtime": row["runtime"],
                "p90_ms": p90,
                "auc": row.get("metrics", {}).get("auc"),
                "guard_met": guarded,
                "endpoints_pass": verdict,
                "eligible": not why_not,
                "why_not": "; ".join(why_not) or None,
            }
        )
    eligible = [(row, c) for row, c in zip(rows, candidates, strict=True) if c["eligible"]]
    if not eligible:
        if cfg.select == "name":
            raise BundleError(
                f"bundle.artifact '{cfg.artifact}' was not benched on {shown}; artifacts of this build: "
                f"{', '.join(sorted({r['name'] for r in rows}))}"
            )
        reasons = "; ".join(
            f"{c['name']}" + (f" on {c['runtime']}" if len(runtimes) > 1 else "") + f": {c['why_not']}"
            for c in candidates
        )
        raise BundleError(
            f"bundle: no artifact on {shown} meets the accuracy guard, evaluate.endpoints and bundle.latency_budget_ms "
            f"({reasons}); report.json was written. "
            "Relax the endpoints or the budget, or set bundle.select: name to ship one anyway"
        )

    def p90_of(c: dict[str, Any]) -> float:
        return c["p90_ms"] if c["p90_ms"] is not None else math.inf

    if cfg.select == "fastest":  # fastest; ties (same p90 to 0.01 ms) go to the higher test AUC
        row, chosen = min(eligible, key=lambda pair: (round(p90_of(pair[1]), 2), -_finite(pair[1]["auc"])))
    elif cfg.select == "name":
        row, chosen = eligible[0]
    else:  # highest test AUC; ties go to the faster artifact
        row, chosen = max(eligible, key=lambda pair: (_finite(pair[1]["auc"]), -p90_of(pair[1])))
    record = {
        "rule": cfg.select,
        "runtime": shown,
        "latency_budget_ms": cfg.latency_budget_ms,
        "chosen": chosen["name"],
        "chosen_id": chosen["id"],
        "ranked_by": RANKED_BY[cfg.select],
        "candidates": candidates,
    }
    return row, record


def _val_quality(row: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[float, ...] | None:
    """(val AUC, sensitivity, specificity) at the locked operating point, from the guard records (the fp32 model's
    is the reference of any check against it); None when the report does not have them."""

    def triple(d: dict[str, Any], key: str) -> tuple[float, ...] | None:
        values = [d.get(m, {}).get(key) for m in ("auc", "sensitivity", "specificity")]
        return tuple(values) if all(isinstance(v, (int, float)) for v in values) else None

    guard = row.get("guard")
    if guard and guard.get("checks"):
        return triple(guard["checks"][-1], "value")
    for other in rows:
        for c in (other.get("guard") or {}).get("checks", []):
            if c.get("against") == row["name"]:
                return triple(c, "reference")
    return None


def bundle_candidates(report: dict[str, Any], recipe: Recipe, selection: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows that go into the bundle as candidates for the box to choose from (``bundle.candidates``).

    ``non_dominated`` (default) drops an eligible artifact only when another one on the same runtime, in the same
    precision, has no more MACs and is at least as good on val (AUC, sensitivity and specificity at the locked
    threshold), one of them strictly: that one is faster on every CPU and no worse. Precisions and runtimes are never
    compared here -- which of them is faster is what the box measures. ``all``: every eligible one; ``chosen``: only
    the build's choice.
    """
    rows = {candidate_id(r): r for r in report.get("artifacts", [])}
    chosen = rows[selection["chosen_id"]]
    policy = recipe.bundle.candidates
    if policy == "chosen" or recipe.bundle.select == "name":
        kept = [chosen]
    elif policy == "all":
        kept = [rows[c["id"]] for c in selection["candidates"] if c["eligible"]]
    else:
        kept = _non_dominated(selection, rows, chosen)
    for c in selection["candidates"]:
        c["in_bundle"] = any(r is rows[c["id"]] for r in kept)
    return kept


def _non_dominated(
    selection: dict[str, Any], rows: dict[str, dict[str, Any]], chosen: dict[str, Any]
) -> list[dict[str, Any]]:
    eligible = [rows[c["id"]] for c in selection["candidates"] if c["eligible"]]
    all_rows = list(rows.values())
    kept = []
    for a in eligible:
        qa = _val_quality(a, all_rows)
        dominated = False
        for b in eligible:
            if b is a or b["runtime"] != a["runtime"] or b.get("precision") != a.get("precision"):
                continue
            qb = _val_quality(b, all_rows)
            if qa is None or qb is None or b.get("macs") is None or a.get("macs") is None:
                continue
            if (
                b["macs"] <= a["macs"]
                and all(x >= y for x, y in zip(qb, qa, strict=True))
                and (b["macs"] < a["macs"] or qb != qa)
            ):
                dominated = True
                break
        if not dominated or a is chosen:
            kept.append(a)
        else:
            next(c for c in selection["candidates"] if c["id"] == candidate_id(a))["why_not"] = (
                "dominated: another candidate on the same runtime and precision has no more MACs and is as good on val"
            )
    return kept


# ------------------------------------------------------------------------------------------- provenance
def _ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def split_hashes(data: DataModule) -> dict[str, dict[str, Any]]:
    """Per split: image count and the sha256 of its sorted image ids, so another build can prove it used the same
    split (or that a later test set shares no image with this training set)."""
    out = {}
    for name in ("train", "val", "test"):
        ids = [data.ids[i] for i in np.flatnonzero(data.split == name)]
        out[name] = {"images": len(ids), "ids_sha256": _ids_sha256(ids)}
    return out


def data_provenance(data: DataModule, recipe: Recipe, out_dir: Path) -> dict[str, Any]:
    d = recipe.data
    provenance: dict[str, Any] = {
        "source": d.source,
        "task": d.task,
        "images": len(data.ids),
        "counts": data.counts(),
        "split_fractions": {"val": d.split.val, "test": d.split.test},
        "split_seed": recipe.seed,
        "splits": split_hashes(data),
    }
    if d.source == "synthetic":
        provenance["description"] = (
            f"tlcompile's built-in synthetic fundus generator (seed {recipe.seed}, style {d.style}, "
            f"difficulty {d.difficulty if d.difficulty is not None else 'default'}): no patient data"
        )
    else:
        provenance["images_folder"] = str(d.images)
        if d.source == "csv":
            provenance["label_csv"] = {"path": str(d.csv), "sha256": sha256_file(d.csv)}
    splits_csv = out_dir / "01_data" / "splits.csv"
    if splits_csv.is_file():
        provenance["splits_csv_sha256"] = sha256_file(splits_csv)
    return provenance


def library_versions(report: dict[str, Any]) -> dict[str, Any]:
    import PIL

    versions = {k: v for k, v in report.get("environment", {}).items() if k != "cpu"}
    versions.update(numpy=np.__version__, pillow=PIL.__version__)
    versions.setdefault("python", platform.python_version())
    return versions


def _limitations(recipe: Recipe, row: dict[str, Any], endpoints_set: bool) -> list[str]:
    notes = []
    if recipe.data.source == "synthetic":
        notes.append("Trained and tested on synthetic images only: a demonstration, NOT for clinical use.")
    notes.append(
        "Measured values are from this build's test split on the build box; re-validate on local images, camera "
        "and population before clinical use."
    )
    if not endpoints_set:
        notes.append("The recipe set no endpoints (evaluate.endpoints): no pass/fail claim is made.")
    elif _endpoints_pass(row) is False:
        notes.append("This artifact does NOT meet the recipe's endpoints (it was bundled by name).")
    return notes


# ----------------------------------------------------------------------------------------------- golden
def golden_frame(data: DataModule, i: int) -> np.ndarray:
    """A golden frame: photo ``i`` as the camera gave it (the source file as predict decodes it, or the generated
    frame), shrunk to a field radius of SHRINK_RADIUS px when larger (a bundle ships a few, not megapixel files).
    verify and predict run it through the whole pipeline: decoding, the field-of-view crop, the resize, the quality
    gate. (Enlarged network inputs, as before #16, were too soft for the gate's focus measure: every golden frame was
    'ungradable', and predict on them answered so.)"""
    return np.ascontiguousarray(shrink(data.photo(i))[:, :, :3])


def _pick_golden(scores: np.ndarray, threshold: float, count: int, margin: float) -> np.ndarray:
    """Up to ``count`` indices spread evenly over the range of scores (so both referral decisions appear when the split
    has both), none closer to the threshold than ``margin``, and among them the scores nearest the threshold on either
    side: verify checks that the stored readings follow from bundle.json's threshold, so a threshold edited past
    either of those two scores fails it even with a re-sealed manifest (with only an even spread, a saturated model's
    golden scores sat near 0 and 1, and any threshold between them passed).

    With ``margin`` = d / (2 T) for a logit tolerance d and temperature T, a box that passes the logit check cannot flip
    a golden decision: moving every logit by at most d moves P(referable DR) by at most d / (2 T), because the
    gradient of p_S = sum over S of softmax(z / T) has an L1 norm of 2 p_S (1 - p_S) / T <= 1 / (2 T). Fewer samples
    are taken rather than one that could (only a model whose every score sits on the threshold gets near-threshold
    samples)."""
    away = np.flatnonzero(np.abs(scores - threshold) >= margin)
    pool = away if away.size else np.arange(scores.size)
    ordered = pool[np.argsort(scores[pool], kind="mergesort")]
    wanted = min(count, ordered.size)
    first_above = int(np.searchsorted(scores[ordered], threshold, side="left"))
    nearest = [k for k in (first_above - 1, first_above) if 0 <= k < ordered.size][:wanted]
    rest = np.setdiff1d(np.arange(ordered.size), nearest)  # the others, still in score order
    spread = rest[np.round(np.linspace(0, rest.size - 1, wanted - len(nearest))).astype(int)] if rest.size else rest
    picks = np.concatenate([np.asarray(nearest, dtype=int), spread.astype(int)])
    return np.sort(ordered[picks])


NEAR_THRESHOLD_POOL = 8  # test images nearest the threshold on each side that the golden choice starts from


def _nearest_each_side(scores: np.ndarray, threshold: float, per_side: int, margin: float) -> np.ndarray:
    """Indices of the ``per_side`` scores nearest the threshold below it and at or above it, none within ``margin``."""
    below = np.flatnonzero(scores <= threshold - margin)
    above = np.flatnonzero(scores >= threshold + margin)
    return np.concatenate(
        [
            below[np.argsort(-scores[below], kind="mergesort")][:per_side],
            above[np.argsort(scores[above], kind="mergesort")][:per_side],
        ]
    )


def _write_golden(
    root: Bundle,
    views: dict[str, Bundle],
    default: str,
    data: DataModule,
    rows: dict[str, dict[str, Any]],
    out_dir: Path,
    count: int,
    gate: QualityGate | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Golden samples shared by every candidate: the frames (PNG) and prepared inputs once, each candidate's logits
    and readings beside them. Returns the shared golden record, per candidate its own part (logits key, expected
    readings, tolerance, margin), and the open sessions (for the build's own choice among the candidates)."""
    bundle = views[default]
    spec = bundle.preprocessing
    test_images, _ = data.subset("test")
    test_ids = [data.ids[i] for i in np.flatnonzero(data.split == "test")]
    sessions = {cid: view.open_session() for cid, view in views.items()}
    row = rows[default]
    saved = out_dir / row["logits_path"] if row.get("logits_path") else None
    # The bench already ran the test images through this artifact on this runtime; its logits narrow the choice
    # to a pool spread over the scores without a second pass over the whole test split.
    if saved is not None and saved.is_file() and np.load(saved).shape[0] == test_images.shape[0]:
        test_logits = np.load(saved)
    else:
        test_logits = predict_logits(sessions[default], LazyInputs(test_images, spec))
    scores = np.array([r.referable_dr_probability for r in bundle.interpret(test_logits)])
    margins = {
        cid: view.meta["golden"]["tolerance"]["max_abs_logit"] / (2 * view.temperature) for cid, view in views.items()
    }
    pool = _pick_golden(scores, bundle.threshold, 4 * count, max(margins.values()))
    # and the next nearest on either side, in case the nearest are not decided alike by every candidate (below)
    pool = np.union1d(pool, _nearest_each_side(scores, bundle.threshold, NEAR_THRESHOLD_POOL, max(margins.values())))

    # The bench may have run in another precision (bf16) and on the un-framed image, so the final choice is made on
    # what verify will compute: camera frame -> prepare_image -> each candidate's runtime in f32.
    test_index = np.flatnonzero(data.split == "test")
    frames = [golden_frame(data, int(test_index[i])) for i in pool]
    prepared_found = [prepare_image(frame, spec) for frame in frames]
    prepared = np.stack([p for p, _ in prepared_found])
    fov_found = np.array([f for _, f in prepared_found], dtype=bool)
    inputs = to_input(prepared, spec)
    logits = {cid: predict_logits(session, inputs).astype(np.float32) for cid, session in sessions.items()}
    readings = {cid: views[cid].interpret(x) for cid, x in logits.items()}
    # Only frames that no candidate scores within its margin of the threshold (see _pick_golden): a box that passes
    # a candidate's logit check then cannot flip one of its golden decisions.
    # And frames predict decides as the build did: a field of view found and, with a quality gate, gradable (else
    # predict would answer 'ungradable' where the expected reading is a decision).
    # A gate score this far above the 0.5 line: one grey level of another box's Pillow cannot flip the verdict.
    decidable = fov_found.copy()
    if gate is not None:
        decidable &= np.array([gate.assess(frame, find_field(frame)).score >= GOLDEN_GATE_SCORE for frame in frames])
    clear = decidable.copy()
    for cid, rs in readings.items():
        clear &= np.array([abs(r.referable_dr_probability - views[cid].threshold) >= margins[cid] for r in rs])
    keep = next((np.flatnonzero(m) for m in (clear, decidable) if m.any()), np.arange(len(pool)))
    default_scores = np.array([r.referable_dr_probability for r in readings[default]])[keep]
    final = keep[_pick_golden(default_scores, bundle.threshold, count, 0.0)]

    folder = root.root / Path(GOLDEN_NPZ).parent
    folder.mkdir(parents=True)
    images = []
    for n, k in enumerate(final):
        rel = f"{folder.name}/{n:03d}.png"
        Image.fromarray(frames[k]).save(root.root / rel)  # PNG: lossless, so the file decodes to exactly this frame
        images.append(rel)
    keys = {cid: "logits" if cid == default else f"logits@{cid}" for cid in views}
    arrays = {"prepared": prepared[final], "fov_found": fov_found[final], "inputs": inputs[final]}
    arrays.update({keys[cid]: x[final] for cid, x in logits.items()})
    with open(root.root / GOLDEN_NPZ, "wb") as f:
        np.savez_compressed(f, **arrays)
    from tlcompile.runtime.cpuinfo import cpu_info

    shared = {
        "file": GOLDEN_NPZ,
        "images": images,
        "source": "test-split photos as taken (shrunk to a field radius of at most "
        + f"{SHRINK_RADIUS} px): "
        + ", ".join(test_ids[pool[k]] for k in final),
        "produced_on": {"cpu": cpu_info(), "threads": sessions[default].threads},
    }
    own = {}
    for cid, view in views.items():
        rs = readings[cid]
        own[cid] = {
            "logits_key": keys[cid],
            "expected": [{"image": rel, **rs[k].to_dict()} for rel, k in zip(images, final, strict=True)],
            "tolerance": view.meta["golden"]["tolerance"],
            # Below the required margin only when every score of a model sits on the threshold (a degenerate model).
            "decision_margin": {
                "required": margins[cid],
                "smallest": float(min(abs(rs[k].referable_dr_probability - view.threshold) for k in final)),
            },
            "produced_with": {"runtime": sessions[cid].runtime, "exec_precision": sessions[cid].exec_precision},
        }
    return shared, own, sessions


def _gate(quality: dict[str, Any]) -> QualityGate:
    """The gate of the build's quality record (its limits: the calibrated ones and those of what val held)."""
    return QualityGate(limits=dict(quality["limits"]), version=quality["version"])


def quality_block(quality: dict[str, Any], root: Path, images: list[str], draft_size: int) -> dict[str, Any]:
    """bundle.json's ``quality``: the gate the build calibrated (limits, version), the imageability it measured on
    test, and the gate's score and reasons for each golden frame, which ``tlcompile verify`` reproduces on the box."""
    gate = _gate(quality)
    golden = []
    for rel in images:
        rgb, _ = read_input(root / rel, draft_size=draft_size)
        a = gate.assess(rgb, find_field(rgb))
        golden.append({"image": rel, "score": float(a.score), "reasons": list(a.reasons)})
    return {
        **gate.to_dict(),
        "target_gradable": quality["target_gradable"],
        "limits_source": quality["limits_source"],
        "imageability": quality["imageability"],
        "gate_on_test": {k: quality["test"][k] for k in ("sensitivity", "specificity")},
        "advice": RETAKE,
        "golden": golden,
    }


# ------------------------------------------------------------------------------------------------ write
def _copy_model(row: dict[str, Any], out_dir: Path, root: Path) -> tuple[str, list[str]]:
    source = out_dir / row["path"]
    files = model_files(source)  # x.xml: x.xml and x.bin
    (root / "model").mkdir(exist_ok=True)
    for f in files:
        if not f.is_file():
            raise BundleError(f"bundle: model file '{f}' of artifact {row['name']} is missing; rebuild with --resume")
        if not (root / "model" / f.name).exists():
            shutil.copyfile(f, root / "model" / f.name)
    return f"model/{source.name}", [f"model/{f.name}" for f in files]


def _tolerance(row: dict[str, Any], recipe: Recipe) -> float:
    return recipe.export.parity_max_abs_diff if row.get("precision", "fp32") == "fp32" else INT8_LOGIT_TOLERANCE


def _measured(row: dict[str, Any], env: dict[str, Any], requested: str = BUNDLE_PRECISION) -> dict[str, Any]:
    """The candidate's bench row (test split). With bench.precision other than f32, OpenVINO ran in another precision
    on the build box than the bundle deploys (f32): said beside the figures, not left for the reader to notice."""
    measured = {
        "split": "test",
        "on_cpu": env.get("cpu"),
        **{k: v for k, v in row.items() if k not in ("path", "logits_path")},
    }
    # (auto on a CPU without bf16 ran f32: the figures are of what the bundle runs; an int8 model's float layers
    # may have run in bf16, which its exec precision i8 does not show)
    if row.get("runtime") == "openvino" and requested != BUNDLE_PRECISION and row.get("exec_precision") != "f32":
        measured["note"] = (
            f"measured with OpenVINO at bench.precision {requested} (ran {row.get('exec_precision', '?')}); the bundle "
            f"runs {BUNDLE_PRECISION}, which tlcompile verify measures on the box"
        )
    return measured


def write_bundle(report: dict[str, Any], *, out_dir: Path, data: DataModule, recipe: Recipe) -> dict[str, Any] | None:
    """Select the candidates and the build's choice among them, write ``out_dir/bundle`` and verify it; returns the
    record for report.json, or None when ``bundle.runtime: auto`` finds no OpenVINO or ONNX Runtime measurement."""
    runtimes = bundle_runtimes(report, recipe)
    if not runtimes:
        return None
    row, selection = select_artifact(report, recipe, runtimes)
    cand_rows = bundle_candidates(report, recipe, selection)
    cfg = recipe.bundle
    endpoint_targets = report.get("evaluation", {}).get("endpoints", {})
    endpoints_set = any(v is not None for k, v in endpoint_targets.items() if k != "rule")
    env = report.get("environment", {})
    meta: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": report.get("name", recipe.name),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {
            "name": "input",
            "shape": [None, 3, data.spec.size, data.spec.size],
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "size": data.spec.size,
        },
        "preprocessing": report.get("preprocessing", data.spec.to_dict()),
        "task": report.get("task", data.task),
        "class_names": list(report.get("class_names", data.class_names)),
        "referable_dr": "DR grade >= 2 (moderate NPDR or worse); P(referable DR) = softmax(logits / temperature), "
        + ("p[referable]" if data.num_classes == 2 else "summed over grades 2-4"),
        "operating_point": report["operating_point"],
        "endpoints": {"targets": endpoint_targets},
        "selection": selection,
        "model_card": {
            "intended_use": cfg.intended_use,
            "limitations": _limitations(recipe, row, endpoints_set),
            "architecture": recipe.model.arch,
            "source_weights": recipe.model.pretrained,
            "training": {k: v for k, v in report.get("training", {}).items() if k != "history"},
            "data_provenance": data_provenance(data, recipe, out_dir),
            "recipe_sha256": report.get("recipe_sha256", recipe.fingerprint()),
            "recipe": report.get("recipe", recipe.to_yaml_dict()),
            "library_versions": library_versions(report),
            "built_by": f"tlcompile {report.get('tlcompile_version', '')}".strip(),
        },
    }
    out_dir = Path(out_dir)
    root = Path(tempfile.mkdtemp(prefix=".bundle.", dir=out_dir))
    rows = {candidate_id(r): r for r in cand_rows}
    try:
        candidates = []
        for cid, r in rows.items():
            entry, files = _copy_model(r, out_dir, root)
            candidates.append(
                {
                    "id": cid,
                    "artifact": {
                        **{
                            k: r.get(k)
                            for k in ("name", "precision", "lineage", "format", "params", "macs", "size_bytes")
                        },
                        "compressed": r["name"] != "fp32",
                    },
                    "model": {
                        "runtime": r["runtime"],
                        "precision": BUNDLE_PRECISION,
                        "format": backend(r["runtime"]).format,
                        "entry": entry,
                        "files": files,
                    },
                    "measured": _measured(r, env, recipe.bench.precision),
                    "endpoints": {"result": (r.get("clinical") or {}).get("endpoints"), "met": _endpoints_pass(r)},
                    "golden": {
                        "tolerance": {"max_abs_logit": _tolerance(r, recipe), "max_abs_pixel": GOLDEN_PIXEL_TOLERANCE}
                    },
                }
            )
        draft = Bundle(root=root, meta={**meta, "candidates": candidates, "golden": {}})
        views = {c["id"]: draft.candidate(c["id"]) for c in candidates}
        # The golden frames are drawn on the first candidate's scores (a fixed order), not on the build's choice, which
        # can be a latency measurement: the same recipe gives the same golden files.
        quality = report.get("quality")
        gate = _gate(quality) if quality else None
        shared, own, sessions = _write_golden(
            draft, views, candidates[0]["id"], data, rows, out_dir, cfg.golden_samples, gate
        )
        for c in candidates:
            c["golden"] = {**c["golden"], **own[c["id"]]}
        default = selection["chosen_id"]
        if cfg.select == "fastest" and len(candidates) > 1:
            default = _choose_on_build_box(
                Bundle(root=root, meta={**meta, "candidates": candidates, "golden": shared}), selection, sessions
            )
        chosen = next(c for c in candidates if c["id"] == default)
        meta.update(
            {
                "artifact": chosen["artifact"],
                "model": chosen["model"],
                "measured": chosen["measured"],
                "endpoints": {**meta["endpoints"], **chosen["endpoints"]},
                "golden": {**shared, **chosen["golden"]},
                "default_candidate": default,
                "candidates": candidates,
            }
        )
        meta["model_card"]["limitations"] = _limitations(recipe, rows[default], endpoints_set)
        if report.get("quality"):
            meta["quality"] = quality_block(report["quality"], root, shared["images"], data.spec.draft_size)
        atomic_write_json(root / BUNDLE_JSON, meta)
        atomic_write_json(
            root / MANIFEST_JSON, {"format_version": BUNDLE_FORMAT_VERSION, "files": manifest_entries(root)}
        )
        for path in root.rglob("*"):  # temporary files are private (0600); a bundle is copied and read by others
            path.chmod(0o755 if path.is_dir() else 0o644)
        root.chmod(0o755)
        check = verify_bundle(root, pin=False)
        failing = [c for c in check.candidates if not c.ok]
        if not check.ok or failing:  # a bug, not a user mistake: the bundle was just written on this very box
            problems = check.problems + check.manifest.problems + [f"{c.id}: {c.why_failed()}" for c in failing]
            raise BundleError(
                f"bundle: the freshly written bundle fails verify on the build box: {'; '.join(problems)}"
            )
        final = out_dir / "bundle"
        old = out_dir / f".bundle.old-{root.name}"
        if final.exists():
            final.rename(old)  # two renames: a crash between them leaves the old bundle beside, never a half one
        root.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
    g = next(c for c in check.candidates if c.id == default).golden
    return {
        "path": "bundle",
        "artifact": chosen["artifact"]["name"],
        "runtime": chosen["model"]["runtime"],
        "precision": BUNDLE_PRECISION,
        "default_candidate": default,
        "candidates": [c["id"] for c in candidates],
        "manifest_sha256": check.manifest.manifest_sha256,
        "selection": selection,
        "golden_samples": g.samples,
        "verify": {
            "passed": True,
            "max_abs_logit_diff": g.max_abs_logit_diff,
            "max_abs_pixel_diff": g.max_abs_pixel_diff,
            "candidates": {c.id: {"max_abs_logit_diff": c.golden.max_abs_logit_diff} for c in check.candidates},
        },
    }


def _choose_on_build_box(bundle: Bundle, selection: dict[str, Any], sessions: dict[str, Any]) -> str:
    """The build's default among several candidates: what ``tlcompile verify`` would pin on this box (the same
    interleaved measurement and noise rule), recorded in the selection."""
    from tlcompile.runtime.bundle import bench_and_choose
    from tlcompile.runtime.pinning import load_average, noise_warning

    measured, chosen, why = bench_and_choose(bundle, sessions)
    selection["measured_on_build_box"] = measured
    selection["load_average"], selection["noise"] = load_average(), noise_warning(measured)
    selection["chosen_id"], selection["chosen"], selection["why"] = chosen, chosen.split("@")[0], why
    return chosen
