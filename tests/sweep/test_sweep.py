"""`tlcompile sweep`: grids expand, variants are validated up front, builds run on a local Ray, failures isolated."""

from __future__ import annotations

import json
import sys

import pytest

from tlcompile.errors import RecipeError
from tlcompile.sweep import parse_grid, run_sweep, variants_of


def test_grid_expands_to_every_combination():
    axes = parse_grid(["prune.ratio=0.3,0.5", "model.arch=cbr_small,mobilenet_v3_small"])
    variants = variants_of(axes)
    assert len(variants) == 4
    assert variants[0].overrides == ("prune.ratio=0.3", "model.arch=cbr_small")
    assert len({v.name for v in variants}) == 4


@pytest.mark.parametrize(
    "grid, message",
    [(["prune.ratio"], "expected key.path=value1"), (["a=1", "a=2"], "given twice"), ([], "at least one")],
)
def test_bad_grids(grid, message):
    with pytest.raises(RecipeError, match=message):
        parse_grid(grid)


def test_every_variant_is_validated_before_anything_runs(tiny_recipe_dict, write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_dict)
    with pytest.raises(RecipeError, match="'nonet' is not a known model"):
        run_sweep(recipe, ["model.arch=cbr_small,nonet"], out_dir=tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_four_variant_local_ray_sweep(tiny_recipe_dict, write_recipe, tmp_path, monkeypatch, capsys):
    from tlcompile.cli import main

    tiny_recipe_dict["bench"]["runtimes"] = ["openvino", "onnxruntime"]
    out = tmp_path / "sweep"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "tlcompile",
            "sweep",
            str(write_recipe(tiny_recipe_dict)),
            "--grid",
            "model.arch=cbr_small,cbr_tiny",
            "--grid",
            "data.image_size=32,48",
            "--out",
            str(out),
        ],
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0, capsys.readouterr().err
    report = json.loads((out / "sweep.json").read_text())
    assert [v["ok"] for v in report["variants"]] == [True] * 4
    assert len(report["rows"]) == 4 * 2  # four builds x two runtimes
    assert {r["variant"] for r in report["rows"]} == {v["name"] for v in report["variants"]}
    assert any(r["pareto"] for r in report["rows"]) and not all(r["pareto"] for r in report["rows"])
    for v in report["variants"]:
        built = json.loads((out / v["name"] / "report.json").read_text())
        assert built["recipe"]["model"]["arch"] in v["name"]
    assert "| variant | artifact |" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_a_failing_variant_does_not_stop_the_others(tmp_path, write_recipe, tiny_recipe_dict):
    from PIL import Image

    from tlcompile.data.synthetic import generate

    images = tmp_path / "images"
    images.mkdir()
    rows = ["id_code,diagnosis"]
    # Fundus-like frames: the data checks refuse a blank frame (no field of view), so plain colour squares would fail
    # both variants for the wrong reason.
    frames, _ = generate(40, seed=0, size=48)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(images / f"i{i}.png")
        rows.append(f"i{i},{i % 5}")
    (tmp_path / "ok.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "broken.csv").write_text("\n".join([*rows, "ghost,2"]) + "\n")  # names an image that is not there
    tiny_recipe_dict["data"] = {"source": "csv", "csv": "ok.csv", "images": "images", "image_size": 32}
    tiny_recipe_dict["bench"]["runtimes"] = ["onnxruntime"]
    report = run_sweep(write_recipe(tiny_recipe_dict), ["data.csv=ok.csv,broken.csv"], out_dir=tmp_path / "sweep")
    ok = {v["name"]: v for v in report["variants"]}
    assert ok["data.csv=ok.csv"]["ok"] and not ok["data.csv=broken.csv"]["ok"]
    assert "ghost.png' does not exist" in ok["data.csv=broken.csv"]["error"]
    assert len(report["rows"]) == 1


def test_more_cpus_per_variant_than_any_node_has_is_one_line_not_a_silent_wait(
    tiny_recipe_dict, write_recipe, tmp_path, monkeypatch
):
    """Review: a task asking for more CPUs than any node has is never scheduled, and the sweep waited for ever."""
    import sys
    import types

    from tlcompile.errors import ClusterError
    from tlcompile.sweep import run_sweep

    fake = types.SimpleNamespace(
        is_initialized=lambda: True,
        nodes=lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}],
        shutdown=lambda: None,
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    out = tmp_path / "sweep"
    with pytest.raises(ClusterError, match=r"--cpus-per-variant 3 is more than any node of the cluster has \(2 CPUs\)"):
        run_sweep(write_recipe(tiny_recipe_dict), ["train.lr=0.001,0.002"], out_dir=out, cpus_per_variant=3)
    assert not out.exists()
