"""``build(recipe, out_dir)``: run the stages of :data:`STAGES` in order and write the report.

The loop owns what every stage would otherwise repeat: it skips stages the recipe does not ask for, gives each its
numbered folder and its --resume record (``ctx.stage``), writes ``stage.json`` with the fingerprint of the recipe
sections the stage reads, times it, and stops torchrun workers once training is done. A stage only does its work:
``run(ctx, artifacts) -> artifacts`` (:class:`tlcompile.build.context.Stage`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from tlcompile.build.context import Artifact, BuildContext, Stage, StageRun, read_stage_record, stage_files
from tlcompile.build.outdir import claim_out_dir, prepare_out_dir
from tlcompile.build.stages import bench, bundle, data, explain, export, prune, quality, quantize, report, train
from tlcompile.data.datamodule import DataModule
from tlcompile.errors import TlcompileError
from tlcompile.io import atomic_write_json, atomic_write_text
from tlcompile.recipe import Recipe
from tlcompile.runtime.inference import default_threads
from tlcompile.tracking import tracker_for
from tlcompile.train import loop as train_loop

# The stages, in the order they run. A stage whose ``wanted(recipe)`` is false is skipped (prune, quantize, bundle).
STAGES: list[Stage] = [
    data.STAGE,
    train.STAGE,
    prune.STAGE,
    quantize.STAGE,
    export.STAGE,
    bench.STAGE,
    quality.STAGE,
    report.STAGE,
    bundle.STAGE,
    explain.STAGE,  # heatmaps of the bundle's model, through its deployed runtime
]
# Files of a build that are derived from every stage and rewritten at its end.
BUILD_OUTPUTS = ("report.json", "report.md", "report.html", "manifest.json")


@dataclass
class BuildResult:
    out_dir: Path
    report: dict[str, Any]


def planned_stages(recipe: Recipe) -> list[Stage]:
    """The stages this recipe's build runs, in order."""
    return [stage for stage in STAGES if stage.wanted(recipe)]


def build(
    recipe: Recipe,
    out_dir: Path,
    *,
    resume: bool = False,
    console: Console | None = None,
    tracking_parent: str | None = None,
) -> BuildResult:
    """Run the whole recipe into ``out_dir``; returns the report (also written as report.json/report.md).
    ``tracking_parent``: the MLflow run this build's run is a child of (a sweep's)."""
    console = console or Console()
    out_dir = Path(out_dir)
    from tlcompile.train import distributed

    run, device = distributed.setup(train_loop.resolve_device(recipe.train.device))
    if run.enabled and resume:
        raise TlcompileError(
            "--resume is not supported under torchrun yet; resume the build in a single process, or start it again"
        )
    if run.rank > 0:
        # Workers train their shard and write nothing into the build folder: rank 0 owns every file.
        import tempfile

        out_dir, console = Path(tempfile.mkdtemp(prefix=f"tlcompile-rank{run.rank}-")), Console(quiet=True)
    was_empty = prepare_out_dir(out_dir, resume=resume)
    # The cores of this node are shared by its own ranks (torchrun's LOCAL_WORLD_SIZE), not by every rank of every node.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", run.world_size)) if run.enabled else 1
    torch.set_num_threads(max(1, default_threads() // (local_world if device.type == "cpu" else 1)))
    stages = planned_stages(recipe)
    ctx = BuildContext(
        recipe=recipe,
        out_dir=out_dir,
        console=console,
        device=device,
        resume=resume,
        stages={s.folder: s for s in STAGES if s.folder},
    )
    if run.rank == 0:  # workers log nothing: rank 0 owns the run as it owns every file
        ctx.tracker = tracker_for(
            recipe, parent_run_id=tracking_parent, log=lambda line: console.print(line, markup=False)
        )
    import yaml

    for stage in stages:  # before anything is written: a bad source leaves --out empty
        if stage.preflight is not None:
            _timed(ctx, stage, lambda s=stage: s.preflight(ctx))
    claim_out_dir(out_dir)
    if resume and was_empty:  # a mistyped --out: say so now, not after a whole build from the start
        where = escape(str(out_dir))
        console.print(f"[bold]resume[/]: nothing to resume in {where} (a new or empty folder); building from the start")
    plan = plan_resume(ctx) if resume and not was_empty else None
    resolved = yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False)
    if plan is None:  # (a resume writes it once its data have passed, with the rest of the earlier build gone)
        atomic_write_text(out_dir / "recipe.resolved.yaml", resolved)
    artifacts: list[Artifact] = []
    workers_running = run.enabled
    ctx.tracker.start(recipe, out_dir)
    restore = _stop_on_signals(console, out_dir)
    try:
        for stage in stages:
            if workers_running and not stage.all_ranks:  # training is done: every rank syncs; the workers stop here
                distributed.barrier(run)
                distributed.teardown(run)
                workers_running = False
                if run.rank > 0:
                    shutil.rmtree(out_dir, ignore_errors=True)
                    return BuildResult(out_dir=out_dir, report={})
            if plan is not None and stage.folder is not None:  # the first stage's own folder, just before it runs
                plan.apply(ctx, [ctx.out_dir / stage.folder])
            artifacts = run_stage(ctx, stage, artifacts)
            if plan is not None and not plan.done:  # the data have passed: now the rest of the earlier build goes
                plan.apply(ctx)
                atomic_write_text(out_dir / "recipe.resolved.yaml", resolved)
        if plan is not None and not plan.done:  # (no stage ran)
            plan.apply(ctx)
            atomic_write_text(out_dir / "recipe.resolved.yaml", resolved)
        write_outputs(ctx)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):  # as SIGTERM and SIGHUP say it (see _stop_on_signals)
            where = escape(str(out_dir))
            console.print(
                f"[bold]build[/]: stopped (Ctrl-C); `tlcompile build RECIPE --out {where} --resume` continues it"
            )
        ctx.tracker.fail(err)
        raise
    finally:
        restore()
    ctx.tracker.finish(ctx.report, out_dir)
    if ctx.bundle_error is not None:
        raise ctx.bundle_error
    return BuildResult(out_dir=out_dir, report=ctx.report)


def _stop_on_signals(console: Console, out_dir: Path) -> Any:
    """Until the returned function is called: a termination signal (SIGTERM: `kill`, a scheduler's time limit; SIGHUP:
    the terminal closed) stops the build as Ctrl-C does, through the stages' own clean-up, so the running stage lists
    the files it had written and --resume removes those and no others. Without this, Python stopped at once and a
    resume could not tell the stage's files from someone's. Exit status 128 + the signal, as a shell reports it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}

    def stop(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        where = escape(str(out_dir))
        try:  # (after a hangup the terminal is gone: writing to it fails, and the stop must not)
            console.print(
                f"[bold]build[/]: stopped by {name}; `tlcompile build RECIPE --out {where} --resume` continues it"
            )
        except OSError:
            pass
        raise SystemExit(128 + signum)

    for signum in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        # only where the signal would stop the process anyway: `nohup` (SIGHUP ignored) and a caller's own handler stay
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, stop)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def run_stage(ctx: BuildContext, stage: Stage, artifacts: list[Artifact]) -> list[Artifact]:
    """Run one stage: its folder and resume record on ``ctx.stage``, its stage.json afterwards, its time."""
    if stage.folder is not None:
        folder = ctx.out_dir / stage.folder
        folder.mkdir(parents=True, exist_ok=True)
        ctx.stage = StageRun(folder=folder, done=ctx.stage_done(stage.folder) if stage.reusable else None)
    else:
        ctx.stage = StageRun(folder=ctx.out_dir)
    reported = bool(ctx.report)  # stages after the report is assembled add their time to it (bundle)
    if stage.folder is None:
        artifacts = _timed(ctx, stage, lambda: stage.run(ctx, artifacts))
    else:
        started = ctx.out_dir / stage.folder / STARTED_MARK
        if read_stage_record(ctx.out_dir / stage.folder) is None:
            _keep_what_is_theirs(ctx.out_dir / stage.folder)
        if not started.exists():  # a stage that continues after a crash (training) keeps its first start
            atomic_write_text(started, "")
        try:
            artifacts = _timed(ctx, stage, lambda: stage.run(ctx, artifacts))
        except BaseException:
            _note_unfinished(ctx.out_dir / stage.folder)
            raise
    ctx.tracker.stage(stage.name, ctx.stage_seconds[stage.name])
    if reported:
        ctx.report.setdefault("stage_seconds", {})[stage.name] = round(ctx.stage_seconds[stage.name], 2)
    if stage.folder is not None:
        folder = ctx.out_dir / stage.folder
        marks = [folder / STARTED_MARK, folder / UNFINISHED_LIST]
        if ctx.stage.record is not None:  # (a reused stage writes none: its stage.json stands)
            ctx.finish_stage(stage.folder, ctx.stage.record, [*ctx.stage.cleanup, *marks])
        for path in [*ctx.stage.cleanup, *marks]:  # the record now stands for them
            path.unlink(missing_ok=True)
    ctx.stage = None
    return artifacts


def _timed(ctx: BuildContext, stage: Stage, fn: Any) -> Any:
    t0 = time.perf_counter()
    out = fn()
    ctx.stage_seconds[stage.name] = ctx.stage_seconds.get(stage.name, 0.0) + time.perf_counter() - t0
    return out


def write_outputs(ctx: BuildContext) -> None:
    """report.json, report.md / report.html and the build's manifest.json: written last, from every stage."""
    from tlcompile.report.render import write_reports

    atomic_write_json(ctx.out_dir / "report.json", ctx.report)
    write_reports(ctx.report, ctx.out_dir)
    write_build_manifest(ctx)


@dataclass
class ResumePlan:
    """What a resumed build does to the folder of the build before it, decided before anything changes and done in two
    steps (:meth:`apply`): the first stage's own folder just before that stage runs, the rest once it has passed, so
    that a mistake in the data (a label CSV in UTF-16, missing images) leaves the finished build's models, exports,
    bundle and report as they were (01_data then holds the failed check's problems.csv)."""

    said: dict[str, list[str]]  # reused / redone / removed, by stage folder
    clear: list[Path]  # stage folders whose build files go (someone's files stay)
    remove_bundle: bool = False
    done: bool = False
    kept: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # removed by the start-time rule (a stage killed outright)

    def apply(self, ctx: BuildContext, folders: list[Path] | None = None) -> None:
        """Clear ``folders`` (of :attr:`clear`) now; None: everything left, then say what was done."""
        for folder in [f for f in self.clear if folders is None or f in folders]:
            self.clear.remove(folder)
            kept, unlisted = _clear_stage_folder(folder)
            self.kept += kept
            self.unlisted += unlisted
        if folders is not None or self.done:
            return
        self.done = True
        for rel in BUILD_OUTPUTS:
            path = ctx.out_dir / rel
            if path.is_file() or path.is_symlink():
                path.unlink()
        if self.remove_bundle:
            # the earlier build's bundle goes now: a build that then fails before its bundle stage must not leave
            # another recipe's model, which passes verify, beside its report ("Ships: nothing")
            shutil.rmtree(ctx.out_dir / "bundle", ignore_errors=not (ctx.out_dir / "bundle").exists())
        said = {k: list(v) for k, v in self.said.items()}
        if self.kept:
            said["kept"] = [", ".join(sorted(self.kept)) + " (not written by the build)"]
        if self.unlisted:
            shown = sorted(self.unlisted)
            more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
            said["removed"] = said.get("removed", []) + [
                ", ".join(shown[:10]) + more + " (newer than the start of a stage that was killed before it could list "
                "its files: taken for its own)"
            ]
        ctx.console.print(
            "[bold]resume[/]: " + "; ".join(f"{k} {', '.join(v)}" for k, v in said.items() if v)
            if any(said.values())
            else "[bold]resume[/]: nothing to reuse"
        )


def plan_resume(ctx: BuildContext) -> ResumePlan:
    """Before a resumed build runs: keep each finished stage of this same recipe; clear every other stage folder
    (finished under another recipe, unfinished, or not in this recipe at all) and the build-wide outputs, so that
    nothing of an earlier recipe is mixed into this build or listed in its manifest. A file someone added into a stage
    folder after that stage finished is kept, and named (:func:`_clear_stage_folder`); a folder of someone's in the
    build folder is not a stage folder, whatever its name, unless the build wrote it.

    Refused in one line, before anything changes: a stage folder that is a symbolic link (the build would write
    through it and could not clear it), and a bundle/ holding files the build did not write (it is made again whole).

    The epoch checkpoints of an unfinished training stage are kept: each carries the recipe's fingerprint and is
    only resumed by the same recipe."""
    planned = {stage.folder: stage for stage in planned_stages(ctx.recipe) if stage.folder}
    known = _stage_folder_names()
    said: dict[str, list[str]] = {"reused": [], "redone": [], "removed": []}
    clear: list[Path] = []
    for path in sorted(ctx.out_dir.iterdir()):
        if path.name in known and path.is_symlink():
            raise TlcompileError(
                f"--resume: {path} is a symbolic link (to {os.readlink(path)}); a build's stage folders must be its "
                "own: put the folder back in the build folder, or build into a new --out"
            )
        if (
            path.name in planned
            and path.is_dir()
            and not path.is_symlink()
            and not _is_stage_folder(path)
            and any(path.iterdir())
        ):
            # without marks nothing tells the build's old files from someone's: kept, stale outputs went into the
            # manifest; removed, someone's plan.txt would go
            raise TlcompileError(
                f"--resume: {path} has no stage record or marks (made by hand, or its stage.json was removed), and "
                f"this recipe's {path.name.split('_', 1)[1]} stage writes there: move it out of the build folder (or "
                "remove it), then resume"
            )
    folders = [p for p in sorted(ctx.out_dir.iterdir()) if p.is_dir() and not p.is_symlink() and _is_stage_folder(p)]
    for folder in folders:
        name = folder.name
        if name not in planned:
            clear.append(folder)
            said["removed"].append(f"{name} (not in this recipe)")
            continue
        stage = planned[name]
        record = read_stage_record(folder)
        if stage.reusable and record is not None and record.get("fingerprint") == ctx.stage_fingerprint(name):
            said["reused"].append(name)
            continue
        if stage.keeps_partial and record is None:
            said["redone"].append(f"{name} (unfinished: continues from its epoch checkpoint when it is this recipe's)")
            continue
        why = (
            "always measured again"
            if not stage.reusable
            else "unfinished"
            if record is None
            else "a recipe section it reads changed; it reads " + ", ".join(stage.sections or ())
        )
        clear.append(folder)
        said["redone"].append(f"{name} ({why})")
    bundle = ctx.out_dir / "bundle"
    if bundle.is_symlink() or (bundle.exists() and not bundle.is_dir()):
        raise TlcompileError(
            f"--resume: {bundle} is a {'symbolic link' if bundle.is_symlink() else 'file'}, not the build's bundle "
            "folder; move it out of the build folder first"
        )
    remove_bundle = bundle.is_dir()
    if remove_bundle:
        foreign = _not_the_bundles(bundle)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise TlcompileError(
                f"--resume: {bundle} holds files the build did not write ({shown}); the bundle is made again whole, "
                "so move them out of it first"
            )
        said["removed"].append(
            "bundle (this recipe makes none)"
            if ctx.recipe.bundle.enabled is False
            else "bundle (made again at the end)"
        )
    return ResumePlan(said=said, clear=clear, remove_bundle=remove_bundle)


def _is_stage_folder(folder: Path) -> bool:
    """A stage folder of a build: named as one of the build's stages and holding a stage's record or marks (a stage
    writes its start mark first). A folder of someone's is not: another name (``09_copy``, a backup of a stage folder
    with its stage.json) or no marks (``04_quantize`` made by hand); a stage that runs in such a folder keeps what is
    there (:func:`_keep_what_is_theirs`)."""
    return folder.name in _stage_folder_names() and any(
        (folder / mark).is_file() for mark in ("stage.json", STARTED_MARK, UNFINISHED_LIST, KEPT_LIST)
    )


def _stage_folder_names() -> set[str]:
    return {stage.folder for stage in STAGES if stage.folder}


def _not_the_bundles(bundle: Path) -> list[str]:
    """Files in ``bundle`` that are not the bundle's own (its manifest's, the manifest, a signature, verify's pin)."""
    from tlcompile.runtime.manifest import MANIFEST_JSON, UNLISTED_OK

    try:
        listed = json.loads((bundle / MANIFEST_JSON).read_text()).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        listed = None
    if not isinstance(listed, dict):  # a removal that was stopped half way took the manifest: nothing to tell by
        return []
    own = {*listed, MANIFEST_JSON, *UNLISTED_OK}
    return sorted(
        rel
        for rel, p in stage_files(bundle)
        if rel not in own
        and not (p.name.startswith(".") and p.name.endswith(".tmp"))  # an atomic write that was stopped (verify's pin)
    )


KEPT_LIST = ".tlcompile-kept.json"  # in a stage folder: the files of someone else's that a resume kept there
# In the folder of a stage that has not finished: written as it starts (its time tells the files that were there before
# it, or were copied in keeping an older time, from those made after), and the files there when it stopped on an error,
# Ctrl-C or a termination signal (the stage's own: the next --resume removes those and keeps anything else).
STARTED_MARK = ".tlcompile-started"
UNFINISHED_LIST = ".tlcompile-unfinished.json"
_MARKS = {KEPT_LIST, STARTED_MARK, UNFINISHED_LIST, "stage.json"}


def _listed(path: Path) -> set[str] | None:
    """The names in a JSON list the build wrote (KEPT_LIST, UNFINISHED_LIST); None when missing or unreadable."""
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else None


def _mark_time(path: Path) -> int | None:
    """The mtime of a mark the build wrote (stage.json, STARTED_MARK), or None when there is none."""
    return path.stat().st_mtime_ns if path.is_file() and not path.is_symlink() else None


def _note_unfinished(folder: Path) -> None:
    """List the files in the folder of a stage that stopped before its end: its own, to be removed by a resume."""
    try:
        kept = _kept_before(folder)
        files = sorted(
            rel for rel, p in stage_files(folder) if rel not in kept and p.name not in _MARKS - {"stage.json"}
        )
        atomic_write_text(folder / UNFINISHED_LIST, json.dumps(files))
    except OSError:  # a full disk: the resume falls back to the start time
        pass


def _keep_what_is_theirs(folder: Path) -> None:
    """Before a stage runs in a folder it did not finish in (training continuing from its epoch checkpoint, or a
    folder someone made under a stage's name): list in KEPT_LIST the files already there that are not the stage's, so
    that its stage.json does not claim them and no later resume removes them. Not the stage's: what its unfinished list
    does not name; without a list, what is older than its start mark; without a mark either, everything."""
    kept = _kept_before(folder)
    written, start = _listed(folder / UNFINISHED_LIST), _mark_time(folder / STARTED_MARK)
    theirs = set()
    for rel, p in stage_files(folder):
        if rel in _MARKS or rel in kept:
            continue
        if written is not None:
            mine = rel in written
        elif start is not None:
            mine = p.lstat().st_mtime_ns >= start
        else:
            mine = False
        if not mine:
            theirs.add(rel)
    if theirs:
        atomic_write_text(folder / KEPT_LIST, json.dumps(sorted(kept | theirs)))


def _kept_before(folder: Path) -> set[str]:
    return _listed(folder / KEPT_LIST) or set()


def _clear_stage_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Remove what a stage wrote into ``folder``, keeping any file (or link) it did not write (someone's notes) and any
    kept before (listed in KEPT_LIST, which is written beside them). Returns those kept and those removed by the time
    rule alone (see below), relative to the build folder. Without anything to keep the folder goes whole."""
    kept_list = folder / KEPT_LIST
    kept_before = _kept_before(folder)
    record = read_stage_record(folder)
    # the files the stage listed as its own when it finished, or when it stopped on an error or a signal
    if record is not None:
        written = set(record["files"]) if isinstance(record.get("files"), list) else None
    else:
        written = _listed(folder / UNFINISHED_LIST)
    # Without a list (a record from before the lists; a stage killed outright): the time rule. A finished stage's files
    # are older than its stage.json, anything newer is someone's; an unfinished stage's are newer than its start mark.
    finished = _mark_time(folder / "stage.json") if record is not None else None
    start = _mark_time(folder / STARTED_MARK) if record is None else None
    entries = sorted(folder.rglob("*"), reverse=True)  # a folder's contents before the folder
    by_time: list[str] = []

    def theirs(p: Path) -> bool:
        rel = p.relative_to(folder).as_posix()
        if rel in kept_before:
            return True
        if rel in _MARKS - {KEPT_LIST}:
            return False
        if written is not None:  # a file the stage did not write is someone's, however old (mv, cp -p, tar keep times)
            return rel not in written
        mtime = p.lstat().st_mtime_ns
        if finished is not None:
            return mtime > finished
        if start is None or mtime < start:  # no mark at all: nothing tells the build's files from someone's
            return True
        by_time.append(f"{folder.name}/{rel}")
        return False

    keep = {p for p in entries if (p.is_symlink() or p.is_file()) and p != kept_list and theirs(p)}
    if not keep:
        shutil.rmtree(folder)
        return [], by_time
    # the list first: a stop while the stage's files go must not leave someone's files without it
    atomic_write_text(kept_list, json.dumps(sorted(p.relative_to(folder).as_posix() for p in keep)))
    for path in entries:
        if path in keep or path == kept_list:
            continue
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        elif not any(path.iterdir()):
            path.rmdir()
    atomic_write_text(kept_list, json.dumps(sorted(p.relative_to(folder).as_posix() for p in keep)))
    return sorted(p.relative_to(folder.parent).as_posix() for p in keep), by_time


def input_list_sha256(data_module: DataModule) -> str:
    """sha256 of the input file list: every image's id, grade, split and (for files) path and size, in a fixed
    order."""
    import hashlib

    h = hashlib.sha256()
    for i, image_id in enumerate(data_module.ids):
        path = data_module.paths[i] if i < len(data_module.paths) else ""
        size = Path(path).stat().st_size if path and Path(path).is_file() else ""
        h.update(f"{image_id}\t{data_module.grades[i]}\t{data_module.split[i]}\t{path}\t{size}\n".encode())
    return h.hexdigest()


def write_build_manifest(ctx: BuildContext) -> None:
    """manifest.json of the whole build, in the bundle's format: sha256 and size of every file, plus the inputs."""
    from tlcompile.runtime.manifest import manifest_entries

    atomic_write_json(
        ctx.out_dir / "manifest.json",
        {
            "files": manifest_entries(ctx.out_dir),
            "inputs": {"images": len(ctx.data.ids), "list_sha256": input_list_sha256(ctx.data)},
            "recipe_sha256": ctx.recipe.fingerprint(),
        },
    )
