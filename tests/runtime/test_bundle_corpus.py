"""The bundle corpus: each tests/corpus/bundles/*.json is a way to damage or forge a copy of a real bundle, with
what verify must say (issue 20). Ops: set_json, write, delete, flip_byte, symlink, manifest_add, reseal, sign."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlcompile.runtime.bundle import verify_bundle
from tlcompile.runtime.manifest import manifest_entries
from tlcompile.runtime.signing import keygen, sign_bundle

CORPUS = sorted((Path(__file__).parents[1] / "corpus" / "bundles").glob("*.json"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-keys")
    return {name: keygen(root / name) for name in ("ours", "theirs")}


def _apply(bundle: Path, step: dict, keys: dict) -> None:
    op = step["op"]
    if op == "set_json":
        meta = json.loads((bundle / step["file"]).read_text())
        node = meta
        *parents, last = step["key"].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = step["value"]
        (bundle / step["file"]).write_text(json.dumps(meta))
    elif op == "write":
        (bundle / step["file"]).write_text(step["text"])
    elif op == "delete":
        (bundle / step["file"]).unlink()
    elif op == "flip_byte":
        data = bytearray((bundle / step["file"]).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle / step["file"]).write_bytes(bytes(data))
    elif op == "symlink":
        (bundle / step["file"]).symlink_to(step["target"])
    elif op == "manifest_add":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"][step["path"]] = {"sha256": "0" * 64, "size": 1}
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    elif op == "reseal":  # what an attacker with write access does: a manifest that matches the files again
        (bundle / "manifest.json").write_text(
            json.dumps({"format_version": 1, "files": manifest_entries(bundle)}, indent=2)
        )
    elif op == "sign":
        sign_bundle(bundle, keys[step["key"]][0], replace=True)
    else:
        raise AssertionError(f"unknown op {op}")


def test_corpus_is_there():
    assert len(CORPUS) >= 12


@pytest.mark.parametrize("case", CORPUS, ids=[p.stem for p in CORPUS])
def test_bundle_corpus(case, bundle_copy, keys):
    spec = json.loads(case.read_text())
    for step in spec["steps"]:
        _apply(bundle_copy, step, keys)
    result = verify_bundle(bundle_copy, trust=[keys[k][1] for k in spec["trust"]])
    assert result.ok == spec["ok"], result.to_dict()
    if spec["problem"]:
        everything = (
            result.problems
            + result.signature.problems
            + result.manifest.problems
            + (result.golden.problems if result.golden else [])
        )
        assert any(spec["problem"] in p for p in everything), everything
        assert all("\n" not in p for p in everything)
