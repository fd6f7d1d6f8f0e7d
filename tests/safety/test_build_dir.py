"""A build writes and deletes only inside a folder it owns; --resume never mixes two recipes (issue 20, 3 and 4)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tlcompile.build import build
from tlcompile.build.outdir import BUILD_MARKER, claim_out_dir, prepare_out_dir
from tlcompile.errors import TlcompileError
from tlcompile.recipe import validate_recipe_dict


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _users_folder(tmp_path: Path) -> Path:
    """A folder that is not a build but looks a little like one: what --out must never touch."""
    folder = tmp_path / "photos"
    (folder / "bundle").mkdir(parents=True)
    (folder / "bundle" / "model.xml").write_text("the user's own file")
    (folder / "report.json").write_text('{"mine": true}')
    (folder / "02_train").mkdir()
    (folder / "02_train" / "notes.txt").write_text("not a stage")
    return folder


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_that_is_not_a_build_is_refused_and_left_untouched(tmp_path, resume):
    folder = _users_folder(tmp_path)
    before = _tree(folder)
    with pytest.raises(TlcompileError) as info:
        prepare_out_dir(folder, resume=resume)
    message = str(info.value)
    assert "not a tlcompile build folder" in message and "--resume" not in message and "\n" not in message
    assert _tree(folder) == before


def test_build_resume_out_on_a_users_folder_through_the_cli(
    tiny_recipe_dict, write_recipe, tmp_path, monkeypatch, capsys
):
    """The issue's example: `build --resume --out DIR` on a folder that is not a build removed DIR/bundle/ and
    overwrote report.json. Now one line, exit 2, nothing changed."""
    from tlcompile.cli import main

    folder = _users_folder(tmp_path)
    before = _tree(folder)
    for extra in (["--resume"], []):
        monkeypatch.setattr(
            sys, "argv", ["tlcompile", "build", str(write_recipe(tiny_recipe_dict)), "--out", str(folder), *extra]
        )
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--resume" not in err, err
        assert _tree(folder) == before


def test_new_and_empty_folders_are_claimed_and_marked(tmp_path):
    for folder in (tmp_path / "new" / "build", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        prepare_out_dir(folder, resume=False)
        assert folder.is_dir() and not any(folder.iterdir())  # nothing is written before the preflight checks
        claim_out_dir(folder)
        marker = json.loads((folder / BUILD_MARKER).read_text())
        assert marker["tlcompile_build"] == 1
    # A marked build folder is refused without --resume (that advice is right here) and accepted with it.
    with pytest.raises(TlcompileError, match="already holds a build; use --resume"):
        prepare_out_dir(tmp_path / "empty", resume=False)
    prepare_out_dir(tmp_path / "empty", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TlcompileError, match="is a file"):
        prepare_out_dir(tmp_path / "file", resume=True)
    # A marker that is a symbolic link does not make a folder a build.
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "data.csv").write_text("x")
    (tmp_path / "linked" / BUILD_MARKER).symlink_to(tmp_path / "empty" / BUILD_MARKER)
    with pytest.raises(TlcompileError, match="not a tlcompile build folder"):
        prepare_out_dir(tmp_path / "linked", resume=True)


def test_resume_with_another_recipe_removes_stale_stages_and_says_what_it_reused(
    compress_like_recipe, tmp_path, no_plots
):
    """The issue's example: a 32 px recipe resumed into a build of another size kept the old prune, quantize and
    fp32.xml next to the new ones and listed them in the manifest. Now stale stages are removed, the manifest lists
    only this recipe's files, and the build prints what it reused, redid and removed."""
    out = tmp_path / "build"
    first = validate_recipe_dict(compress_like_recipe)
    build(first, out, console=Console(quiet=True))
    assert (out / "03_prune").is_dir() and (out / "05_export" / "fp32.xml").is_file() and (out / "bundle").is_dir()
    # Someone's notes, put into stage folders after the build: a redone stage and a removed one keep them.
    (out / "02_train" / "my_eval.txt").write_text("mine")
    (out / "03_prune" / "notes").mkdir()
    (out / "03_prune" / "notes" / "why.txt").write_text("also mine")
    # ... and one that keeps an old time (mv, cp -p, tar): it was taken for the stage's own output and deleted
    old = out / "02_train" / "from_tar.txt"
    old.write_text("mine, from 2020")
    os.utime(old, (1577836800, 1577836800))

    second = dict(compress_like_recipe)
    second.pop("prune")
    second["data"] = {**second["data"], "image_size": 32}
    second["export"] = {**second["export"], "formats": ["onnx"]}
    second["bench"] = {**second["bench"], "runtimes": ["onnxruntime"]}
    second["bundle"] = {"enabled": False}
    console = Console(record=True, width=300)
    report = build(validate_recipe_dict(second), out, resume=True, console=console).report
    printed = console.export_text()
    assert (
        "resume" in printed
        and "03_prune (not in this recipe)" in printed
        and "02_train (a recipe section it reads changed; it reads " in printed
    )
    assert (
        "kept 02_train/from_tar.txt, 02_train/my_eval.txt, 03_prune/notes/why.txt (not written by the build" in printed
    )
    assert (out / "02_train" / "my_eval.txt").read_text() == "mine" and old.read_text() == "mine, from 2020"
    assert sorted(p.relative_to(out / "03_prune").as_posix() for p in (out / "03_prune").rglob("*")) == [
        ".tlcompile-kept.json",
        "notes",
        "notes/why.txt",
    ]  # the stage's own files went, the notes stayed (and the list of what was kept)
    assert not (out / "05_export" / "fp32.xml").exists() and not (out / "bundle").exists()
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert not [
        f
        for f in manifest
        if (f.startswith("03_prune/") and "notes" not in f and "kept" not in f)
        or f.endswith(".xml")
        or ".openvino." in f
    ]
    assert report["preprocessing"]["size"] == 32 and {a["name"] for a in report["artifacts"]} == {"fp32"}
    # Resumed again with the same recipe: every stage is reused.
    console = Console(record=True, width=300)
    build(validate_recipe_dict(second), out, resume=True, console=console)
    printed = console.export_text()
    assert "reused 01_data, 02_train, 05_export" in printed and "train: resumed from" in printed
    # Redone again (training changes): the notes kept before are kept again, though now older than its stage.json.
    third = {**second, "train": {**second["train"], "lr": 0.001}}
    build(validate_recipe_dict(third), out, resume=True, console=Console(quiet=True))
    assert (out / "02_train" / "my_eval.txt").read_text() == "mine"
    assert (out / "03_prune" / "notes" / "why.txt").read_text() == "also mine"


def _run_instead(monkeypatch, stage, run) -> None:
    """The build runs ``run(ctx, artifacts)`` in place of ``stage``'s own work (stages are frozen dataclasses)."""
    import dataclasses

    from tlcompile.build import loop

    monkeypatch.setattr(loop, "STAGES", [dataclasses.replace(s, run=run) if s is stage else s for s in loop.STAGES])


@pytest.fixture(scope="module")
def finished_tiny(tmp_path_factory) -> Path:
    """A finished tiny build (no plots), made once for this file's tests: each copies it before changing it."""
    from tests.conftest import TINY_RECIPE
    from tlcompile.report import html

    out = tmp_path_factory.mktemp("finished") / "build"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(html, "PLOTS", ())
        build(validate_recipe_dict(TINY_RECIPE), out, console=Console(quiet=True))
    return out


@pytest.fixture
def compress_like_recipe(tiny_recipe_dict) -> dict:
    r = dict(tiny_recipe_dict)
    r["data"] = {**r["data"], "num_images": 80}
    r["export"] = {**r["export"], "parity_images": 8}
    r["evaluate"] = {"bootstrap_resamples": 100}
    r["prune"] = {
        "ratio": 0.5,
        "steps": 1,
        "finetune_epochs": 1,
        "calibration_images": 16,
        "max_auc_drop": None,
        "max_sensitivity_drop": None,
        "max_specificity_drop": None,
    }
    r["bench"] = {**r["bench"], "runtimes": ["openvino", "onnxruntime"]}
    return r


@pytest.mark.parametrize("how", ["error", "sigterm"])
def test_resume_after_a_stage_stopped_keeps_what_someone_put_in_its_folder(
    tiny_recipe_dict, tmp_path, monkeypatch, no_plots, how
):
    """A stage that stopped before its end (an error, Ctrl-C, `kill`) left no stage.json, and the resume removed its
    whole folder: someone's notes put there after the crash went with it. Now the stage lists the files it had written
    when it stopped, and the resume removes those and keeps the rest, whatever their times."""
    import signal

    from tlcompile.build import loop
    from tlcompile.build.stages import export

    out = tmp_path / "build"

    def stopped(ctx, artifacts):
        (ctx.out_dir / "05_export" / "half_written.onnx").write_text("the stage's own, unfinished")
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("the disk filled up")

    _run_instead(monkeypatch, export.STAGE, stopped)
    console = Console(record=True, width=300)
    with pytest.raises(SystemExit if how == "sigterm" else RuntimeError) as info:
        build(validate_recipe_dict(tiny_recipe_dict), out, console=console)
    if how == "sigterm":
        assert info.value.code == 128 + signal.SIGTERM and "stopped by SIGTERM" in console.export_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the build's handler is gone with the build
    folder = out / "05_export"
    assert json.loads((folder / loop.UNFINISHED_LIST).read_text()) == ["half_written.onnx"]
    (folder / "my_notes.txt").write_text("why the export failed")
    copied = folder / "copied_with_cp_p.txt"
    copied.write_text("an old file")
    os.utime(copied, (1577836800, 1577836800))

    monkeypatch.undo()
    console = Console(record=True, width=300)
    build(validate_recipe_dict(tiny_recipe_dict), out, resume=True, console=console)
    printed = console.export_text()
    assert (
        "05_export (unfinished)" in printed and "kept 05_export/copied_with_cp_p.txt, 05_export/my_notes.txt" in printed
    )
    assert (folder / "my_notes.txt").read_text() == "why the export failed" and copied.read_text() == "an old file"
    assert not (folder / "half_written.onnx").exists() and (folder / "stage.json").is_file()
    assert not (folder / loop.UNFINISHED_LIST).exists() and not (folder / loop.STARTED_MARK).exists()
    assert ".tlcompile-started" not in (out / "manifest.json").read_text()


def test_resume_after_a_stage_was_killed_outright_keeps_files_older_than_its_start(
    tiny_recipe_dict, tmp_path, no_plots, finished_tiny
):
    """SIGKILL (the out-of-memory killer) leaves no list: a file older than the stage's start mark is someone's (copied
    in with its time), a newer one is taken for the stage's."""
    from tlcompile.build import loop

    out = tmp_path / "build"
    shutil.copytree(finished_tiny, out, symlinks=True)
    folder = out / "05_export"
    (folder / "stage.json").unlink()  # as if killed before its end
    (folder / loop.STARTED_MARK).write_text("")
    os.utime(folder / loop.STARTED_MARK, (1600000000, 1600000000))
    for p in folder.rglob("*"):
        if p.is_file() and p.name != loop.STARTED_MARK:
            os.utime(p, (1700000000, 1700000000))  # written by the stage, after its start
    theirs = folder / "from_tar.txt"
    theirs.write_text("mine")
    os.utime(theirs, (1500000000, 1500000000))
    console = Console(record=True, width=300)
    build(validate_recipe_dict(tiny_recipe_dict), out, resume=True, console=console)
    assert "kept 05_export/from_tar.txt" in console.export_text() and theirs.read_text() == "mine"
    assert (folder / "stage.json").is_file() and not (folder / loop.STARTED_MARK).exists()


def test_a_resume_changes_nothing_of_the_finished_build_until_its_data_have_passed(
    tiny_recipe_dict, tmp_path, monkeypatch, no_plots, finished_tiny
):
    """Found outside-in: a --resume with a changed recipe removed the finished build's stages, bundle and report, then
    stopped on the new label CSV (UTF-16, as Excel saves 'Unicode text'): only an empty 01_data was left. Now the
    earlier build is cleared once the data stage has passed; someone's folders, links and bundle notes are never
    removed (a bundle/ with them, or a stage folder that is a link, is refused before anything changes)."""

    from tlcompile.build.stages import data

    clean = finished_tiny
    changed = validate_recipe_dict({**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "lr": 0.001}})

    # 1. the data stage fails: every file of the finished build outside 01_data is as it was
    out = tmp_path / "b1"
    shutil.copytree(clean, out, symlinks=True)
    before = {k: v for k, v in _tree(out).items() if not k.startswith("01_data/")}

    def bad_labels(ctx, artifacts):
        raise TlcompileError("labels.csv: not UTF-8 text (UTF-16?); save it as UTF-8")

    _run_instead(monkeypatch, data.STAGE, bad_labels)
    changed_data = validate_recipe_dict({**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "num_images": 110}})
    with pytest.raises(TlcompileError, match="not UTF-8"):
        build(changed_data, out, resume=True, console=Console(quiet=True))
    after = {k: v for k, v in _tree(out).items() if not k.startswith("01_data/")}
    assert after == before and (out / "bundle" / "bundle.json").is_file() and (out / "02_train" / "fp32.pt").is_file()
    monkeypatch.undo()

    # 2. a bundle/ with someone's notes, or a stage folder that is a link: one line, nothing changed
    out = tmp_path / "b2"
    shutil.copytree(clean, out, symlinks=True)
    (out / "bundle" / "DEPLOY-NOTES.txt").write_text("site 4: pinned by hand")
    before = _tree(out)
    with pytest.raises(TlcompileError, match=r"bundle holds files the build did not write \(DEPLOY-NOTES.txt\)"):
        build(changed, out, resume=True, console=Console(quiet=True))
    assert _tree(out) == before
    (out / "bundle" / "DEPLOY-NOTES.txt").unlink()
    (out / "05_export").rename(tmp_path / "moved_export")
    (out / "05_export").symlink_to(tmp_path / "moved_export")
    with pytest.raises(TlcompileError, match="05_export is a symbolic link"):
        build(changed, out, resume=True, console=Console(quiet=True))
    (out / "05_export").unlink()
    (tmp_path / "moved_export").rename(out / "05_export")

    # 3. a folder of someone's named like a stage folder, and a link of someone's in a stage folder, are kept
    (out / "99_notes").mkdir()
    (out / "99_notes" / "a.txt").write_text("mine")
    (out / "02_train" / "link.txt").symlink_to(finished_tiny / "report.md")
    console = Console(record=True, width=300)
    build(changed, out, resume=True, console=console)
    printed = console.export_text()
    assert (out / "99_notes" / "a.txt").read_text() == "mine" and "99_notes" not in printed
    assert (out / "02_train" / "link.txt").is_symlink() and "kept 02_train/link.txt" in printed
    assert printed.index("data: ") < printed.index("resume: ")  # said once it is done


def test_ctrl_c_says_how_to_continue(tiny_recipe_dict, tmp_path, monkeypatch, no_plots):

    from tlcompile.build.stages import export

    def interrupted(ctx, artifacts):
        raise KeyboardInterrupt

    _run_instead(monkeypatch, export.STAGE, interrupted)
    console = Console(record=True, width=300)
    with pytest.raises(KeyboardInterrupt):
        build(validate_recipe_dict(tiny_recipe_dict), tmp_path / "b", console=console)
    assert "build: stopped (Ctrl-C); `tlcompile build RECIPE --out" in console.export_text()


def test_review_cases_of_resume_keep_what_is_not_the_builds(tiny_recipe_dict, tmp_path, no_plots, finished_tiny):
    """Found in review: a bundle/ whose removal was stopped (its manifest gone) blocked every later resume; a note left
    in an unfinished training folder was claimed by the training that continued there and removed by a later resume;
    a folder of someone's named like a stage of this version (04_quantize) was removed whole."""
    from tlcompile.build import loop

    out = tmp_path / "build"
    shutil.copytree(finished_tiny, out, symlinks=True)
    (out / "bundle" / "manifest.json").unlink()  # as if the removal had been stopped after it
    (out / "02_train" / "stage.json").unlink()  # training stopped before its end ...
    (out / "02_train" / loop.UNFINISHED_LIST).write_text(
        json.dumps(sorted(p.name for p in (out / "02_train").iterdir() if p.is_file()))
    )
    (out / "02_train" / "my_notes.txt").write_text("why it stopped")  # ... and someone's note since
    (out / "04_quantize").mkdir()
    (out / "04_quantize" / "plan.txt").write_text("quantize next week")  # no quantize section in this recipe
    build(validate_recipe_dict(tiny_recipe_dict), out, resume=True, console=Console(quiet=True))
    assert (out / "bundle" / "manifest.json").is_file() and (out / "02_train" / "stage.json").is_file()
    assert "my_notes.txt" in json.loads((out / "02_train" / loop.KEPT_LIST).read_text())
    changed = {**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "lr": 0.001}}
    console = Console(record=True, width=300)
    build(validate_recipe_dict(changed), out, resume=True, console=console)
    assert (out / "02_train" / "my_notes.txt").read_text() == "why it stopped"
    assert (out / "04_quantize" / "plan.txt").read_text() == "quantize next week"
    assert "04_quantize" not in console.export_text()


def test_a_stop_whose_line_cannot_be_written_still_stops_the_build(tmp_path):
    """After a hangup the terminal is gone: the handler's line raised OSError (exit 1, a traceback) instead of the
    stop (129)."""
    import signal

    from tlcompile.build.loop import _stop_on_signals

    class Gone:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

    restore = _stop_on_signals(Console(file=Gone()), tmp_path)
    try:
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGHUP)
        assert info.value.code == 128 + signal.SIGHUP
    finally:
        restore()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_copies_of_stage_folders_and_empty_folders_of_someones_stay(
    tiny_recipe_dict, tmp_path, no_plots, finished_tiny
):
    """Found outside-in: a backup copy of a stage folder (09_copy, with its stage.json) was removed with the model in
    it; a file or link named bundle was renamed away; and (review) a stage folder without marks, whose stage this
    recipe runs, had the build's stale files kept as someone's."""
    out = tmp_path / "build"
    shutil.copytree(finished_tiny, out, symlinks=True)
    shutil.copytree(out / "02_train", out / "09_copy")
    changed = validate_recipe_dict({**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "lr": 0.001}})
    console = Console(record=True, width=300)
    build(changed, out, resume=True, console=console)
    assert (out / "09_copy" / "fp32.pt").is_file() and "09_copy" not in console.export_text()
    (out / "05_export" / "stage.json").unlink()  # to force a redo, say
    for mark in (".tlcompile-kept.json", ".tlcompile-started"):
        (out / "05_export" / mark).unlink(missing_ok=True)
    before = _tree(out)
    with pytest.raises(TlcompileError, match="05_export has no stage record or marks .* move it out of the build"):
        build(changed, out, resume=True, console=Console(quiet=True))
    assert _tree(out) == before
    shutil.rmtree(out / "05_export")
    shutil.rmtree(out / "bundle")
    (out / "bundle").write_text("my notes")
    before = _tree(out)
    with pytest.raises(TlcompileError, match="bundle is a file, not the build's bundle folder"):
        build(changed, out, resume=True, console=Console(quiet=True))
    assert _tree(out) == before
