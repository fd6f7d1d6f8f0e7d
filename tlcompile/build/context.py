"""What every build stage shares: the :class:`BuildContext`, the :class:`Artifact` a stage hands on, the
:class:`Stage` declaration, the per-stage :class:`StageRun` the loop prepares, and the progress bar."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tlcompile.data.datamodule import DataModule
from tlcompile.io import atomic_write_json
from tlcompile.recipe import Recipe
from tlcompile.tracking import Tracker


@dataclass
class Artifact:
    """One model that came out of a stage: the torch module plus the files exported from it."""

    name: str  # fp32 | pruned | int8 | pruned-int8
    module: torch.nn.Module
    precision: str  # fp32 | int8
    lineage: str  # e.g. "fp32 <- pruned-0.5 <- qat-int8"
    files: dict[str, Path] = field(default_factory=dict)  # format -> file
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> parity record
    # Compressed artifacts: "compression" (what was done) and "guard" (the accuracy guard on val); both go into the
    # artifact's bench rows as they are.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRun:
    """What the loop hands the stage that is running (``ctx.stage``) and what it takes back.

    ``done`` is the stage's saved record when --resume may reuse it (same recipe sections), else None. A stage that
    did its work sets ``record``: the loop writes it to ``stage.json`` with the fingerprint, and only then deletes
    ``cleanup`` (files the record now stands for). ``record`` left None keeps the stage.json that is there."""

    folder: Path
    done: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    cleanup: list[Path] = field(default_factory=list)


StageFn = Callable[["BuildContext", list[Artifact]], list[Artifact]]


@dataclass(frozen=True)
class Stage:
    """One build stage, declared by its module (``tlcompile.build.stages.*``) and run by the loop in list order.

    ``run(ctx, artifacts) -> artifacts``: takes the artifacts so far and returns the full list after it (a stage that
    adds none returns them unchanged). Stages with a ``folder`` write only inside it (the loop creates it) and end
    with ``stage.json``; ``sections`` are the recipe sections the stage's output depends on: their fingerprint is what
    --resume compares. ``folder`` None: the stage writes build-wide outputs (report, bundle) and is never reused."""

    name: str  # timing key (report.stage_seconds) and console label
    folder: str | None
    sections: tuple[str, ...] | None  # None: the whole recipe
    run: StageFn
    wanted: Callable[[Recipe], bool] = lambda recipe: True
    preflight: Callable[[BuildContext], None] | None = None  # before anything is written: fail in seconds
    reusable: bool = True  # False: measured again on every build, also under --resume (bench)
    all_ranks: bool = False  # runs on every torchrun worker (training); the stages after it run on rank 0 only
    keeps_partial: bool = False  # an unfinished run leaves files it continues from (training's epoch checkpoints)


@dataclass
class BuildContext:
    recipe: Recipe
    out_dir: Path
    console: Console
    device: torch.device
    resume: bool = False
    stages: dict[str, Stage] = field(
        default_factory=dict
    )  # folder -> stage: whose sections a folder's fingerprint uses
    stage: StageRun | None = None  # the running stage's folder and resume record (set by the loop)
    data: DataModule | None = None
    threshold: float = 0.5
    operating_point: dict[str, Any] = field(default_factory=dict)  # threshold, method, temperature: locked on FP32 val
    stage_seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] | None = None  # report["transfer"]: the variant table, selection and source
    weight_source: Any = None  # models.pretrained.SourceWeights read by the train stage's preflight
    bench_rows: list[dict[str, Any]] = field(default_factory=list)
    quality: dict[str, Any] | None = None  # report["quality"]: the image-quality gate (build/stages/quality.py)
    report: dict[str, Any] = field(default_factory=dict)  # report.json, assembled after the bench
    bundle_error: Exception | None = None  # a bundle that could not be made: raised once the report is written
    tracker: Tracker = field(default_factory=Tracker)  # MLflow (recipe tracking.mlflow) or nothing; see tracking.py
    # (split, weights digest) -> logits of a plain torch model: build/tuning.py's split_logits
    logits_cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def stage_fingerprint(self, folder: str) -> str:
        """The fingerprint of the recipe sections the stage in ``folder`` reads: a change elsewhere (bench, bundle, a
        later stage's settings) keeps the stage reusable by --resume."""
        stage = self.stages.get(folder)
        return self.recipe.fingerprint(stage.sections if stage is not None else None)

    def stage_done(self, folder: str) -> dict[str, Any] | None:
        """The saved stage record when resuming and it belongs to this same recipe, else None."""
        record = read_stage_record(self.out_dir / folder) if self.resume else None
        return record if record is not None and record.get("fingerprint") == self.stage_fingerprint(folder) else None

    def finish_stage(self, folder: str, record: dict[str, Any], cleanup: list[Path] | tuple[Path, ...] = ()) -> None:
        """Write the stage's record, with the files it wrote (a resume removes those, and only those: a file someone
        put there is theirs, whatever its time)."""
        root = self.out_dir / folder
        gone = {Path(p) for p in cleanup}
        files = sorted(rel for rel, p in stage_files(root) if p.name != "stage.json" and p not in gone)
        atomic_write_json(
            root / "stage.json", {"fingerprint": self.stage_fingerprint(folder), **record, "files": files}
        )


def stage_files(folder: Path) -> list[tuple[str, Path]]:
    """(path relative to ``folder``, path) of every file and link in it, at any depth."""
    return [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def read_stage_record(folder: Path) -> dict[str, Any] | None:
    """``folder/stage.json`` as written by a finished stage, or None (missing, unreadable or not a record)."""
    marker = folder / "stage.json"
    try:
        record = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def progress(console: Console) -> Progress:
    """The build's progress bar: description, bar, steps done of total, elapsed, and a free ``info`` field."""
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
