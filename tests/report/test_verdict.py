"""The verdict box and the intended-use banner at the top of report.html / report.md, and the honest flags."""

from __future__ import annotations

import re

import pytest

from tlcompile.report.html import render_html
from tlcompile.report.render import render_markdown
from tlcompile.report.sections import row_flags, verdict


@pytest.fixture(autouse=True)
def _text_only(no_plots):
    """The banner, the verdict box and the flags are text: no plots (no_plots, tests/conftest.py)."""


def _with_bundle(report: dict, chosen: str = "int8@openvino", measured: dict | None = None) -> dict:
    """A report.json ``bundle`` record of the shape the bundle stage writes (several candidates, the build's choice)."""
    name, _, runtime = chosen.partition("@")
    cands = [
        {
            "id": f"{r['name']}@{r['runtime']}",
            "name": r["name"],
            "runtime": r["runtime"],
            "p90_ms": r["latency_ms"]["p90"],
            "auc": r["metrics"]["auc"],
            "guard_met": (r.get("guard") or {}).get("met"),
            "endpoints_pass": None,
            "eligible": True,
            "why_not": None,
            "in_bundle": True,
        }
        for r in report["artifacts"]
    ]
    report["bundle"] = {
        "path": "bundle",
        "artifact": name,
        "runtime": runtime,
        "precision": "i8",
        "default_candidate": chosen,
        "candidates": [c["id"] for c in cands],
        "selection": {
            "rule": "fastest",
            "chosen_id": chosen,
            "chosen": name,
            "why": "the fastest p90",
            "candidates": cands,
            "measured_on_build_box": measured or {},
            "noise": None,
            "load_average": [1.5, 1.4, 1.3],
        },
    }
    report["recipe"] = {
        "data": {"source": "synthetic", "num_images": 400},
        "bundle": {"intended_use": "Aid to DR screening."},
    }
    return report


def _verdict_block(page: str) -> str:
    m = re.search(r'<section id="verdict" class="verdict">(.*?)</section>', page, re.S)
    assert m, "report.html has no verdict box"
    return m.group(1)


def test_html_opens_on_the_banner_and_the_verdict(synthetic_report):
    report = _with_bundle(synthetic_report())
    page = render_html(report)
    body = page.split("<body>", 1)[1]
    # Both come before the contents and the first section: above the fold.
    banner_at, verdict_at = body.find('id="intended-use"'), body.find('id="verdict"')
    assert 0 <= banner_at < verdict_at < body.find("<nav>") < body.find('<section id="summary">')
    banner = re.search(r'<div class="banner (\w+)"[^>]*>(.*?)</div>', body, re.S)
    assert (
        banner
        and banner.group(1) == "bad"
        and "NOT for clinical use" in banner.group(2)
        and "Aid to DR screening." in banner.group(2)
    )
    box = _verdict_block(page)
    assert "<strong>int8</strong> on <strong>OpenVINO</strong>" in box and "int8@openvino" in box
    assert "Test split" in box and "sensitivity" in box and "specificity" in box
    md = render_markdown(report)
    assert md.index("NOT for clinical use") < md.index("## Verdict") < md.index("## Summary")
    # Real data: no synthetic warning, but the intended use and where the data came from.
    report["recipe"]["data"] = {"source": "aptos", "root": "/data/aptos"}
    page = render_html(report)
    assert "NOT for clinical use" not in page and "Aid to DR screening." in page and "/data/aptos" in page


def test_a_test_drop_beyond_the_guard_limit_is_flagged_on_the_row_and_in_the_verdict(synthetic_report):
    report = _with_bundle(synthetic_report())
    clean = render_html(report)
    assert "none: no test-split delta" in _verdict_block(clean)
    for row in report["artifacts"]:
        if row["name"] == "int8":
            row["test_flags"] = [
                {"metric": "sensitivity", "reference": "fp32", "drop": 0.033, "max_drop": 0.02, "text": "x"}
            ]
    page, md = render_html(report).replace("<wbr>", ""), render_markdown(report)
    box = _verdict_block(page)
    assert (
        '<dt class="bad">Flags</dt>' in box
        and "test sensitivity -3.3 pp vs fp32, beyond the guard&#x27;s limit of -2.0 pp" in box
    )
    assert "(test split; the guard judged val)" in box
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in summary.splitlines() if x.startswith("| int8 | openvino |"))
    assert "test sensitivity -3.3 pp vs fp32" in line.split("|")[-2]
    assert '<td class="flag">test sensitivity -3.3 pp vs fp32' in page


def test_a_paired_ci_that_excludes_zero_is_flagged(synthetic_report):
    report = _with_bundle(synthetic_report())
    row = next(r for r in report["artifacts"] if (r["name"], r["runtime"]) == ("int8", "openvino"))
    row["clinical"]["vs_reference"]["delta_sensitivity"] = {"value": -0.033, "ci": [-0.065, -0.008]}
    row["clinical"]["vs_reference"]["missed_referable"] = 4
    flags = row_flags(row)
    assert "test sensitivity: 95% CI of -3.3 pp (-6.5 to -0.8) vs fp32 excludes 0 (worse)" in flags
    assert any("4 referable test eye(s) newly missed" in f for f in flags)
    item = next(i for i in verdict(report).items if i.label == "Flags")
    assert item.level == "bad" and "excludes 0" in item.text
    # A CI that touches 0 is not a flag.
    row["clinical"]["vs_reference"]["delta_sensitivity"] = {"value": -0.01, "ci": [-0.03, 0.0]}
    assert not any("sensitivity" in f for f in row_flags(row))


def test_int8_that_is_not_faster_says_so_with_the_isa(synthetic_report):
    # conftest: int8 1.5 ms vs fp32 4.0 ms on OpenVINO (faster), 7.0 vs 6.0 ms on ONNX Runtime (slower).
    report = _with_bundle(synthetic_report())
    report["environment"]["cpu"]["isa"] = ["AVX2"]
    item = next(i for i in verdict(report).items if i.label == "int8")
    assert "int8 is slower than fp32 on ONNX Runtime on this CPU (p50 7.00 vs 6.00 ms; AVX2; no VNNI)" in item.text
    assert "OpenVINO" not in item.text
    for row in report["artifacts"]:
        if row["name"] == "int8":
            row["latency_ms"]["p50"] = 1.0
    assert not any(i.label == "int8" for i in verdict(report).items)


def test_a_latency_difference_within_the_noise_is_a_tie(synthetic_report):
    measured = {
        "int8@openvino": {"p50_ms": 1.5, "p90_ms": 2.0, "p90_spread_ms": 0.5, "p50_spread_ms": 0.1, "rounds": 5},
        "fp32@openvino": {"p50_ms": 1.7, "p90_ms": 2.3, "p90_spread_ms": 0.4, "p50_spread_ms": 0.1, "rounds": 5},
        "fp32@onnxruntime": {"p50_ms": 5.0, "p90_ms": 6.0, "p90_spread_ms": 0.2, "p50_spread_ms": 0.1, "rounds": 5},
    }
    report = _with_bundle(synthetic_report(), measured=measured)
    items = {i.label: i for i in verdict(report).items}
    assert (
        "p50 1.50 ms, p90 2.00 ms" in items["Speed on the build box"].text
        and "spread over 5 rounds 0.50 ms" in items["Speed on the build box"].text
    )
    passed = items["Passed over"].text
    assert "A tie with the shipped one (p90 within the measured noise): fp32@openvino (2.30 ms)" in passed
    assert "Slower p90 on the build box: " in passed and "fp32@onnxruntime (6.00 ms)" in passed


def test_a_guard_failure_is_passed_over_in_plain_words(synthetic_report):
    report = _with_bundle(synthetic_report(guard_met=False), chosen="fp32@openvino")
    passed = next(i for i in verdict(report).items if i.label == "Passed over").text
    assert (
        "int8 (OpenVINO, ONNX Runtime) failed the accuracy guard: val specificity -10.0 pp vs fp32 (limit -5.0 pp); "
        "2 recovery step(s) did not fix it (guard table); not shippable."
    ) in passed


@pytest.mark.parametrize("bundle", [None, {"skipped": "no OpenVINO or ONNX Runtime row"}])
def test_no_bundle_says_nothing_ships(synthetic_report, bundle):
    report = synthetic_report()
    if bundle is not None:
        report["bundle"] = bundle
    box = _verdict_block(render_html(report))
    assert '<dt class="bad">Ships</dt><dd class="bad">nothing: no bundle' in box


def test_pareto_ranks_only_rows_that_could_ship(synthetic_report):
    import copy

    from tlcompile.report.sections import pareto_rows

    report = synthetic_report(guard_met=False)
    fake = copy.deepcopy(next(r for r in report["artifacts"] if r["name"] == "int8"))
    fake.update(runtime="torch", format="torch", latency_ms={"p50": 0.01, "p90": 0.02})
    fake["metrics"]["auc"] = 0.999  # fastest and best: it would dominate everything if it were ranked
    report["artifacts"].append(fake)
    rows = {(r["name"], r["runtime"]): r for r in pareto_rows(report)}
    assert rows[("int8", "torch")]["pareto"] is None  # fake-quant simulation: never deployed
    assert rows[("int8", "openvino")]["pareto"] is None  # failed the guard: not ranked
    assert rows[("fp32", "openvino")]["pareto"] is True  # the fastest row left that could ship
    md = render_markdown(report)
    assert "| int8 | torch |" in md  # still reported, only not ranked


def test_a_drop_just_beyond_the_limit_does_not_read_as_equal_to_it(synthetic_report):
    report = synthetic_report()
    row = next(r for r in report["artifacts"] if (r["name"], r["runtime"]) == ("int8", "onnxruntime"))
    row["test_flags"] = [{"metric": "sensitivity", "reference": "fp32", "drop": 0.0204, "max_drop": 0.02, "text": "x"}]
    assert "test sensitivity -2.04 pp vs fp32, beyond the guard's limit of -2.00 pp" in row_flags(row)[0]
    # One item per metric: the limit and the CI of the same metric go together.
    row["clinical"]["vs_reference"]["delta_sensitivity"] = {"value": -0.0204, "ci": [-0.05, -0.001]}
    flags = row_flags(row)
    assert sum("sensitivity" in f for f in flags) == 1 and "excludes 0 (worse)" in flags[0]
