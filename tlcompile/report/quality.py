"""report.json's ``quality`` section (the image-quality gate): its schema and what report.md/html print of it.

Written by the build's quality stage (tlcompile/build/stages/quality.py); nothing is computed here. Torch- and
numpy-free, like the schema it is part of.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Proportion(_Strict):
    value: float | None
    ci: list[float] | None
    k: int
    n: int


class _Level(_Strict):
    gradable: bool
    passed: _Proportion


class GateMetrics(_Strict):
    """The gate against the degradation labels: sensitivity = ungradable copies caught, specificity = gradable
    photos and copies passed (Wilson 95% CIs), and per kind and level the share passed."""

    copies: int
    ungradable: int
    sensitivity: _Proportion
    specificity: _Proportion
    by_kind: dict[str, dict[str, _Level]]


class _Calibration(_Strict):
    split: Literal["val"]
    photos: int
    photos_in_split: int = Field(None, description="Val photos in the split (photos: those used, at most the cap).")
    gradable_used: int
    share_passing: float | None
    copies_per_image: int
    gate_on_val: GateMetrics


class _TestPhotos(_Strict):
    used: int
    in_split: int


class _Imageability(_Proportion):
    split: Literal["test"]


class _SensSpec(_Strict):
    sensitivity: _Proportion
    specificity: _Proportion


class _Referral(_Strict):
    artifact: str
    all_images: _SensSpec
    gradable_only: _SensSpec
    share_graded: _Proportion


class _AsTaken(_Strict):
    val: int
    monochrome: int


class QualitySection(_Strict):
    """The image-quality gate: its limits (calibrated on val or set by the recipe), its sensitivity and specificity
    for ungradable photos on test, the test split's imageability, and the referral metrics with and without it."""

    version: int
    target_gradable: float
    limits: dict[str, float]
    colour_only: bool = Field(
        None,
        description="No val photo as taken was monochrome (red-free): the gate has a 'chroma' limit and refuses "
        "monochrome photos. Absent in reports from before it was recorded.",
    )
    photos_as_taken: _AsTaken = Field(None, description="The val photos as taken, and how many were monochrome.")
    max_green_median: float | None = Field(
        None,
        description="The field's median green of the brightest val photo as taken (the gate's 'green_median' limit: "
        "it refuses a brighter photo); null when no val photo had a field. Absent in reports from before it was "
        "recorded.",
    )
    min_brightness: float | None = Field(
        None,
        description="The brightness of the darkest val photo as taken; the gate's 'brightness' limit when it is above "
        "the calibrated one (limits_source says so: it refuses a darker photo); null when no val photo had a field. "
        "Absent in reports from before it was recorded.",
    )
    min_green_median: float | None = Field(
        None,
        description="The field's median green of the darkest val photo as taken (the gate's 'green_low' limit: it "
        "refuses a photo darker in green); null when no val photo had a field. Absent in reports from before it was "
        "recorded.",
    )
    limits_source: dict[str, str]
    calibration: _Calibration
    test: GateMetrics
    test_photos: _TestPhotos = Field(None, description="Test photos used (at most the cap) and in the split.")
    imageability: _Imageability
    ms_per_photo: float
    referral: _Referral = Field(
        None, description="The headline row: fp32 (else the first bench row); absent without bench test logits."
    )
    referral_headline: str = Field(None, description="Why referral is that artifact's row.")
    referral_by_artifact: list[_Referral] = Field(
        None, description="The same for every bench row (artifact@runtime) with test logits."
    )


def _p(d: dict[str, Any] | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    ci = d.get("ci")
    return f"{d['value']:.1%} ({d['k']}/{d['n']}" + (f"; 95% CI {ci[0]:.1%}-{ci[1]:.1%})" if ci else ")")


def quality_parts(report: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[str], list[list[str]]]]] | None:
    """(paragraphs, tables as (caption, header, rows)) of the report's quality section, or None without one."""
    q = report.get("quality")
    if not q:
        return None
    t, cal = q["test"], q["calibration"]
    paragraphs = [
        "The image-quality gate ships in the bundle and runs torch-free in predict, serve and verify: a photo that "
        "fails it is answered 'ungradable' with the reasons and 'retake', and gets no referral decision. Its limits "
        f"were calibrated on the gradable val photos (as taken and mildly degraded) so that "
        f"{q['target_gradable']:.0%} of them pass (reached, with the limits of what val held too: "
        + ("-" if cal["share_passing"] is None else f"{cal['share_passing']:.1%}")
        + f"); {q['ms_per_photo']:.2f} ms per photo on the build box.",
        f"**Imageability on test** (the test photos as taken): {_p(q['imageability'])}.",
        f"On the test photos and their degraded copies ({t['copies']}, {t['ungradable']} ungradable by the "
        f"degradation rule): ungradable caught (sensitivity) {_p(t['sensitivity'])}; gradable passed (specificity) "
        f"{_p(t['specificity'])}. The copies of one photo are correlated (same eye, same camera), so these "
        "Wilson CIs, computed as if every copy were an independent photo, are narrower than per-photo CIs would be.",
    ]
    taken = q.get("photos_as_taken")
    if taken:
        paragraphs.append(
            f"Colour: {taken['monochrome']} of the {taken['val']} val photos as taken are monochrome (red-free)"
            + (
                "; the model was validated on colour photographs only, so the gate answers a monochrome photo "
                "'ungradable' (limit on chroma, the spread of the field's mean R, G and B)."
                if q.get("colour_only")
                else "; monochrome photos are decided like colour ones."
            )
        )
    if q.get("max_green_median") is not None:
        paragraphs.append(
            f"Exposure: the brightest val photo as taken has a median green of {q['max_green_median']:.0f} in its "
            "field; the gate answers a brighter photo 'ungradable' (limit on green_median): one the model was not "
            "shown to read. The test figures above count this limit too (test photos brighter than every val photo "
            "are refused)."
        )
    darkest = q.get("limits_source", {}).get("brightness") == "the val photos as taken"
    if q.get("min_brightness") is not None and darkest:
        paragraphs.append(
            f"Darkness: the darkest val photo as taken has a brightness of {q['min_brightness']:.0f}, above the "
            "calibrated limit; the gate answers a darker photo 'ungradable' (too dark): one the model was not shown to "
            "read. The test figures above count this limit too."
        )
    if q.get("min_green_median") is not None:
        paragraphs.append(
            f"Green: the val photo as taken darkest in green has a median green of {q['min_green_median']:.0f}; the "
            "gate answers a photo darker in green 'ungradable' (limit on green_low: a gamma or a colour cast can fade "
            "the vessels while the brightness stays in range)."
        )
    used = q.get("test_photos")
    if used and used["used"] < used["in_split"]:
        paragraphs.append(
            f"Measured on {used['used']} of the {used['in_split']} test photos and {cal['photos']} of the "
            f"{cal.get('photos_in_split', cal['photos'])} val photos (quality.max_photos_per_split, drawn from the "
            "seed)."
        )
    tables = [
        (
            "Limits",
            ["measure", "limit", "set by"],
            [[k, f"{v:.4g}", q["limits_source"].get(k, "")] for k, v in q["limits"].items()],
        ),
        (
            "Test copies passed, per degradation",
            ["kind", "level", "label", "passed"],
            [
                [kind, level, "gradable" if v["gradable"] else "ungradable", _p(v["passed"])]
                for kind, levels in t["by_kind"].items()
                for level, v in levels.items()
            ],
        ),
    ]
    r = q.get("referral")
    if r:
        paragraphs.append(
            f"Referral metrics of {r['artifact']} with and without the gate (test photos as taken; share graded "
            f"{_p(r['share_graded'])}): "
            + q.get("referral_headline", "the bundle's deployed candidate may be another artifact or runtime")
            + ". Every benched artifact and runtime is in the table after."
        )
        tables.append(
            (
                f"Referral of {r['artifact']}: all images vs gradable-only",
                ["photos", "sensitivity", "specificity"],
                [
                    ["all", _p(r["all_images"]["sensitivity"]), _p(r["all_images"]["specificity"])],
                    ["gradable only", _p(r["gradable_only"]["sensitivity"]), _p(r["gradable_only"]["specificity"])],
                ],
            )
        )
    rows = q.get("referral_by_artifact") or []
    if rows:
        tables.append(
            (
                "Referral with and without the gate, per artifact and runtime",
                [
                    "artifact",
                    "sensitivity all",
                    "sensitivity gradable",
                    "specificity all",
                    "specificity gradable",
                    "share graded",
                ],
                [
                    [
                        x["artifact"],
                        _p(x["all_images"]["sensitivity"]),
                        _p(x["gradable_only"]["sensitivity"]),
                        _p(x["all_images"]["specificity"]),
                        _p(x["gradable_only"]["specificity"]),
                        _p(x["share_graded"]),
                    ]
                    for x in rows
                ],
            )
        )
    return paragraphs, tables
