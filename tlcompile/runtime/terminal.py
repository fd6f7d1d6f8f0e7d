"""Terminal tables that never truncate: a name you must type or a number you compare is shown whole or not at all.

:class:`FitTable` is a rich renderable. At print time it drops the columns that are empty in every row ("" or "-"),
lays the rest out as a table when every column fits the terminal at its natural width (columns marked ``wrap`` may
wrap at spaces); if not, a compact table (no vertical rules, headers on two lines, and a column with the same value in
every row said once in the title: "threads 2"); if that does not fit either, a vertical layout: one block per row,
one ``column  value`` line per cell.
Only rich is imported, so the torch-free runtime commands can use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

MISSING = "-"  # what a cell shows for a value that is absent, None or NaN


def printable(text: str) -> str:
    """A file name or message for the terminal, a log or a CSV cell: bytes that are not UTF-8 (a file name's
    surrogate escapes) and characters that are not printable (control characters such as ESC and line breaks,
    bidirectional overrides) escaped, so a name can neither crash the write, nor forge lines, nor recolour or reorder
    what the terminal shows."""
    decoded = os.fsencode(text).decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else _escaped(c) for c in decoded)


def _escaped(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"


def is_missing(x: Any) -> bool:
    """None or NaN: a value a table shows as :data:`MISSING`."""
    return x is None or (isinstance(x, float) and x != x)


def num(x: Any, fmt: str = ".3f", *, sd: Any = None) -> str:
    """``format(x, fmt)``, or ``-`` for None and NaN; with an ``sd`` (not None or NaN), `` ± sd`` in ``fmt`` too.

    The one number-or-dash formatter: ``num(0.91234)`` -> ``0.912``, ``num(None)`` -> ``-``,
    ``num(2.5, ".1f", sd=0.25)`` -> ``2.5 ± 0.2``.
    """
    if is_missing(x):
        return MISSING
    return format(x, fmt) + ("" if is_missing(sd) else f" ± {format(sd, fmt)}")


EMPTY = ("", "-")


@dataclass
class FitTable:
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str | None = None
    right: set[str] = field(default_factory=set)  # right-aligned (numbers)
    wrap: set[str] = field(default_factory=set)  # free text that may wrap at spaces (descriptions, notes)
    key: int = 1  # leading columns that name a row: the heading of its block in the vertical layout
    keep: set[str] = field(default_factory=set)  # shown even when empty

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def shown_columns(self) -> list[int]:
        """Indices of the columns with something in at least one row (all of them when there are no rows)."""
        if not self.rows:
            return list(range(len(self.columns)))
        return [
            i
            for i, c in enumerate(self.columns)
            if c in self.keep or i < self.key or any(r[i].strip() not in EMPTY for r in self.rows)
        ]

    def constant_columns(self) -> list[int]:
        """Non-key columns holding the same non-empty value in every row (two rows or more)."""
        if len(self.rows) < 2:
            return []
        return [
            i
            for i in self.shown_columns()
            if i >= self.key
            and self.columns[i] not in self.wrap
            and self.rows[0][i].strip() not in EMPTY
            and all(r[i] == self.rows[0][i] for r in self.rows)
        ]

    def _plan(self, compact: bool) -> tuple[str | None, list[int], list[str], dict]:
        """Title, column indices, headers and Table settings of the full or the compact layout."""
        cols = self.shown_columns()
        title = self.title
        if compact:
            constant = self.constant_columns()
            if constant:
                said = ", ".join(f"{self.columns[i]} {self.rows[0][i]}" for i in constant)
                title = f"{title} ({said})" if title else said
            cols = [i for i in cols if i not in constant]
            settings = {
                "box": box.SIMPLE_HEAD,
                "padding": (0, 1),
                "collapse_padding": True,
                "show_edge": False,
                "pad_edge": False,
            }
        else:
            settings = {"show_edge": False, "pad_edge": False}
        headers = [
            self.columns[i].replace(" ", "\n") if compact and self.columns[i] not in self.wrap else self.columns[i]
            for i in cols
        ]
        return title, cols, headers, settings

    def table(self, compact: bool = False) -> Table:
        title, cols, headers, settings = self._plan(compact)
        table = Table(title=title, **settings)
        for i, header in zip(cols, headers, strict=True):
            name = self.columns[i]
            table.add_column(
                header,
                justify="right" if name in self.right else "left",
                no_wrap=name not in self.wrap,
                overflow="fold",
            )
        for r in self.rows:
            table.add_row(*(r[i] for i in cols))
        return table

    def required_width(self, console: Console, compact: bool = False) -> int:
        """The narrowest width that shows every cell whole: a no-wrap column needs its longest line (header included),
        a wrap column its longest word. rich's own minimum counts words even in no-wrap columns, so it is measured on
        a probe table of one single-word row with those widths and the same borders and padding."""
        _, cols, headers, settings = self._plan(compact)
        probe = Table(**settings)
        cells = []
        for i, header in zip(cols, headers, strict=True):
            texts = [header, *(r[i] for r in self.rows)]
            if self.columns[i] in self.wrap:
                need = max((cell_len(w) for t in texts for w in t.split()), default=1)
            else:
                need = max((cell_len(line) for t in texts for line in t.split("\n")), default=1)
            probe.add_column("", no_wrap=True)
            cells.append("x" * max(need, 1))
        probe.add_row(*cells)
        return Measurement.get(console, console.options.update_width(100_000), probe).maximum

    def vertical(self) -> Iterable[Text | Table]:
        """One block per row: its key cells as a heading, then a ``column  value`` grid (values wrap, never cut)."""
        constant = self.constant_columns()
        cols = [i for i in self.shown_columns() if i not in constant]
        keys, rest = [i for i in cols if i < self.key], [i for i in cols if i >= self.key]
        said = ", ".join(f"{self.columns[i]} {self.rows[0][i]}" for i in constant)
        if self.title or said:
            yield Text(" ".join(x for x in (self.title, f"({said})" if said else "") if x), style="italic")
        for r in self.rows:
            yield Text(" ".join(r[i] for i in keys) or "-", style="bold", overflow="fold")
            grid = Table.grid(padding=(0, 2))
            grid.add_column(no_wrap=True)
            grid.add_column(overflow="fold")
            for i in rest:
                if r[i].strip() in EMPTY and self.columns[i] not in self.keep:
                    continue
                grid.add_row("  " + self.columns[i], r[i])
            yield grid

    def layout(self, console: Console, width: int) -> str:
        """ "table", "compact" or "vertical": the first that shows every cell whole in ``width`` columns."""
        if self.required_width(console) <= width:
            return "table"
        if self.required_width(console, compact=True) <= width:
            return "compact"
        return "vertical"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        layout = self.layout(console, options.max_width)
        if layout == "vertical":
            yield from self.vertical()
        else:
            yield self.table(compact=layout == "compact")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table())


def fit_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    title: str | None = None,
    right: Iterable[str] = (),
    wrap: Iterable[str] = (),
    key: int = 1,
) -> FitTable:
    t = FitTable(list(columns), title=title, right=set(right), wrap=set(wrap), key=key)
    for r in rows:
        t.add_row(*r)
    return t
