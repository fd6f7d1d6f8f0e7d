"""``07_quality``: calibrate the image-quality gate on val, measure it on test; recorded as report["quality"].

The photos are the splits' own photographs as the camera gave them (the synthetic generator's raw frames, re-drawn
from their documented per-image generators, or the source files), never the training inputs: nothing trained on
changes. Each val and test photo gets ``quality.copies_per_image`` degraded copies (:mod:`tlcompile.data.degrade`,
labelled gradable or not by the rule documented there), deterministic from the recipe's seed.

- Calibration (val): the limits of :mod:`tlcompile.runtime.quality` are set on the *gradable* val photos only (as
  taken, and their mildly degraded copies) so that ``quality.target_gradable`` of them pass.
- Evaluation (test): the gate's sensitivity (ungradable copies caught) and specificity (gradable photos and copies
  passed) with Wilson 95% CIs, per degradation kind and level; the imageability of the test split as it is; and
  what the gate does to the referral metrics of the fp32 model: sensitivity and specificity on every test photo
  against those on the photos the gate passes (gradable-only, as the cleared devices report them), and the share
  graded.

Measured again on every build (it reads the bench's test logits), also under --resume; it takes seconds.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.data.datamodule import DataModule
from tlcompile.data.degrade import Copy, degraded_copies
from tlcompile.errors import DataError
from tlcompile.evaluate.clinical import proportion
from tlcompile.evaluate.metrics import referable_score, referable_truth
from tlcompile.io import atomic_write_json, atomic_write_text
from tlcompile.recipe import Recipe
from tlcompile.runtime.preprocess import find_field, read_input
from tlcompile.runtime.quality import MEASURES, QUALITY_VERSION, QualityGate, calibrate, judge, measure

SECTIONS = ("seed", "data", "quality")


def split_photos(data: DataModule, recipe: Recipe, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The photos of one split as the camera gave them: (indices into the data module, uint8 RGB photos)."""
    idx = np.flatnonzero(data.split == split)
    d = recipe.data
    if d.source == "synthetic":
        from tlcompile.data import synthetic

        # synthetic.py's documented determinism: image i of generate(n, seed=s) is drawn from
        # default_rng(SeedSequence([s, i])), its grade first; the data stage renders at round(1.25 x image_size).
        raw_size = int(round(d.image_size * 1.25))
        difficulty = synthetic.DEFAULT_DIFFICULTY if d.difficulty is None else d.difficulty
        probs = np.asarray(synthetic.DEFAULT_GRADE_PROBS, np.float64)
        photos = []
        for i in idx:
            rng = np.random.default_rng(np.random.SeedSequence([recipe.seed, int(i)]))
            grade = int(rng.choice(5, p=probs))
            photos.append(synthetic.render_fundus(grade, rng, size=raw_size, difficulty=difficulty, style=d.style))
        return idx, photos
    photos = []
    for i in idx:
        rgb, _ = read_input(data.paths[i], draft_size=data.spec.draft_size)
        photos.append(rgb)
    return idx, photos


def _measured(copies: list[Copy]) -> tuple[list[dict[str, float] | None], float]:
    """The measures of every copy (None: no field of view found) and the mean seconds per photo."""
    out: list[dict[str, float] | None] = []
    t0 = time.perf_counter()
    for c in copies:
        found = find_field(c.image)
        out.append(None if found is None else measure(c.image, found))
    return out, (time.perf_counter() - t0) / max(1, len(copies))


def _copies(photos: list[np.ndarray], seed: int, per_image: int) -> list[Copy]:
    try:
        return degraded_copies(photos, seed=seed, per_image=per_image)
    except DataError:  # a photo without a field of view: degrade the others, one at a time
        out: list[Copy] = []
        for i, photo in enumerate(photos):
            try:
                out += [
                    Copy(i, c.kind, c.level, c.gradable, c.image)
                    for c in degraded_copies([photo], seed=seed * 100_003 + i, per_image=per_image)
                ]
            except DataError:
                out.append(Copy(i, "none", 0.0, True, photo))
        return out


def _verdicts(measures: list[dict[str, float] | None], limits: dict[str, float]) -> np.ndarray:
    return np.array([m is not None and judge(m, limits).gradable for m in measures], bool)


def gate_metrics(copies: list[Copy], passed: np.ndarray) -> dict[str, Any]:
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


def _fp32_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("name") == "fp32" and r.get("logits_path")), None)


def _measures_csv(rows: list[tuple[str, Copy, dict[str, float] | None, bool]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "photo", "kind", "level", "gradable", "passed", *MEASURES])
    for split, c, m, ok in rows:
        writer.writerow(
            [split, c.index, c.kind, f"{c.level:g}", int(c.gradable), int(ok), *(m[k] if m else "" for k in MEASURES)]
        )
    return buffer.getvalue()


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    q, data, folder = ctx.recipe.quality, ctx.data, ctx.stage.folder
    with ctx.console.status("[bold]quality[/]: degraded copies of val and test, calibrating the gate"):
        _, val_photos = split_photos(data, ctx.recipe, "val")
        test_idx, test_photos = split_photos(data, ctx.recipe, "test")
        val = _copies(val_photos, ctx.recipe.seed, q.copies_per_image)
        test = _copies(test_photos, ctx.recipe.seed + 1, q.copies_per_image)
        val_m, _ = _measured(val)
        test_m, seconds = _measured(test)
    fixed = {k: v for k, v in q.limits.model_dump().items() if v is not None}
    gradable_val = [m for c, m in zip(val, val_m, strict=True) if c.gradable and m is not None]
    if gradable_val:
        values = {k: np.array([m[k] for m in gradable_val]) for k in MEASURES}
        limits, share = calibrate(values, q.target_gradable, fixed)
    else:
        limits, share = {k: fixed.get(k, MEASURES[k][1]) for k in MEASURES}, None
    gate = QualityGate(limits=limits)
    val_pass, test_pass = _verdicts(val_m, limits), _verdicts(test_m, limits)
    as_taken = np.array([c.kind == "none" for c in test])
    record: dict[str, Any] = {
        "version": QUALITY_VERSION,
        "target_gradable": q.target_gradable,
        "limits": gate.limits,
        "limits_source": {k: ("recipe" if k in fixed else "calibrated on val") for k in MEASURES},
        "calibration": {
            "split": "val",
            "photos": len(val_photos),
            "gradable_used": len(gradable_val),
            "share_passing": share,
            "copies_per_image": q.copies_per_image,
            "gate_on_val": gate_metrics(val, val_pass),
        },
        "test": gate_metrics(test, test_pass),
        "imageability": {"split": "test", **proportion(int(test_pass[as_taken].sum()), int(as_taken.sum()))},
        "ms_per_photo": round(seconds * 1e3, 3),
    }
    row = _fp32_row(ctx.bench_rows)
    if row is not None:
        logits = np.load(ctx.out_dir / row["logits_path"])
        _, y_test = data.subset("test")
        op = ctx.operating_point
        record["referral"] = {
            "artifact": f"{row['name']}@{row['runtime']}",
            **referral_effect(logits, y_test, test_pass[as_taken], op["threshold"], op["temperature"]),
        }
    atomic_write_json(folder / "quality.json", record)
    atomic_write_text(
        folder / "measures.csv",
        _measures_csv(
            [("val", c, m, bool(ok)) for c, m, ok in zip(val, val_m, val_pass, strict=True)]
            + [("test", c, m, bool(ok)) for c, m, ok in zip(test, test_m, test_pass, strict=True)]
        ),
    )
    ctx.quality = record
    ctx.stage.record = {"photos": {"val": len(val_photos), "test": len(test_idx)}}
    t = record["test"]
    ctx.console.print(
        f"[bold]quality[/]: gate calibrated on val ({_pct(share)} of gradable photos pass, target "
        f"{q.target_gradable:.0%}); on test: imageability {_pct(record['imageability']['value'])}, ungradable copies "
        f"caught {_pct(t['sensitivity']['value'])}, gradable passed {_pct(t['specificity']['value'])} "
        f"({Path(folder.name) / 'quality.json'})"
    )
    return artifacts


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
