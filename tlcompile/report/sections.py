"""The sections and tables of the report, and its verdict box: what report.md and report.html both print.

Nothing is computed here that is not in the report: every number comes from report.json, so a build folder can be
re-rendered (``tlcompile report render``) on any machine. :func:`report_sections` is the one list of sections and
tables; report.md (:mod:`tlcompile.report.render`) prints it, and report.html (:mod:`tlcompile.report.html`) prints
the same sections with their plots. Numbers and verdict words are written by :mod:`tlcompile.report.format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tlcompile.compress.guard import evidence_text
from tlcompile.report.explain import explain_section
from tlcompile.report.format import (
    GUARD_FAILED,
    GUARD_MET,
    GUARD_REFERENCE,
    PARETO_MARK,
    PP,
    delta_pp,
    guard_cell,
    mb,
    pareto_cell,
    pct,
    pp,
    with_ci,
)
from tlcompile.report.quality import quality_parts
from tlcompile.runtime.terminal import num

ROW_COLUMNS = (
    "artifact",
    "runtime",
    "format",
    "exec",
    "threads",
    "p50 ms",
    "p90 ms",
    "AUC",
    "sens",
    "spec",
    "acc",
    "MB",
    "MMACs",
    "|Δlogit|",
    "top-1 agree",
    "guard",
)


METRIC_WORDS = {"auc": "AUC"}
DELTA_WORDS = {"delta_sensitivity": "sensitivity", "delta_specificity": "specificity", "delta_auc": "AUC"}


def _pp_against(value: float, limit: float) -> tuple[str, str]:
    """A delta and its limit in points, with a second decimal where one decimal would show them equal."""
    for digits in (1, 2, 3):
        v, lim = format(100 * value, f"+.{digits}f"), format(100 * limit, f"+.{digits}f")
        if v != lim:
            break
    return f"{v} {PP}", f"{lim} {PP}"


def row_flags(row: dict[str, Any]) -> list[str]:
    """What a reader must not miss about a compressed row's test split, one item per metric: a drop beyond the guard's
    own limits (``test_flags``, against the model the guard compared it with) and/or a paired 95% CI against fp32 that
    excludes 0; then the referable test eyes it newly misses. Empty for fp32 and for rows with nothing to flag."""
    ref = (row.get("clinical") or {}).get("vs_reference") or {}
    beyond = {f["metric"]: f for f in row.get("test_flags") or []}
    flags = []
    for key, word in DELTA_WORDS.items():
        metric = key.removeprefix("delta_")
        f = beyond.pop(metric, None)
        d = ref.get(key) or {}
        ci = d.get("ci")
        excludes = bool(ci) and d.get("value") is not None and (ci[1] < -1e-12 or ci[0] > 1e-12)
        parts = []
        if f:
            value, limit = _pp_against(-f["drop"], -f["max_drop"])
            parts.append(f"test {word} {value} vs {f['reference']}, beyond the guard's limit of {limit}")
        if excludes:
            direction = "worse" if ci[1] < 0 else "better"
            ci_text = f"95% CI of {delta_pp(d)} vs fp32 excludes 0 ({direction})"
            parts.append(ci_text if f else f"test {word}: {ci_text}")
        if parts:
            flags.append("; ".join(parts))
    for f in beyond.values():  # a guarded metric without a paired delta (accuracy)
        value, limit = _pp_against(-f["drop"], -f["max_drop"])
        flags.append(
            f"test {METRIC_WORDS.get(f['metric'], f['metric'])} {value} vs {f['reference']}, beyond the guard's limit "
            f"of {limit}"
        )
    if flags and ref.get("missed_referable"):
        flags.append(f"{ref['missed_referable']} referable test eye(s) newly missed vs fp32")
    return flags


def artifact_cells(row: dict[str, Any]) -> list[str]:
    lat, m, par = row.get("latency_ms", {}), row.get("metrics", {}), row.get("parity", {})
    return [
        row["name"],
        row["runtime"],
        row["format"],
        str(row.get("exec_precision", "-")),
        str(row.get("threads", "-")),
        num(lat.get("p50"), ".2f"),
        num(lat.get("p90"), ".2f"),
        num(m.get("auc")),
        num(m.get("sensitivity")),
        num(m.get("specificity")),
        num(m.get("accuracy")),
        mb(row.get("size_bytes")),
        num((row.get("macs") or 0) / 1e6, ".1f"),
        num(par.get("max_abs_diff"), ".1e") if par.get("reference") != "self" else GUARD_REFERENCE,
        num(par.get("top1_agreement"), ".1%") if par.get("reference") != "self" else GUARD_REFERENCE,
        guard_cell(row),
    ]


# ---------------------------------------------------------------------------------------------- verdict
@dataclass
class VerdictItem:
    label: str
    text: str
    level: str = ""  # "" | "warn" (read with care) | "bad" (a failure or a flag)


@dataclass
class Verdict:
    """What shipped, what it costs, what it is for: the box at the top of report.md and report.html."""

    banner: str
    banner_level: str  # "bad" for synthetic data (not for clinical use), "warn" otherwise
    items: list[VerdictItem]


RUNTIME_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "torch": "PyTorch"}


def _runtime_name(runtime: str) -> str:
    return RUNTIME_NAMES.get(runtime, runtime)


def isa_text(isa: list[str]) -> str:
    """``AVX2, AVX-512; no VNNI``: the ISA list, saying so when the CPU has no int8 dot-product instruction."""
    if not isa:
        return "ISA unknown"
    return ", ".join(isa) + ("" if any("VNNI" in x for x in isa) else "; no VNNI")


def banner_text(report: dict[str, Any]) -> tuple[str, str]:
    """The intended use and the data provenance, from the recipe the build ran; synthetic data says NOT for clinical
    use."""
    recipe = report.get("recipe") or {}
    data = recipe.get("data") or {}
    intended = (recipe.get("bundle") or {}).get("intended_use")
    if not intended:
        from tlcompile.recipe import DEFAULT_INTENDED_USE

        intended = DEFAULT_INTENDED_USE
    source = data.get("source")
    images = report.get("data", {}).get("images") or data.get("num_images")
    if source == "synthetic":
        return (
            f"**Synthetic data: NOT for clinical use.** Trained and tested on {images or 'some'} images from "
            "tlcompile's built-in synthetic fundus generator, not photographs of patients; a demonstration of the "
            f"pipeline. Intended use of a model built this way on real data: {intended}"
        ), "bad"
    where = (
        f"{source} data" + (f" from {data['root']}" if data.get("root") else "") if source else "data of unknown origin"
    )
    return (
        f"**Intended use:** {intended} **Data:** {where}"
        + (f", {images} images" if images else "")
        + ". Measured on this build's test split on the build box: re-validate on local images, camera and population "
        "before clinical use."
    ), "warn"


def _measured(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return ((report.get("bundle") or {}).get("selection") or {}).get("measured_on_build_box") or {}


def _latency_of(report: dict[str, Any], cid: str, rows: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any] | None:
    """p50/p90 (and the p90 spread over rounds, when the bundle measured it) of a candidate ``name@runtime``."""
    m = _measured(report).get(cid)
    if m:
        return {
            "p50": m.get("p50_ms"),
            "p90": m.get("p90_ms"),
            "spread": m.get("p90_spread_ms"),
            "p50_spread": m.get("p50_spread_ms"),
            "rounds": m.get("rounds"),
        }
    name, _, runtime = cid.partition("@")
    row = rows.get((name, runtime))
    if not row:
        return None
    lat = row.get("latency_ms", {})
    return {"p50": lat.get("p50"), "p90": lat.get("p90"), "spread": None, "p50_spread": None, "rounds": None}


def int8_speed_notes(report: dict[str, Any]) -> list[str]:
    """ "int8 is not faster than fp32 on this CPU (ISA...)" for each runtime where the bench rows show it: int8's p50 is
    not below fp32's by more than the measured p50 spread (0 when only one measurement exists)."""
    rows = {(r["name"], r["runtime"]): r for r in report.get("artifacts", [])}
    isa = report.get("environment", {}).get("cpu", {}).get("isa") or []
    notes = []
    for runtime in dict.fromkeys(r["runtime"] for r in report.get("artifacts", [])):
        if runtime == "torch" or ("int8", runtime) not in rows or ("fp32", runtime) not in rows:
            continue
        a, b = _latency_of(report, f"int8@{runtime}", rows), _latency_of(report, f"fp32@{runtime}", rows)
        if not a or not b or a["p50"] is None or b["p50"] is None:
            continue
        noise = max(a.get("p50_spread") or 0.0, b.get("p50_spread") or 0.0)
        if b["p50"] - a["p50"] <= noise:
            how = "slower than" if a["p50"] >= b["p50"] else "not faster than"
            notes.append(
                f"int8 is {how} fp32 on {_runtime_name(runtime)} on this CPU (p50 {a['p50']:.2f} vs {b['p50']:.2f} ms"
                + (
                    f"; a difference within the noise of {noise:.2f} ms is a tie"
                    if noise and a["p50"] < b["p50"]
                    else ""
                )
                + (f"; {isa_text(isa)})" if not any("VNNI" in x for x in isa) else "; this CPU has VNNI)")
            )
    return notes


def _guard_failure_words(row: dict[str, Any]) -> str:
    """``val sensitivity -9.8 pp vs fp32 (limit -2.0 pp)``: the failed checks of a row's guard, in plain words."""
    parts = []
    for check in (row.get("guard") or {}).get("checks", []):
        for metric in ("auc", "sensitivity", "specificity", "accuracy"):
            item = check.get(metric) or {}
            if item.get("max_drop") is not None and item.get("met") is False:
                parts.append(
                    f"val {METRIC_WORDS.get(metric, metric)} {pp(-item['drop'])} vs {check.get('against', 'fp32')} "
                    f"(limit {pp(-item['max_drop'])})"
                )
    return ", ".join(parts)


def _delta_words(measured: dict[str, Any] | None) -> str:
    """``-3.3 pp (95% CI -6.5 to -0.8)``."""
    if not measured or measured.get("value") is None:
        return "-"
    ci = measured.get("ci")
    return pp(measured["value"]) + (f" (95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def name_of(cid: str) -> str:
    return cid.partition("@")[0]


def _passed_over(report: dict[str, Any], chosen: str, rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """One plain sentence per reason a candidate was not the build's choice."""
    selection = (report.get("bundle") or {}).get("selection") or {}
    chosen_lat = _latency_of(report, chosen, rows) or {}
    failed_guard: dict[str, list[str]] = {}
    other: list[str] = []
    ties, slower = [], []
    for c in selection.get("candidates", []):
        cid = c.get("id") or f"{c['name']}@{c['runtime']}"
        if cid == chosen:
            continue
        why = c.get("why_not")
        row = rows.get((c["name"], c["runtime"]), {})
        if c.get("guard_met") is False:
            failed_guard.setdefault(c["name"], []).append(_runtime_name(c["runtime"]))
            continue
        if why:
            other.append(f"{cid}: {why}")
            continue
        lat = _latency_of(report, cid, rows) or {}
        if lat.get("p90") is None or chosen_lat.get("p90") is None:
            continue
        noise = max(lat.get("spread") or 0.0, chosen_lat.get("spread") or 0.0)
        diff = chosen_lat["p90"] - lat["p90"]
        if abs(diff) <= noise:
            ties.append(f"{cid} ({lat['p90']:.2f} ms)")
        elif diff < 0:
            slower.append(f"{cid} ({lat['p90']:.2f} ms)")
        else:
            other.append(
                f"{cid}: faster by {diff:.2f} ms p90, more than the noise, yet not chosen "
                f"({selection.get('rule', '-')} rule)"
            )
        del row
    out = []
    for name, runtimes in failed_guard.items():
        row = next((r for r in report.get("artifacts", []) if r["name"] == name and r.get("guard")), {})
        steps = len((row.get("guard") or {}).get("actions", []))
        words = _guard_failure_words(row)
        out.append(
            f"{name} ({', '.join(runtimes)}) failed the accuracy guard"
            + (f": {words}" if words else "")
            + (f"; {steps} recovery step(s) did not fix it (guard table)" if steps else "")
            + "; not shippable."
        )
    if ties:
        out.append(
            "A tie with the shipped one (p90 within the measured noise)"
            + (", which goes to the uncompressed model" if name_of(chosen) == "fp32" else "")
            + ": "
            + ", ".join(ties)
            + "."
        )
    if slower:
        out.append("Slower p90 on the build box: " + ", ".join(slower) + ".")
    out += [o + "." for o in other]
    return out


def verdict(report: dict[str, Any]) -> Verdict:
    """The verdict box: everything in it comes from report.json."""
    banner, banner_level = banner_text(report)
    items: list[VerdictItem] = []
    rows = {(r["name"], r["runtime"]): r for r in report.get("artifacts", [])}
    bundle = report.get("bundle") or {}
    selection = bundle.get("selection") or {}
    cpu = report.get("environment", {}).get("cpu", {})
    chosen = (
        bundle.get("default_candidate")
        or selection.get("chosen_id")
        or (f"{bundle['artifact']}@{bundle['runtime']}" if bundle.get("artifact") and bundle.get("runtime") else None)
    )
    if not chosen:
        reason = (
            bundle.get("skipped")
            or bundle.get("error")
            or "the recipe makes none (bundle.enabled: false) or it was not written"
        )
        items.append(VerdictItem("Ships", f"nothing: no bundle ({reason}).", "bad"))
        return Verdict(banner, banner_level, items)
    name, _, runtime = chosen.partition("@")
    row = rows.get((name, runtime), {})
    n_cand = len(bundle.get("candidates") or [])
    precision = bundle.get("precision") or row.get("exec_precision") or "-"
    items.append(
        VerdictItem(
            "Ships",
            (
                f"**{name}** on **{_runtime_name(runtime)}** (candidate `{chosen}`, runs in {precision}), the build's "
                f"choice by the '{selection.get('rule', '-')}' rule"
                + (f": {selection['why']}" if selection.get("why") else "")
                + "."
                + (
                    f" The bundle carries {n_cand} candidates; `tlcompile verify` on the clinic's box pins the fastest "
                    "there."
                    if n_cand > 1
                    else ""
                )
            ),
        )
    )
    lat = _latency_of(report, chosen, rows)
    if lat and lat.get("p50") is not None:
        load = selection.get("load_average")
        speed = (
            f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms at batch 1 on {cpu.get('model', 'this CPU')} "
            f"({cpu.get('usable_cores', '?')} cores; {isa_text(cpu.get('isa') or [])})"
        )
        if lat.get("spread") is not None:
            speed += f"; p90 spread over {lat.get('rounds') or '?'} rounds {lat['spread']:.2f} ms"
        else:
            speed += "; one measurement, no spread known"
        if load:
            speed += f"; load average {load[0]:.2f}"
        noisy = bool(selection.get("noise")) or (
            lat.get("spread") is not None and lat["p90"] and lat["spread"] > 0.5 * lat["p90"]
        )
        if selection.get("noise"):
            speed += f". {selection['noise'][0].upper()}{selection['noise'][1:]}"
        elif noisy:
            speed += (
                ". The p90 spread is more than half the p90: a busy box; latency differences within the spread are "
                "ties; on a quiet box, run tlcompile verify --repin"
            )
        items.append(VerdictItem("Speed on the build box", speed + ".", "warn" if noisy else ""))
    notes = int8_speed_notes(report)
    if notes:
        items.append(VerdictItem("int8", "; ".join(notes) + ".", "warn"))
    c = row.get("clinical") or {}
    if c:
        ref = c.get("vs_reference")
        sens, spec = c.get("sensitivity"), c.get("specificity")
        fp32 = (rows.get(("fp32", runtime)) or {}).get("clinical") or {}
        if ref:
            acc = (
                f"sensitivity {with_ci(sens, percent=True)} against fp32's "
                f"{pct(fp32.get('sensitivity', {}).get('value'))}: {_delta_words(ref.get('delta_sensitivity'))}; "
                f"specificity {with_ci(spec, percent=True)} against {pct(fp32.get('specificity', {}).get('value'))}: "
                f"{_delta_words(ref.get('delta_specificity'))}; AUC {with_ci(c.get('auc'), percent=False)}: "
                f"{_delta_words(ref.get('delta_auc'))}; {ref.get('missed_referable', 0)} referable eye(s) newly "
                f"missed, {ref.get('newly_referred', 0)} newly referred"
            )
        else:
            acc = (
                f"sensitivity {with_ci(sens, percent=True)}, specificity {with_ci(spec, percent=True)}, AUC "
                f"{with_ci(c.get('auc'), percent=False)}; this is the fp32 model, the reference the others are judged "
                "against"
            )
        items.append(
            VerdictItem(
                f"Test split ({c.get('n', '-')} images, {c.get('referable', '-')} referable)",
                acc + ". Deltas: new - fp32, percentage points, paired 95% CI.",
            )
        )
        e = c.get("endpoints") or {}
        if e.get("pass") is None:
            items.append(
                VerdictItem(
                    "Endpoints", "none set in the recipe (evaluate.endpoints): no pass/fail claim is made.", "warn"
                )
            )
        else:
            failed = [k for k, v in (e.get("checks") or {}).items() if not v.get("pass")]
            items.append(
                VerdictItem(
                    "Endpoints",
                    "PASS (" + ", ".join(e.get("checks", {})) + ")" if e["pass"] else "FAIL: " + ", ".join(failed),
                    "" if e["pass"] else "bad",
                )
            )
    flags = row_flags(row)
    if row.get("guard") and not row["guard"].get("met"):
        flags.insert(0, "it failed the accuracy guard on val and ships only because the recipe names it")
    items.append(
        VerdictItem(
            "Flags",
            "; ".join(flags) + " (test split; the guard judged val)."
            if flags
            else "none: no test-split delta beyond the guard's limits and no paired CI against fp32 that excludes 0.",
            "bad" if flags else "",
        )
    )
    passed = _passed_over(report, chosen, rows)
    if passed:
        items.append(VerdictItem("Passed over", " ".join(passed)))
    return Verdict(banner, banner_level, items)


# ------------------------------------------------------------------------------------- shared sections
@dataclass
class ReportTable:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class ReportSection:
    """One section of the report: an anchor id, a title, paragraphs and tables (plots are added by report.html)."""

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "-"}[passed]


def _label(row: dict[str, Any]) -> list[str]:
    return [row["name"], row["runtime"]]


def fake_quant(row: dict[str, Any]) -> bool:
    """A torch row of a quantized artifact: fake-quantized simulation, never deployed, slow by construction."""
    return row.get("runtime") == "torch" and "int8" in str(row.get("name", ""))


def pareto_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of the artifact rows marked ``pareto`` (fastest p50 for its AUC), by the bench's own rule, ranked among
    the rows that could ship: torch fake-quant rows and rows that failed the accuracy guard are not ranked (None)."""
    from tlcompile.runtime.bench import mark_pareto

    rows = [dict(r) for r in report.get("artifacts", [])]
    ranked = [r for r in rows if not fake_quant(r) and guard_cell(r) != GUARD_FAILED]
    mark_pareto(ranked)
    for r in rows:
        r.setdefault("pareto", None)
    return rows


def _summary_section(report: dict[str, Any]) -> ReportSection:
    op = report.get("operating_point", {})
    ev = report.get("evaluation", {})
    rows = pareto_rows(report)
    text = [
        f"Task **{report.get('task')}** ({', '.join(report.get('class_names', []))}); test split of "
        f"{_first_clinical(report).get('n', '-')} images. Every artifact is judged at one referral threshold, "
        f"{num(op.get('threshold'))} ({_operating_point_words(op)}), locked on the {op.get('locked_on', 'val')} split "
        f"with the {op.get('model', 'fp32')} model.",
    ]
    if ev:
        text.append(
            f"Intervals are {int(100 * ev.get('ci_level', 0.95))}% CIs: AUC by stratified bootstrap "
            f"({ev.get('bootstrap_resamples')} resamples), proportions by the Wilson score interval; "
            "deltas are paired against the fp32 row of the same runtime."
        )
    text.append(
        f"Deltas are new - fp32 in percentage points ({PP}), with paired 95% CIs. Guard: {GUARD_MET} / {GUARD_FAILED} "
        f"on val, {GUARD_REFERENCE} for the model judged against. Pareto: {PARETO_MARK} when no other deployable "
        "row is both faster (p50) and at least as accurate (AUC); torch fake-quant rows and rows that failed the "
        "guard are not ranked. Flags: what the test split shows that the val guard did not."
    )
    header = [
        "artifact",
        "runtime",
        "p50 ms",
        "AUC (95% CI)",
        "sensitivity (95% CI)",
        "specificity (95% CI)",
        f"Δsensitivity vs fp32 {PP} (95% CI)",
        "decisions changed",
        "guard (val)",
        "endpoints",
        "Pareto",
        "flags (test)",
    ]
    table_rows = []
    for row in rows:
        c = row.get("clinical", {})
        ref = c.get("vs_reference")
        table_rows.append(
            [
                *_label(row),
                num(row.get("latency_ms", {}).get("p50"), ".2f"),
                with_ci(c.get("auc"), percent=False) if c else num(row.get("metrics", {}).get("auc")),
                with_ci(c.get("sensitivity"), percent=True),
                with_ci(c.get("specificity"), percent=True),
                delta_pp(ref.get("delta_sensitivity")) if ref else GUARD_REFERENCE,
                pct(ref["disagreement"]["value"]) if ref else GUARD_REFERENCE,
                guard_cell(row),
                _verdict(c.get("endpoints", {}).get("pass")),
                pareto_cell(row),
                "; ".join(row_flags(row)) or "-",
            ]
        )
    return ReportSection("summary", "Summary", text, [ReportTable(header, table_rows)])


def _first_clinical(report: dict[str, Any]) -> dict[str, Any]:
    return next((r["clinical"] for r in report.get("artifacts", []) if r.get("clinical")), {})


def _operating_point_words(op: dict[str, Any]) -> str:
    if op.get("method") == "sensitivity":
        return f"highest threshold reaching validation sensitivity {num(op.get('target_sensitivity'), '.2f')}"
    return f"{op.get('method', '-')}"


def _operating_point_section(report: dict[str, Any]) -> ReportSection:
    op = report.get("operating_point", {})
    val = op.get("val", {})
    text = [
        f"Method: {_operating_point_words(op)}. The threshold applies to P(referable DR) = softmax(logits / T) summed "
        "over the referable classes; T is the temperature below (1 = no temperature scaling)."
    ]
    rows = [
        ["threshold", num(op.get("threshold"), ".4f")],
        ["method", str(op.get("method", "-"))],
        ["target sensitivity", num(op.get("target_sensitivity"), ".3f")],
        ["temperature T", num(op.get("temperature"), ".3f")],
        ["locked on", f"{op.get('locked_on', '-')} split, {op.get('model', '-')} model"],
    ]
    if val:
        rows += [
            ["val images (referable)", f"{val.get('n', '-')} ({val.get('referable', '-')})"],
            ["val AUC", num(val.get("auc"))],
            ["val sensitivity at threshold", pct(val.get("sensitivity"))],
            ["val specificity at threshold", pct(val.get("specificity"))],
            ["val NLL before / after T", f"{num(val.get('nll_before'), '.4f')} / {num(val.get('nll_after'), '.4f')}"],
        ]
    return ReportSection("operating-point", "Operating point", text, [ReportTable(["setting", "value"], rows)])


def _screening_section(report: dict[str, Any]) -> ReportSection:
    header = ["artifact", "runtime", "sensitivity", "specificity", "PPV", "NPV", "TP", "FN", "FP", "TN"]
    rows = []
    for row in report.get("artifacts", []):
        c = row.get("clinical")
        if not c:
            continue
        (tn, fp), (fn, tp) = c["referral_confusion"]
        rows.append(
            [
                *_label(row),
                *(
                    with_ci(c[k], percent=True) + f" [{c[k]['k']}/{c[k]['n']}]"
                    for k in ("sensitivity", "specificity", "ppv", "npv")
                ),
                str(tp),
                str(fn),
                str(fp),
                str(tn),
            ]
        )
    text = [
        "Referable DR on the test split at the locked threshold; 95% Wilson CIs, [cases/denominator]. "
        "The ROC curves mark each artifact's operating point."
    ]
    return ReportSection(
        "screening", "Screening performance at the operating point", text, [ReportTable(header, rows)] if rows else []
    )


def _compression_section(report: dict[str, Any]) -> ReportSection:
    header = [
        "artifact",
        "runtime",
        "against",
        f"ΔAUC {PP} (95% CI)",
        f"Δsensitivity {PP} (95% CI)",
        f"Δspecificity {PP} (95% CI)",
        "referral changes (95% CI)",
        "newly referred",
        "no longer referred",
        "referable newly missed",
    ]
    rows = []
    for row in report.get("artifacts", []):
        ref = row.get("clinical", {}).get("vs_reference")
        if not ref:
            continue
        rows.append(
            [
                *_label(row),
                str(ref.get("reference", "fp32")),
                delta_pp(ref["delta_auc"]),
                delta_pp(ref["delta_sensitivity"]),
                delta_pp(ref["delta_specificity"]),
                with_ci(ref["disagreement"], percent=True),
                str(ref["newly_referred"]),
                str(ref["no_longer_referred"]),
                str(ref["missed_referable"]),
            ]
        )
    text = [
        "Each compressed artifact against the fp32 model on the same runtime and the same test images: deltas are new "
        f"- fp32 in percentage points ({PP}; an AUC of 0.01 is 1 point) with paired bootstrap 95% CIs (both scored on "
        "the same resamples), and the share of images whose referral decision changes."
    ]
    tables = [ReportTable(header, rows)] if rows else []
    guard = guard_table(report)
    if guard:
        tables.append(guard)
        steps = guard_steps_table(report)
        if steps:
            tables.append(steps)
        text.append(
            "The accuracy guard is judged on the validation split at the locked operating point: each compression step "
            "against the model it started from (a pruned-int8 model answers for its pruning and its quantization). "
            "An artifact meets the guard only when every check does; the bundle never ships one that does not."
        )
    flagged = [[*_label(r), flag] for r in report.get("artifacts", []) for flag in row_flags(r)]
    if flagged:
        text.append(
            "Flagged: on the test split, drops beyond the guard's own limits or paired CIs that exclude 0, whatever "
            "the guard (judged on val) said. Selection stays on val; read the test figures with this in mind."
        )
        tables.append(ReportTable(["artifact", "runtime", "flag (test split)"], flagged, "Flags"))
    if not rows:
        text.append(
            "This build has only the fp32 model, so there is nothing to compare; add prune / quantize to the recipe."
        )
    return ReportSection("compression", "What compression cost", text, tables)


def _guard_item(item: dict[str, Any] | None) -> str:
    """``0.962 (-0.2 pp, limit -1.0 pp) met`` for one guarded metric: the delta is new - reference."""
    if not item or item.get("value") is None:
        return "-"
    text = f"{item['value']:.3f} ({pp(-item['drop'])}" if item.get("drop") is not None else f"{item['value']:.3f} (-"
    if item.get("max_drop") is None:
        return text + ", no limit)"
    return text + f", limit {pp(-item['max_drop'])}) " + (GUARD_MET if item.get("met") else GUARD_FAILED)


def _guarded_artifacts(report: dict[str, Any]):
    """(row, guard) once per compressed artifact (its rows on every runtime share one guard record)."""
    seen = set()
    for row in report.get("artifacts", []):
        if row.get("guard") and row["name"] not in seen:
            seen.add(row["name"])
            yield row, row["guard"]


def guard_table(report: dict[str, Any]) -> ReportTable | None:
    """The accuracy guard of every compressed artifact (once per artifact, one line per check), or None."""
    header = [
        "artifact",
        "check",
        "val AUC",
        "val sensitivity",
        "val specificity",
        "val accuracy",
        "guard",
        "val cases",
    ]
    rows = []
    for row, g in _guarded_artifacts(report):
        for i, check in enumerate(g.get("checks", [])):
            rows.append(
                [
                    row["name"] if i == 0 else "",
                    f"vs {check.get('against', '-')}",
                    *(_guard_item(check.get(m)) for m in ("auc", "sensitivity", "specificity", "accuracy")),
                    (GUARD_MET if check.get("met") else GUARD_FAILED),
                    evidence_text(check["evidence"]) if check.get("evidence") else "-",
                ]
            )
    if not rows:
        return None
    return ReportTable(header, rows, "Accuracy guard (validation split, locked operating point)")


def guard_steps_table(report: dict[str, Any]) -> ReportTable | None:
    """What was done, in order, before each artifact's guard verdict (one row per step), or None when nothing was."""
    rows = []
    for row, g in _guarded_artifacts(report):
        verdict_word = GUARD_MET if g.get("met") else GUARD_FAILED
        for i, action in enumerate(g.get("actions", []), start=1):
            rows.append([row["name"], str(i), action, verdict_word if i == len(g["actions"]) else ""])
    if not rows:
        return None
    return ReportTable(
        ["artifact", "step", "what was done", "verdict after"],
        rows,
        "Accuracy guard: the steps taken, in order, before the verdict above",
    )


def _confusion_section(report: dict[str, Any]) -> ReportSection:
    tables = []
    grades = report.get("class_names", [])
    for row in report.get("artifacts", []):
        c = row.get("clinical")
        if not c:
            continue
        (tn, fp), (fn, tp) = c["referral_confusion"]
        caption = f"{row['name']} on {row['runtime']}"
        if c.get("grading"):
            matrix = c["grading"]["confusion"]
            tables.append(
                ReportTable(
                    ["truth \\ predicted", *grades],
                    [[g, *map(str, counts)] for g, counts in zip(grades, matrix, strict=True)],
                    caption=f"{caption}: DR grade",
                )
            )
        tables.append(
            ReportTable(
                ["truth \\ decision", "not referred", "referred"],
                [["non-referable", str(tn), str(fp)], ["referable", str(fn), str(tp)]],
                caption=f"{caption}: referral",
            )
        )
    text = [
        "Rows are the truth, columns the model's decision"
        + (
            " (argmax grade, and referral at the threshold)."
            if _first_clinical(report).get("grading")
            else " at the threshold."
        )
    ]
    return ReportSection("confusion", "Confusion matrices", text, tables)


def _grading_section(report: dict[str, Any]) -> ReportSection | None:
    rows = []
    for row in report.get("artifacts", []):
        g = row.get("clinical", {}).get("grading")
        if g:
            rows.append([*_label(row), with_ci(g["qwk"], percent=False), pct(g.get("accuracy"))])
    if not rows:
        return None
    return ReportSection(
        "grading",
        "Five-grade agreement",
        ["Quadratic weighted kappa of the argmax grade (stratified bootstrap 95% CI)."],
        [ReportTable(["artifact", "runtime", "quadratic weighted kappa (95% CI)", "grade accuracy"], rows)],
    )


def _calibration_section(report: dict[str, Any]) -> ReportSection:
    op = report.get("operating_point", {})
    scaled = (op.get("temperature") or 1.0) != 1.0
    header = ["artifact", "runtime", "ECE", "Brier"] + (["ECE before T", "Brier before T"] if scaled else [])
    rows = []
    for row in report.get("artifacts", []):
        c = row.get("clinical")
        if not c:
            continue
        cells = [*_label(row), num(c["calibration"]["ece"], ".4f"), num(c["calibration"]["brier"], ".4f")]
        if scaled:
            un = c.get("calibration_unscaled", {})
            cells += [num(un.get("ece"), ".4f"), num(un.get("brier"), ".4f")]
        rows.append(cells)
    text = [
        "Calibration of P(referable DR) on the test split: expected calibration error over "
        f"{report.get('evaluation', {}).get('calibration_bins', 10)} equal-width bins, and the Brier score; lower is "
        "better."
    ]
    text.append(
        f"Temperature scaling is on: T = {num(op.get('temperature'))}, fitted on the fp32 model's validation logits "
        "and used for every artifact."
        if scaled
        else "Temperature scaling is off (evaluate.temperature_scaling)."
    )
    return ReportSection("calibration", "Calibration", text, [ReportTable(header, rows)] if rows else [])


def _endpoints_section(report: dict[str, Any]) -> ReportSection:
    endpoints = report.get("evaluation", {}).get("endpoints", {})
    targets = {k: v for k, v in endpoints.items() if k != "rule" and v is not None}
    if not targets:
        return ReportSection(
            "endpoints",
            "Endpoints",
            [
                "The recipe sets no endpoints (evaluate.endpoints.min_sensitivity, "
                "min_specificity, min_auc), so nothing is judged pass/fail."
            ],
        )
    rule = endpoints.get("rule", "point_estimate")
    header = ["artifact", "runtime", *(f"{k} {v}" for k, v in targets.items()), "all"]
    rows = []
    for row in report.get("artifacts", []):
        e = row.get("clinical", {}).get("endpoints")
        if not e:
            continue
        cells = [*_label(row)]
        for key in targets:
            check = e["checks"].get(key, {})
            shown = check.get("value") if rule == "point_estimate" else check.get("ci_low")
            cells.append(f"{_verdict(check.get('pass'))} ({num(shown)})")
        rows.append([*cells, _verdict(e.get("pass"))])
    judged = "the measured value" if rule == "point_estimate" else "the lower 95% confidence bound"
    return ReportSection(
        "endpoints",
        "Endpoints",
        [f"Each endpoint is judged on {judged} (rule {rule}), shown in brackets."],
        [ReportTable(header, rows)],
    )


def _artifacts_section(report: dict[str, Any]) -> ReportSection:
    rows = report.get("artifacts", [])
    bench = (report.get("recipe") or {}).get("bench") or {}
    cut = [r for r in rows if r.get("latency_iterations", 50) < bench.get("iterations", 50)]
    notes = (
        [
            f"Timing stopped early (bench.max_seconds {num(bench.get('max_seconds'), 'g')} s) for "
            + ", ".join(f"{r['name']} on {r['runtime']} ({r['latency_iterations']} calls)" for r in cut)
            + f", not {bench.get('iterations', 50)}: their p90 rests on fewer samples."
        ]
        if cut
        else []
    )
    return ReportSection(
        "artifacts",
        "Artifacts",
        [
            "Every artifact on every runtime: latency at batch 1, size, MACs and parity with "
            "the torch model it was exported from.",
            *notes,
        ],
        [ReportTable(list(ROW_COLUMNS), [artifact_cells(r) for r in rows])],
    )


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return num(value, ".4g")
    if isinstance(value, dict) and "mean" in value:
        return f"{num(value['mean'], '.4g')} ± {num(value.get('sd'), '.2g')}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value)


def records_table(records: Any) -> tuple[list[str], ReportTable | None]:
    """A table from a list of dicts (or a dict of dicts, or a dict holding such a list); loose scalars become lines.

    The transfer comparison's exact shape belongs to the transfer stage; this renders any reasonable one. A dict's
    ``columns`` list picks and orders the columns, and a ``<column>_sd`` key beside a column shows as ``mean ± sd``.
    """
    lines: list[str] = []
    columns: list[str] = []
    if isinstance(records, dict):
        listed = next(
            (k for k, v in records.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)), None
        )
        if listed is not None:
            columns = [str(c) for c in records.get("columns") or [] if isinstance(c, str)]
            lines = [
                f"{k}: {_cell(v)}"
                for k, v in records.items()
                if k not in (listed, "columns") and v is not None and (not isinstance(v, (list, dict)) or k == "source")
            ]
            records = records[listed]
        elif records and all(isinstance(v, dict) for v in records.values()):
            records = [{"name": k, **v} for k, v in records.items()]
        else:
            return [f"{k}: {_cell(v)}" for k, v in records.items()], None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return [_cell(records)], None
    if not columns:
        for r in records:
            columns += [k for k in r if k not in columns and not k.endswith("_sd")]

    def cell(r: dict[str, Any], c: str) -> str:
        sd = r.get(f"{c}_sd")
        return _cell(r.get(c)) + (
            f" ± {num(sd, '.2g')}" if isinstance(sd, (int, float)) and r.get(c) is not None else ""
        )

    return lines, ReportTable(columns, [[cell(r, c) for c in columns] for r in records])


def _transfer_section(report: dict[str, Any]) -> ReportSection:
    transfer = report.get("transfer")
    if not transfer:
        return ReportSection(
            "transfer",
            "Transfer comparison",
            [
                "This build compared no transfer strategies (the recipe has no transfer "
                "comparison), so there is no table."
            ],
        )
    lines, table = records_table(transfer)
    return ReportSection(
        "transfer",
        "Transfer comparison",
        ["Each variant trained and evaluated identically; the best on validation went on to compression.", *lines],
        [table] if table else [],
    )


def _data_section(report: dict[str, Any]) -> ReportSection | None:
    counts = report.get("data", {}).get("counts", {})
    if not counts:
        return None
    classes = report.get("class_names", [])
    return ReportSection(
        "data",
        "Data",
        [],
        [ReportTable(["split", *classes], [[s, *[str(c.get(k, 0)) for k in classes]] for s, c in counts.items()])],
    )


def _training_section(report: dict[str, Any]) -> ReportSection | None:
    training = report.get("training", {})
    if not training.get("history"):
        return None
    return ReportSection(
        "training",
        "Training",
        [
            f"Best epoch {training.get('best_epoch')} (val AUC {num(training.get('best_val_auc'))}), "
            f"{training.get('wall_s')} s"
            + (
                f" on {training['device']}, autocast {training.get('amp', 'none')}, channels_last "
                f"{'on' if training.get('channels_last') else 'off'}"
                + (", fast training kernels (TLCOMPILE_FAST_TRAINING=1)." if training.get("fast_training") else ".")
                if training.get("device")
                else "."
            )
        ],
        [
            ReportTable(
                ["epoch", "loss", "val AUC", "lr", "s"],
                [
                    [
                        str(h["epoch"]),
                        num(h["loss"], ".4f"),
                        num(h["val_auc"]),
                        num(h["lr"], ".2e"),
                        num(h["seconds"], ".1f"),
                    ]
                    for h in training["history"]
                ],
            )
        ],
    )


def _stages_section(report: dict[str, Any]) -> ReportSection:
    seconds = report.get("stage_seconds", {})
    total = sum(seconds.values()) or 1.0
    rows = [[k, num(v, ".1f"), pct(v / total)] for k, v in seconds.items()]
    return ReportSection(
        "stages",
        "Time per stage",
        [f"Wall-clock seconds of each build stage; {num(sum(seconds.values()), '.1f')} s in all."],
        [ReportTable(["stage", "seconds", "share"], rows)] if rows else [],
    )


def _environment_section(report: dict[str, Any]) -> ReportSection:
    env = report.get("environment", {})
    cpu = env.get("cpu", {})
    rows = [
        [k, str(env[k])] for k in ("tlcompile", "python", "torch", "openvino", "onnxruntime", "platform") if k in env
    ]
    rows += [
        ["CPU", str(cpu.get("model", "-"))],
        ["cores (usable / logical)", f"{cpu.get('usable_cores', '-')} / {cpu.get('logical_cores', '-')}"],
        ["ISA", ", ".join(cpu.get("isa", [])) or "-"],
    ]
    rows += [["recipe sha256", str(report.get("recipe_sha256", "-"))], ["created", str(report.get("created", "-"))]]
    return ReportSection(
        "environment",
        "Environment",
        ["Where this build ran; latency depends on the CPU and its instruction sets."],
        [ReportTable(["item", "value"], rows)],
    )


def _explain_section(report: dict[str, Any]) -> ReportSection | None:
    """Heatmaps of the shipped model (body: report/explain.py)."""
    parts = explain_section(report)
    if parts is None:
        return None
    sid, title, paragraphs, tables = parts
    return ReportSection(sid, title, paragraphs, [ReportTable(h, rows, caption) for h, rows, caption in tables])


def _quality_section(report: dict[str, Any]) -> ReportSection | None:
    parts = quality_parts(report)  # the body lives in report/quality.py
    if parts is None:
        return None
    paragraphs, tables = parts
    return ReportSection(
        "quality",
        "Image quality (gradability)",
        paragraphs,
        [ReportTable(header, rows, caption) for caption, header, rows in tables],
    )


def report_sections(report: dict[str, Any]) -> list[ReportSection]:
    """The sections of report.md and report.html, in order; optional ones only when the report has their data."""
    sections = [
        _summary_section(report),
        _operating_point_section(report),
        _screening_section(report),
        _compression_section(report),
        _confusion_section(report),
        _grading_section(report),
        _calibration_section(report),
        _endpoints_section(report),
        _explain_section(report),
        _quality_section(report),
        _artifacts_section(report),
        _transfer_section(report),
        _data_section(report),
        _training_section(report),
        _stages_section(report),
        _environment_section(report),
    ]
    return [s for s in sections if s is not None]
