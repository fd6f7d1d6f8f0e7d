"""``07_quality``: calibrate the image-quality gate on val, measure it on test; recorded as report["quality"].

The photos are the splits' own photographs as the camera gave them (the synthetic generator's raw frames, re-drawn
from their documented per-image generators, or the source files decoded as predict decodes them), never the training
inputs: nothing trained on changes. Each val and test photo gets ``quality.copies_per_image`` degraded copies
(:mod:`tlcompile.data.degrade`, labelled gradable or not by the rule documented there), deterministic from the
recipe's seed.

Photos are streamed: one is decoded, shrunk to a field radius of :data:`SHRINK_RADIUS` px (4x the radius the
measures work at; the degradations are defined in field radii, so the labels do not change), degraded, measured, and
dropped; only the measures and labels are kept, so memory does not grow with the dataset. A split with more than
``quality.max_photos_per_split`` photos is sampled (deterministically from the seed).

- Calibration (val): the limits of :mod:`tlcompile.runtime.quality` are set on the *gradable* val photos only (as
  taken, and their mildly degraded copies) so that ``quality.target_gradable`` of them pass.
- Evaluation (test): the gate's sensitivity (ungradable copies caught) and specificity (gradable photos and copies
  passed) with Wilson 95% CIs, per degradation kind and level; the imageability of the test split as it is; and
  what the gate does to the referral metrics of every benched artifact@runtime (its test logits): sensitivity and
  specificity on every test photo against those on the photos the gate passes (gradable-only, as the cleared devices
  report them), and the share graded; the headline row is fp32's (the bundle's candidate is chosen after this
  stage, and may be another row of the table). The copies of one photo are correlated, so the Wilson CIs over
  copies are narrower than CIs over independent photos would be.

Measured again on every build (it reads the bench's test logits), also under --resume. Its time is one decode and
shrink per photo used plus copies_per_image degradations and (1 + copies_per_image) measures: about 20 s for the
quickstart (555 photos of 140 px) and 0.13 s per 1600-px PNG photo (2 copies; peak memory 28 MB whatever the count)
on a shared 2-core Xeon VM, so about 13 minutes for 2 x 3000 such photos; larger source files cost more to decode.
The tlcompile command measures val and test at once in two processes (:func:`measure_splits`; the quickstart's stage
20.6 -> 10.9 s on a 2-core AMD EPYC with AVX2 only, the same measures), so on two cores that time is about halved.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.data.datamodule import DataModule, process_map
from tlcompile.data.degrade import Measured, measure_photos
from tlcompile.evaluate.clinical import proportion
from tlcompile.evaluate.metrics import referable_score, referable_truth
from tlcompile.io import atomic_write_json, atomic_write_text
from tlcompile.recipe import Recipe
from tlcompile.runtime.quality import (
    DOMAIN,
    GATED,
    MEASURES,
    QUALITY_VERSION,
    QualityGate,
    calibrate,
    judge,
)
from tlcompile.runtime.screen import MONOCHROME_CHROMA

SECTIONS = ("seed", "data", "quality")


def split_indices(data: DataModule, recipe: Recipe, split: str) -> np.ndarray:
    """The data-module indices of the split's photos the stage uses: all of them, or ``quality.max_photos_per_split``
    drawn without replacement from the recipe's seed (sorted, so the order is the split's)."""
    idx = np.flatnonzero(data.split == split)
    cap = recipe.quality.max_photos_per_split
    if len(idx) <= cap:
        return idx
    rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, 0x0A11, ("val", "test").index(split)]))
    return np.sort(rng.choice(idx, size=cap, replace=False))


# Below this many photos in val and test together, one process measures both splits (starting a second costs about a
# second); above it, val and test are measured at once in two (quickstart, 525 photos of 140 px on a 2-core AMD EPYC,
# AVX2 only: see the README's build-time figures).
PHOTOS_FOR_TWO_PROCESSES = 200


def measure_splits(
    data: DataModule, recipe: Recipe, per_image: int
) -> dict[str, tuple[np.ndarray, list[Measured], float]]:
    """Per split, val (with the recipe's seed) and test (seed + 1): the photos used (:func:`split_indices`), what was
    measured of each photo and its degraded copies (:func:`~tlcompile.data.degrade.measure_photos`), and the mean
    seconds per measure. In two processes at once where worker processes are allowed
    (:func:`~tlcompile.data.datamodule.allow_worker_processes`, as the tlcompile command does) and there are enough
    photos, else one after the other; the same measures either way."""
    from tlcompile.runtime.inference import default_threads

    splits = {"val": recipe.seed, "test": recipe.seed + 1}
    idx = {split: split_indices(data, recipe, split) for split in splits}
    photos = data.photo_source()
    tasks = [(photos, idx[split], seed, per_image) for split, seed in splits.items()]
    enough = sum(len(i) for i in idx.values()) >= PHOTOS_FOR_TWO_PROCESSES
    results = process_map(measure_photos, tasks, workers=default_threads() if enough else 1)
    return {split: (idx[split], *result) for split, result in zip(splits, results, strict=True)}


def _verdicts(measured: list[Measured], limits: dict[str, float]) -> np.ndarray:
    """Whether the gate passes each photo or copy (its limits, the DOMAIN ones too: as QualityGate.assess decides)."""
    return np.array([m.measures is not None and judge(m.measures, limits).gradable for m in measured], bool)


def gate_metrics(copies: Sequence[Measured], passed: np.ndarray) -> dict[str, Any]:
    """Sensitivity (ungradable caught) and specificity (gradable passed) of the gate, overall and per kind/level."""
    label = np.array([c.gradable for c in copies], bool)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({c.kind for c in copies}):
        for level in sorted({c.level for c in copies if c.kind == kind}):
            sel = np.array([c.kind == kind and c.level == level for c in copies])
            gradable = bool(label[sel][0])
            by_kind.setdefault(kind, {})[f"{level:g}"] = {
                "gradable": gradable,
                "passed": proportion(int(passed[sel].sum()), int(sel.sum())),
            }
    return {
        "copies": len(copies),
        "ungradable": int((~label).sum()),
        "sensitivity": proportion(int((~passed & ~label).sum()), int((~label).sum())),
        "specificity": proportion(int((passed & label).sum()), int(label.sum())),
        "by_kind": by_kind,
    }


def referral_effect(
    logits: np.ndarray, targets: np.ndarray, passed: np.ndarray, threshold: float, temperature: float
) -> dict[str, Any]:
    """The fp32 model's referral sensitivity/specificity on every test photo, on the photos the gate passes
    (gradable-only), and the share graded."""
    truth = referable_truth(targets, logits.shape[1]).astype(bool)
    refer = referable_score(logits / temperature) >= threshold

    def sens_spec(sel: np.ndarray) -> dict[str, Any]:
        return {
            "sensitivity": proportion(int((refer & truth & sel).sum()), int((truth & sel).sum())),
            "specificity": proportion(int((~refer & ~truth & sel).sum()), int((~truth & sel).sum())),
        }

    everyone = np.ones(len(truth), bool)
    return {
        "all_images": sens_spec(everyone),
        "gradable_only": sens_spec(passed),
        "share_graded": proportion(int(passed.sum()), len(passed)),
    }


def _measures_csv(rows: list[tuple[str, Measured, bool]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "photo", "kind", "level", "gradable", "passed", *GATED])
    for split, c, ok in rows:
        m = c.measures or {}
        writer.writerow(
            [split, c.index, c.kind, f"{c.level:g}", int(c.gradable), int(ok), *(m.get(k, "") for k in GATED)]
        )
    return buffer.getvalue()


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    q, data, folder = ctx.recipe.quality, ctx.data, ctx.stage.folder
    with ctx.console.status("[bold]quality[/]: degraded copies of val and test, calibrating the gate"):
        measured = measure_splits(data, ctx.recipe, q.copies_per_image)
        (val_idx, val, _), (test_idx, test, seconds) = measured["val"], measured["test"]
    fixed = {k: v for k, v in q.limits.model_dump().items() if v is not None}
    gradable_val = [c.measures for c in val if c.gradable and c.measures is not None]
    if gradable_val:
        values = {k: np.array([m[k] for m in gradable_val]) for k in MEASURES}
        limits, share = calibrate(values, q.target_gradable, fixed)
    else:
        limits, share = {k: fixed.get(k, MEASURES[k][1]) for k in MEASURES}, None
    # What the model was validated on, its val photos as taken (test stays out, so that its figures show what these
    # limits cost): with no monochrome (red-free) one among them, the gate refuses monochrome photos; and it refuses a
    # photo brighter than the brightest of them (an over-exposed copy of a photo the quickstart's model called
    # non-referable at P 0.007 was referred at P 0.94, and 'saturated' let it through).
    # Only those the calibrated limits pass: a washed-out or tiny-field val photo would set the range the gate allows.
    taken = [c for c in val if c.kind == "none" and c.measures is not None and judge(c.measures, limits).gradable]
    monochrome = sum(c.measures.get("chroma", 0.0) < MONOCHROME_CHROMA for c in taken)
    colour_only = bool(taken) and monochrome == 0
    greens = [c.measures.get("green_median", 0.0) for c in taken]
    max_green = max(greens, default=0.0) or None  # no field: none
    # ... and a photo darker than the darkest of them: the skimage retina photo at half brightness (brightness 106,
    # the val photos' darkest 136, the calibrated limit 60) went from P 0.02 to a referral at P 0.92.
    min_bright = min((c.measures.get("brightness", 0.0) for c in taken), default=0.0) or None
    # ... and darker in green than the darkest of them (gamma 1.6 on the retina photo: brightness 189, in range, green
    # median 41 against the val photos' 48; referred at P 0.99 where the photo was not at P 0.05)
    min_green = min(greens, default=0.0) or None
    dark_floor = min_bright is not None and "brightness" not in fixed and min_bright > limits["brightness"]
    limits = {
        **limits,
        **({"chroma": float(MONOCHROME_CHROMA)} if colour_only else {}),
        **({"green_median": float(max_green)} if max_green is not None else {}),
        # (a recipe that fixes brightness, to accept darker photos, is not overruled on green either)
        **({"green_low": float(min_green)} if min_green is not None and "brightness" not in fixed else {}),
        **({"brightness": float(min_bright)} if dark_floor else {}),
    }
    gate = QualityGate(limits=limits)
    val_pass, test_pass = _verdicts(val, limits), _verdicts(test, limits)
    if gradable_val:  # what passes with these limits too (the console line and share_passing)
        share = float(np.mean([judge(m, limits).gradable for m in gradable_val]))
    as_taken = np.array([c.kind == "none" for c in test])
    n_split = {s: int(np.count_nonzero(data.split == s)) for s in ("val", "test")}
    record: dict[str, Any] = {
        "version": QUALITY_VERSION,
        "target_gradable": q.target_gradable,
        "limits": gate.limits,
        "colour_only": colour_only,
        "max_green_median": max_green,
        "min_brightness": min_bright,
        "min_green_median": min_green,
        "photos_as_taken": {"val": len(taken), "monochrome": monochrome},
        "limits_source": {
            **{k: ("recipe" if k in fixed else "calibrated on val") for k in MEASURES},
            **{k: "the val photos as taken" for k in DOMAIN if k in limits},
            **({"brightness": "the val photos as taken"} if dark_floor else {}),
        },
        "calibration": {
            "split": "val",
            "photos": len(val_idx),
            "photos_in_split": n_split["val"],
            "gradable_used": len(gradable_val),
            "share_passing": share,
            "copies_per_image": q.copies_per_image,
            "gate_on_val": gate_metrics(val, val_pass),
        },
        "test": gate_metrics(test, test_pass),
        "test_photos": {"used": len(test_idx), "in_split": n_split["test"]},
        "imageability": {"split": "test", **proportion(int(test_pass[as_taken].sum()), int(as_taken.sum()))},
        "ms_per_photo": round(seconds * 1e3, 3),
    }
    referral = referral_rows(ctx, test_idx, test_pass[as_taken])
    if referral:
        record["referral"], record["referral_headline"] = headline(ctx.recipe, referral)
        record["referral_by_artifact"] = referral
    atomic_write_json(folder / "quality.json", record)
    atomic_write_text(
        folder / "measures.csv",
        _measures_csv(
            [("val", c, bool(ok)) for c, ok in zip(val, val_pass, strict=True)]
            + [("test", c, bool(ok)) for c, ok in zip(test, test_pass, strict=True)]
        ),
    )
    ctx.quality = record
    ctx.stage.record = {"photos": {"val": len(val_idx), "test": len(test_idx)}}
    t = record["test"]
    ctx.console.print(
        f"[bold]quality[/]: gate calibrated on val ({_pct(share)} of gradable photos pass, target "
        f"{q.target_gradable:.0%}); on test: imageability {_pct(record['imageability']['value'])}, ungradable copies "
        f"caught {_pct(t['sensitivity']['value'])}, gradable passed {_pct(t['specificity']['value'])} "
        f"({Path(folder.name) / 'quality.json'})"
    )
    return artifacts


def headline(recipe: Recipe, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The referral row the report leads with, and why: the artifact the bundle ships when the recipe names it
    (bundle.select: name, on bundle.runtime unless auto), else fp32 (the bundle's candidate is chosen after this
    stage, by latency or on the box), else the first row."""
    b = recipe.bundle
    if b.enabled and b.select == "name":
        for r in rows:
            name, runtime = r["artifact"].split("@", 1)
            if name == b.artifact and b.runtime in ("auto", runtime):
                return r, "the artifact the bundle ships (bundle.select: name)"
    for r in rows:
        if r["artifact"].startswith("fp32@"):
            return r, "fp32; the bundle's candidate is chosen after this stage and may be another row"
    return rows[0], "the first benched row; the bundle's candidate is chosen after this stage"


def referral_rows(ctx: BuildContext, test_idx: np.ndarray, passed: np.ndarray) -> list[dict[str, Any]]:
    """:func:`referral_effect` for every bench row with test logits (artifact@runtime), on the test photos used
    (``test_idx``; ``passed``: the gate's verdict on each as taken). The logits are the bench's, over the whole test
    split in its order."""
    all_test = np.flatnonzero(ctx.data.split == "test")
    pos = np.searchsorted(all_test, test_idx)
    targets = ctx.data.targets[test_idx]
    op = ctx.operating_point
    out = []
    for row in ctx.bench_rows:
        if not row.get("logits_path"):
            continue
        logits = np.load(ctx.out_dir / row["logits_path"])
        if len(logits) != len(all_test):
            continue  # not the test split's logits (never written so; skipped rather than misaligned)
        out.append(
            {
                "artifact": f"{row['name']}@{row['runtime']}",
                **referral_effect(logits[pos], targets, passed, op["threshold"], op["temperature"]),
            }
        )
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


STAGE = Stage(
    name="quality",
    folder="07_quality",
    sections=SECTIONS,
    run=run,
    wanted=lambda recipe: bool(recipe.quality.enabled),
    reusable=False,
)
