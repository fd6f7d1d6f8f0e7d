"""``explain``: heatmaps of the shipped model on a few test images per grade, and how faithful they are.

Runs after the bundle stage, on the bundle's own default candidate through its deployed runtime (OpenVINO or ONNX
Runtime, never torch), with the method ``predict --explain`` uses (:mod:`tlcompile.runtime.explain`). It writes the
overlays into ``08_explain/`` (a contact sheet, one row per grade) and ``report["explain"]``: the method, the time per
explained image on this CPU and, for synthetic data, the pointing game on the referable test images against the
lesions the generator painted (``synthetic.draw_with_lesions``: the very images the build tested on, re-rendered
with their lesion record), with its chance and field-centre baselines. Other data has no lesion positions: the
pointing game is then skipped and says why.

Cost on the quickstart (2-core Xeon, AVX-512 VNNI + AMX-INT8, ONNX Runtime, 2 threads, load average ~2.4): 64 images
explained (60 referable, plus the grade 0 and 1 examples) at a median 129.74 ms (p90 165.21 ms); the stage took 9.9 s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.runtime import explain as xai
from tlcompile.runtime.preprocess import prepare_image, to_input

FOLDER = "08_explain"
PER_GRADE = 2  # heatmaps shown per DR grade in the report
SHEET = "heatmaps.png"


def _wanted(recipe: Any) -> bool:
    return bool(recipe.bundle.enabled) and recipe.bundle.explain_images > 0


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    record = ctx.report.get("bundle") or {}
    if ctx.bundle_error is not None or "path" not in record:
        ctx.report["explain"] = {"skipped": "no bundle was made: nothing deployed to explain"}
        return artifacts
    with ctx.console.status("[bold]explain[/]: heatmaps of the shipped model on test images"):
        ctx.report["explain"] = explain_build(ctx, record)
    _say(ctx, ctx.report["explain"])
    ctx.stage.record = {"explain": {k: v for k, v in ctx.report["explain"].items() if k != "examples"}}
    return artifacts


def explain_build(ctx: BuildContext, record: dict[str, Any]) -> dict[str, Any]:
    from tlcompile.runtime.bundle import load_bundle

    bundle = load_bundle(ctx.out_dir / record["path"])
    bundle = bundle.candidate(bundle.default_candidate)
    session = bundle.open_session()
    spec = bundle.preprocessing
    dm = ctx.data
    test = [i for i in np.flatnonzero(dm.split == "test") if dm.fov_found.size == 0 or dm.fov_found[i]]
    shown = {g: [i for i in test if dm.grades[i] == g][:PER_GRADE] for g in range(5)}
    lesions = _lesion_source(ctx)
    # the first referable test images, in data order (recipe bundle.explain_images)
    pointing = [i for i in test if dm.grades[i] >= 2][: ctx.recipe.bundle.explain_images] if lesions else []
    tolerance = xai.tolerance_px(spec.size)
    batch = xai.batch_size_of(bundle.meta, spec.size)

    folder = ctx.stage.folder
    cases, ms, examples = [], [], []
    wanted = sorted({*pointing, *(i for ids in shown.values() for i in ids)})
    show = {i for ids in shown.values() for i in ids}
    for i in wanted:
        x = to_input(dm.image(i), spec)
        e = xai.explain_input(session, x, spec, temperature=bundle.temperature, batch=batch)
        ms.append(e.ms)
        if i in pointing:
            case = xai.pointing_case(e.heat, lesions(i, spec), e.field, tolerance)
            if case is not None:
                cases.append(case)
        if i in show:
            p = float(xai.referable_probability(session.run(x), bundle.temperature)[0])
            name = f"{dm.ids[i]}{xai.EXPLAIN_SUFFIX}"
            caption = (
                f"grade {int(dm.grades[i])}  P(referable DR) {p:.3f}  heat max {float(e.heat[e.field].max()):+.3f}"
            )
            xai.write_overlay(xai.overlay(e.crop, e.heat, e.field, caption=caption), folder / name, source=dm.ids[i])
            examples.append(
                {
                    "id": dm.ids[i],
                    "grade": int(dm.grades[i]),
                    "referable_dr_probability": round(p, 6),
                    "refer": bool(p >= bundle.threshold),
                    "file": f"{FOLDER}/{name}",
                    "peak": list(e.peak),
                }
            )
    examples.sort(key=lambda ex: (ex["grade"], ex["id"]))
    sheet = _contact_sheet(folder, examples) if examples else None
    out: dict[str, Any] = {
        "method": xai.DEFAULT_METHOD,
        "method_detail": xai.method_detail(xai.DEFAULT_METHOD, spec.size),
        "candidate": bundle.candidate_id,
        "runtime": bundle.runtime,
        "threads": int(session.threads),
        "latency_ms": {
            "median": round(float(np.median(ms)), 2) if ms else None,
            "p90": round(float(np.percentile(ms, 90)), 2) if ms else None,
            "n": len(ms),
        },
        "examples": examples,
        "sheet": f"{FOLDER}/{SHEET}" if sheet else None,
    }
    if lesions:
        out["pointing_game"] = {**xai.pointing_game(cases, tolerance=tolerance, size=spec.size), "images": "test"}
    else:
        out["pointing_game"] = None
        out["pointing_note"] = (
            "not played: the painted lesions' positions are known only for the synthetic generator's images"
        )
    return out


def _lesion_source(ctx: BuildContext) -> Any:
    """i -> the lesion opacity of image i in the network frame, for synthetic data (else None)."""
    dm = ctx.data
    if dm.generator is None:  # photographs: nobody knows where their lesions are
        return None
    from tlcompile.data import synthetic

    def lesions(i: int, spec: Any) -> np.ndarray:
        raw, grade, opacity = synthetic.draw_with_lesions(i, **dm.generator)  # the generator's arguments, as drawn
        if grade != dm.grades[i] or not np.array_equal(prepare_image(raw, spec)[0], dm.image(i)):
            raise AssertionError(f"{dm.ids[i]}: re-rendered image differs from the one the build tested on")  # a bug
        return xai.to_network_frame(opacity, raw, spec)

    return lesions


def _contact_sheet(folder: Any, examples: list[dict[str, Any]]) -> Any:
    """One row per grade of the examples' overlays, labelled; written beside them."""
    by_grade: dict[int, list[Image.Image]] = {}
    for ex in examples:
        with Image.open(folder / ex["file"].split("/", 1)[1]) as img:
            by_grade.setdefault(ex["grade"], []).append(img.convert("RGB"))
    w = max(img.width for row in by_grade.values() for img in row)
    h = max(img.height for row in by_grade.values() for img in row)
    label, gap = 70, 4
    cols = max(len(row) for row in by_grade.values())
    sheet = Image.new("RGB", (label + cols * (w + gap), len(by_grade) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (grade, row) in enumerate(sorted(by_grade.items())):
        draw.text((6, r * (h + gap) + h // 2 - 6), f"grade {grade}", fill=(0, 0, 0))
        for c, img in enumerate(row):
            sheet.paste(img, (label + c * (w + gap), r * (h + gap)))
    path = folder / SHEET
    xai.write_overlay(sheet, path, source="contact sheet")
    return path


def _say(ctx: BuildContext, rec: dict[str, Any]) -> None:
    msg = f"[bold]explain[/]: {rec['method']} heatmaps on {rec['candidate']}, {rec['latency_ms']['median']} ms/image"
    g = rec.get("pointing_game")
    if g and g["n"]:
        msg += (
            f"; pointing game on {g['n']} referable test images: hit {g['hit_rate']['value']:.2f} "
            f"(chance {g['chance']['value']:.2f}, field centre {g['centre']['value']:.2f})"
        )
    ctx.console.print(msg)


STAGE = Stage(name="explain", folder=FOLDER, sections=None, run=run, wanted=_wanted, reusable=False)
