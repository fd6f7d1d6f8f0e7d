"""The bad-input corpus: every malformed recipe is one line naming the key, never a traceback; plus fuzzing."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlcompile.errors import RecipeError
from tlcompile.recipe import load_recipe, parse_recipe_yaml, validate_recipe_dict

CORPUS = sorted((Path(__file__).parents[1] / "corpus" / "recipes").glob("*.yaml"))
# Files that cannot carry an '# expect:' header.
EXPECT = {"33-empty.yaml": "the recipe is empty", "35-non-utf8.yaml": "not UTF-8"}


def _expected(path: Path) -> str:
    if path.name in EXPECT:
        return EXPECT[path.name]
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect:' header"
    return first[len("# expect: ") :]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_recipe_is_rejected_in_one_line(path, capsys, monkeypatch):
    from tlcompile.cli import main

    monkeypatch.chdir(path.parent)
    monkeypatch.setattr(sys, "argv", ["tlcompile", "validate", path.name])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert _expected(path) in err


def test_directory_and_huge_file(tmp_path):
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: " + "x" * (2 << 20))
    with pytest.raises(RecipeError, match="too large"):
        load_recipe(huge)


def test_python_tag_never_runs(tmp_path):
    marker = Path("/tmp/tlcompile-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(RecipeError):
        load_recipe(CORPUS[[p.name for p in CORPUS].index("32-python-object-tag.yaml")])
    assert not marker.exists()


VALID = {
    "name": "fuzz",
    "seed": 1,
    "data": {
        "source": "synthetic",
        "num_images": 100,
        "image_size": 64,
        "task": "referable",
        "split": {"val": 0.2, "test": 0.2},
    },
    "model": {"arch": "cbr_small", "pretrained": "none"},
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.01, "schedule": "step"},
    "export": {"formats": ["onnx"]},
    "bench": {"runtimes": ["onnxruntime"], "iterations": 5},
}


def _paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


PATHS = list(_paths(VALID))
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "delete", "extra"]), values), min_size=1, max_size=4
    )
)
def test_random_mutations_never_raise_anything_but_recipe_error(mutations):
    d = copy.deepcopy(VALID)
    for path, action, value in mutations:
        node = d
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            if action == "set":
                node[path[-1]] = value
            elif action == "delete":
                node.pop(path[-1], None)
            else:
                node[f"extra_{path[-1]}"] = value
    try:
        validate_recipe_dict(d, "fuzz")
    except RecipeError as err:
        assert "\n" not in str(err)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_yaml_text_never_raises_anything_but_recipe_error(text):
    try:
        validate_recipe_dict(parse_recipe_yaml(yaml.safe_dump(VALID) + text, "fuzz"), "fuzz")
    except RecipeError:
        pass
