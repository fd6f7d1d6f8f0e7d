"""Malformed recipes that used to pass or raise a traceback (issue 20): booleans as numbers, duplicate keys, deep
nesting, a symbolic-link loop as data root, a recipe that is not a regular file. Each is one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tlcompile.errors import RecipeError
from tlcompile.recipe import load_recipe, validate_recipe_dict


def _one_line(capsys, monkeypatch, *args: str) -> str:
    from tlcompile.cli import main

    monkeypatch.setattr(sys, "argv", ["tlcompile", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntrain:\n  epochs: 2\n")
    return path


@pytest.mark.parametrize(
    "override", ["train.batch_size=true", "train.lr=yes", "train.epochs=false", "data.image_size=on"]
)
def test_set_boolean_is_not_a_number(recipe, override, capsys, monkeypatch):
    err = _one_line(capsys, monkeypatch, "validate", str(recipe), "--set", override)
    assert override.split("=")[0] in err and "YAML boolean" in err


def test_booleans_still_set_yes_no_keys(recipe):
    r = load_recipe(recipe, ["train.augment=false", "data.crop_fov=true"])
    assert r.train.augment is False and r.data.crop_fov is True
    with pytest.raises(RecipeError, match="train.batch_size"):
        validate_recipe_dict({"train": {"batch_size": True}})


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\ntrain:\n  epochs: 3\n  lr: 0.01\n  epochs: 30\n")
    with pytest.raises(RecipeError, match=r"key 'epochs' appears twice in one section \(lines 3 and 5\)"):
        load_recipe(path)


def test_deep_nesting_in_a_file_and_in_set(tmp_path, recipe, capsys, monkeypatch):
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\ndata: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n")
    assert "nested more than" in _one_line(capsys, monkeypatch, "validate", str(path))
    assert "nested more than" in _one_line(
        capsys, monkeypatch, "validate", str(recipe), "--set", "data.x=" + "[" * 20000 + "]" * 20000
    )


def test_symlink_loop_as_data_root(tmp_path, capsys, monkeypatch):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for root in ("loop", str(loop), "loop/images"):
        path = tmp_path / "r.yaml"
        path.write_text(f"name: r\ndata:\n  source: aptos\n  root: {root}\n")
        err = _one_line(capsys, monkeypatch, "validate", str(path))
        assert "data.root" in err


def test_recipe_that_is_not_a_regular_file(tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)  # reading it would block for ever
    assert "not a regular file" in _one_line(capsys, monkeypatch, "validate", str(fifo))
    if Path("/dev/zero").exists():  # never ends
        assert "not a regular file" in _one_line(capsys, monkeypatch, "build", "/dev/zero")
    link = tmp_path / "link.yaml"
    link.symlink_to(fifo)
    assert "not a regular file" in _one_line(capsys, monkeypatch, "validate", str(link))
