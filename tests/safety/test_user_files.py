"""The build-side commands never replace a file of the user's, and refuse bad output paths in one line before any work
(an outside-in test found data synth --preview/--out, data check --out, report merge --out and report render
replacing the user's files, and tracebacks for output paths under a file)."""

from __future__ import annotations

import json
import shutil

import yaml
from typer.testing import CliRunner

from tests.conftest import cli_refusal
from tlcompile.cli import app


def test_data_synth_never_replaces_a_file(tmp_path):
    mine = tmp_path / "preview.png"
    mine.write_text("keep")
    cli_refusal(["data", "synth", "--preview", mine], "already exists; it is never overwritten")
    cli_refusal(["data", "synth", "--preview", tmp_path], "already exists")  # a folder
    cli_refusal(["data", "synth", "--preview", tmp_path / "p.jpg"], "is not a .png file name")
    cli_refusal(
        ["data", "synth", "--preview", tmp_path / "p.png", "--style", "nosuch"], "--style 'nosuch' is not valid"
    )
    cli_refusal(["data", "synth", "--preview", mine / "p.png"], "is a file, not a folder")
    own = tmp_path / "set" / "train_images" / "syn000001.png"
    own.parent.mkdir(parents=True)
    own.write_text("mine")
    cli_refusal(
        ["data", "synth", "--out", tmp_path / "set", "--n", "3", "--size", "32"], "is a folder that is not empty"
    )
    cli_refusal(["data", "synth", "--out", mine, "--n", "3"], "is a file; give a folder for the data set")
    assert mine.read_text() == "keep" and own.read_text() == "mine"
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "new"), "--n", "3", "--size", "32"])
    assert result.exit_code == 0 and (tmp_path / "new" / "train.csv").is_file(), result.output  # a new folder: fine


def test_data_check_out_replaces_only_its_own_files(tmp_path, tiny_recipe_dict):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "num_images": 40}}))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "problems.csv").write_text("patient,problem\n1,cataract\n")
    cli_refusal(["data", "check", recipe, "--out", folder], "problems.csv there is not one a data check wrote")
    assert (folder / "problems.csv").read_text() == "patient,problem\n1,cataract\n"
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    cli_refusal(["data", "check", recipe, "--out", notes], "is a file; give a folder")
    cli_refusal(["data", "check", recipe, "--out", notes / "sub"], "is a file, not a folder")
    out = tmp_path / "check"
    for _ in range(2):  # its own files are replaced on a second run
        result = CliRunner().invoke(app, ["data", "check", str(recipe), "--out", str(out)])
        assert result.exit_code == 0 and (out / "data_check.json").is_file(), result.output


def test_report_merge_and_render_never_replace_a_users_file(tiny_build, tmp_path):
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"runs": []}))
    mine = tmp_path / "merged.json"
    mine.write_text("keep")
    cli_refusal(["report", "merge", runs, "--out", mine], "already exists; it is never overwritten")
    cli_refusal(["report", "merge", runs, "--out", runs], "already exists")  # its own input
    assert mine.read_text() == "keep" and json.loads(runs.read_text()) == {"runs": []}
    # A folder that is not a build, holding a copy of report.json and the user's own report.md.
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(tiny_build.out_dir / "report.json", folder / "report.json")
    (folder / "report.md").write_text("my notes")
    cli_refusal(["report", "render", folder], "is not a build folder")
    assert (folder / "report.md").read_text() == "my notes"
    # Malformed inputs are one line naming what is wrong, not a KeyError from deep inside the renderer or the merge.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text(json.dumps({"artifacts": [{}]}))
    cli_refusal(["report", "render", bad], "required key is missing")
    for content, problem in (({"runs": [{}]}, "runs[0] has no 'rows' list"), ({"runs": [{"rows": [{}]}]}, "lacks")):
        (tmp_path / "m.json").write_text(json.dumps(content))
        cli_refusal(["report", "merge", tmp_path / "m.json"], problem)


def test_build_out_under_a_file_is_one_line(tmp_path, tiny_recipe_dict):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    cli_refusal(["build", recipe, "--out", notes / "sub"], "cannot create the build folder")
    assert notes.read_text() == "keep"
