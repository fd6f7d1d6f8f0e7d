"""How the report writes numbers and verdict words: one place for report.md, report.html and the terminal table.

Pure text formatting of values read from report.json. The number-or-dash formatter itself, :func:`num`, lives in
:mod:`tlcompile.runtime.terminal`, so that torch-free tables (the runtime's bench) and the training side use it too.
"""

from __future__ import annotations

from typing import Any

from tlcompile.runtime.terminal import MISSING, is_missing, num

# The glossary (README "Words used"): the same words in the CLI, report.md, report.html and the README.
GUARD_MET, GUARD_FAILED, GUARD_REFERENCE = "met", "failed", "reference"
PARETO_MARK = "front"  # the cell of a row on the accuracy-vs-latency Pareto front; "" when not, "-" when not ranked
PP = "pp"  # percentage points: every delta is new - fp32, in points (an AUC of 0.01 is 1 point)


def mb(n: int | None) -> str:
    """Bytes as megabytes (10^6): ``4.00``."""
    return MISSING if n is None else f"{n / 1e6:.2f}"


def pct(x: Any) -> str:
    """A proportion as a percentage: ``87.2%``."""
    return num(None if x is None else 100 * x, ".1f") + ("%" if x is not None else "")


def pp(x: float | None, *, signed: bool = True) -> str:
    """A proportion difference in percentage points: ``-3.3 pp`` (never ``-0.0``)."""
    if is_missing(x):
        return MISSING
    return format(100 * x + 0.0 if round(100 * x, 1) != 0 else 0.0, "+.1f" if signed else ".1f") + f" {PP}"


def delta_pp(measured: dict[str, Any] | None) -> str:
    """``-3.3 pp (-6.5 to -0.8)``: a paired delta (new - fp32) with its 95% CI, in percentage points."""
    if not measured or measured.get("value") is None:
        return MISSING
    ci = measured.get("ci")
    return pp(measured["value"]) + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def with_ci(measured: dict[str, Any] | None, *, percent: bool, signed: bool = False) -> str:
    """``87.2% (81.8–91.2)`` or ``0.912 (0.871–0.947)``; '-' when undefined."""
    if not measured or measured.get("value") is None:
        return MISSING
    sign = "+" if signed else ""

    def fmt(x: float) -> str:
        return format(100 * x, f"{sign}.1f") if percent else format(x, f"{sign}.3f")

    text = fmt(measured["value"]) + ("%" if percent else "")
    ci = measured.get("ci")
    # A signed interval reads "-0.021 to +0.004": a dash between two signed numbers would be ambiguous.
    return text + (f" ({fmt(ci[0])}{' to ' if signed else '–'}{fmt(ci[1])})" if ci else "")


def guard_cell(row: dict[str, Any]) -> str:
    """``met`` / ``failed`` for a compressed artifact (its accuracy guard on val), ``reference`` for the model it is
    judged against."""
    g = row.get("guard")
    if not g:
        return GUARD_REFERENCE if row.get("name") == "fp32" else MISSING
    return GUARD_MET if g.get("met") else GUARD_FAILED


def pareto_cell(row: dict[str, Any]) -> str:
    return {True: PARETO_MARK, False: "", None: MISSING}[row.get("pareto")]
