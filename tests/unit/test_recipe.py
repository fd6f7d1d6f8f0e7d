"""Recipe validation: every broken recipe is one line naming the key, through the library and the CLI."""

from __future__ import annotations

import copy
import sys

import pytest
import yaml

from tlcompile.errors import RecipeError
from tlcompile.recipe import load_recipe, recipe_json_schema, validate_recipe_dict


def _mutate(base: dict, path: str, value) -> dict:
    d = copy.deepcopy(base)
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return d


BROKEN = [
    # (id, key path to set, value, text that must appear in the message)
    ("unknown-top-key", "colour", "red", "unknown key 'colour'"),
    ("unknown-nested-key", "train.epoch", 3, "train.epoch"),
    ("wrong-type", "train.epochs", "ten", "train.epochs"),
    ("unknown-model", "model.arch", "mobilenet_v9", "'mobilenet_v9' is not a known model; known: cbr_large_t"),
    ("negative-lr", "train.lr", -0.1, "train.lr"),
    ("zero-epochs", "train.epochs", 0, "train.epochs"),
    ("bad-split-sum", "data.split", {"val": 0.5, "test": 0.45}, "val + test"),
    ("split-over-one", "data.split.test", 1.5, "data.split.test"),
    ("unknown-optimizer", "train.optimizer", "rmsprop", "train.optimizer"),
    ("unknown-task", "data.task", "glaucoma", "data.task"),
    ("unknown-source", "data.source", "nifti", "data.source"),
    ("image-size-too-small", "data.image_size", 8, "data.image_size"),
    ("csv-without-paths", "data.source", "csv", "data"),
    ("bad-template", "data.path_template", "image.png", "data.path_template"),
    ("unknown-runtime", "bench.runtimes", ["tensorrt"], "bench.runtimes.0"),
    ("unknown-style", "data.style", "polaroid", "style 'polaroid'"),
    ("section-not-mapping", "train", 5, "train"),
    # select: name with an artifact the recipe does not make failed at the end of a whole build
    (
        "bundle-artifact-not-made",
        "bundle",
        {"select": "name", "artifact": "int8"},
        "bundle.artifact 'int8' is not made by this recipe (it needs a quantize section); valid: fp32",
    ),
    ("bundle-artifact-unknown", "bundle", {"select": "name", "artifact": "fp16"}, "'fp16' is not made by this recipe"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_recipe_is_one_line_naming_the_key(case, tiny_recipe_dict, write_recipe):
    _, path, value, expected = case
    recipe_path = write_recipe(_mutate(tiny_recipe_dict, path, value))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert str(recipe_path) in message


def test_error_names_the_yaml_line(write_recipe):
    path = write_recipe("name: x\ntrain:\n  epochs: 3\n  lr: -1\n")
    with pytest.raises(RecipeError, match=r"train\.lr \(line 4\)"):
        load_recipe(path)


def test_missing_data_path_names_the_file(tiny_recipe_dict, write_recipe, tmp_path):
    d = _mutate(tiny_recipe_dict, "data", {"source": "csv", "csv": "nope.csv", "images": "."})
    with pytest.raises(RecipeError, match=r"data\.csv: '.*nope\.csv' does not exist"):
        load_recipe(write_recipe(d))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the recipe is empty"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("name: [unclosed\n", "not valid YAML (line"),
        ("a: &x [1, 2]\nb: *x\n", "YAML aliases"),
        ("name: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_malformed_files(text, expected, write_recipe):
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(write_recipe(text))


def test_non_utf8_directory_and_missing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_apply_and_are_validated(tiny_recipe_dict, write_recipe):
    path = write_recipe(tiny_recipe_dict)
    r = load_recipe(path, ["train.epochs=7", "model.arch=cbr_tiny", "bench.runtimes=[openvino]"])
    assert (r.train.epochs, r.model.arch, r.bench.runtimes) == (7, "cbr_tiny", ["openvino"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(path, ["train.epochs"])
    with pytest.raises(RecipeError, match="train.lr"):
        load_recipe(path, ["train.lr=-3"])
    with pytest.raises(RecipeError, match="'train.epochs' is a value"):
        load_recipe(path, ["train.epochs.x=1"])
    # A bad value from --set is blamed on the --set, not on the line of the file it replaced.
    with pytest.raises(RecipeError, match=r"train\.epochs \(--set train\.epochs=ten\): 'ten'") as info:
        load_recipe(path, ["train.epochs=ten"])
    assert "(line " not in str(info.value)
    with pytest.raises(RecipeError, match=r"train\.epoch \(--set train\.epoch=3\): unknown key 'epoch'"):
        load_recipe(path, ["train.epoch=3"])
    # ... and an unknown section the --set made on its way to the value (it named the data section's line)
    with pytest.raises(RecipeError, match=r"data\.prep \(--set data\.prep\.size=10\): unknown key 'prep'") as info:
        load_recipe(path, ["data.prep.size=10"])
    assert "(line " not in str(info.value)
    # ... and a check of a whole section whose values came by --set (it named the section's line of the file)
    with pytest.raises(
        RecipeError,
        match=r"data\.split \(line \d+, with --set data\.split\.val=0\.5, --set data\.split\.test=0\.5\): val \+ test",
    ):
        load_recipe(path, ["data.split.val=0.5", "data.split.test=0.5"])
    # a text value that YAML reads as something else is told how to quote it
    with pytest.raises(
        RecipeError, match=r"quote a text value inside the --set: \"data\.path_template='\{id\}\.png'\""
    ):
        load_recipe(path, ["data.path_template={id}.png"])


def test_fingerprint_is_stable_and_sensitive(tiny_recipe_dict, write_recipe):
    path = write_recipe(tiny_recipe_dict)
    assert load_recipe(path).fingerprint() == load_recipe(path).fingerprint()
    assert load_recipe(path).fingerprint() != load_recipe(path, ["seed=1"]).fingerprint()


def test_every_field_is_described():
    schema = recipe_json_schema()
    missing = []
    for name, definition in {"Recipe": schema, **schema.get("$defs", {})}.items():
        for field, spec in definition.get("properties", {}).items():
            if "description" not in spec:
                missing.append(f"{name}.{field}")
    assert not missing


def test_quickstart_recipe_is_valid():
    from conftest import REPO

    r = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert r.data.task == "referable" and r.model.arch == "mobilenet_v3_small"


@pytest.mark.parametrize("case", BROKEN[:12], ids=[c[0] for c in BROKEN[:12]])
def test_cli_validate_exits_nonzero_without_traceback(case, tiny_recipe_dict, write_recipe, capsys, monkeypatch):
    from tlcompile.cli import main

    _, path, value, expected = case
    recipe_path = write_recipe(_mutate(tiny_recipe_dict, path, value))
    monkeypatch.setattr(sys, "argv", ["tlcompile", "validate", str(recipe_path)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_validate_ok(tiny_recipe_dict, write_recipe, capsys, monkeypatch):
    from tlcompile.cli import main

    monkeypatch.setattr(sys, "argv", ["tlcompile", "validate", str(write_recipe(tiny_recipe_dict)), "--set", "seed=3"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert "valid" in capsys.readouterr().out


def test_resolved_recipe_round_trips(tiny_recipe_dict, write_recipe):
    r = load_recipe(write_recipe(tiny_recipe_dict))
    again = load_recipe(write_recipe(yaml.safe_dump(r.to_yaml_dict()), "again.yaml"))
    assert again.fingerprint() == r.fingerprint()


def test_eyepacs_gpu_recipe_is_valid(tmp_path):
    """The GPU recipe cannot run here (no EyePACS, no GPU), but it must stay a valid recipe."""
    from conftest import REPO

    (tmp_path / "trainLabels.csv").write_text("image,level\n")
    (tmp_path / "train").mkdir()
    r = load_recipe(
        REPO / "recipes" / "eyepacs-referable-mobilenetv3.yaml",
        [f"data.root={tmp_path}", f"data.cache={tmp_path / 'c'}"],
    )
    assert (r.train.device, r.train.amp, r.train.channels_last, r.data.image_size) == ("cuda", "bf16", True, 512)


def test_a_key_with_a_newline_is_shown_escaped_on_one_line():
    """Found by the recipe fuzz test: an unknown key holding a newline split the one-line message in two."""
    with pytest.raises(RecipeError) as info:
        validate_recipe_dict({"train": {"a\nb": 0}}, "fuzz")
    assert "\n" not in str(info.value) and "train.a\\nb: unknown key 'a\\nb'" in str(info.value)


def test_the_named_bundle_artifact_may_be_any_the_recipe_makes(tiny_recipe_dict):
    r = {**tiny_recipe_dict, "prune": {}, "quantize": {}}
    assert validate_recipe_dict(r).artifact_names() == ["fp32", "pruned", "int8", "pruned-int8"]
    for name in ("fp32", "pruned", "int8", "pruned-int8"):
        assert validate_recipe_dict({**r, "bundle": {"select": "name", "artifact": name}}).bundle.artifact == name
    # a recipe that ships no bundle names no artifact to check
    assert validate_recipe_dict({**tiny_recipe_dict, "bundle": {"enabled": False, "select": "name", "artifact": "x"}})
