"""report.json's typed contract (tlcompile.report.schema): a real build's report matches it, a smuggled or misspelt key
anywhere fails with its path, and `tlcompile report schema` publishes it as JSON Schema.

The other builds of the default run check their own report.json too: no compression and a bundle
(tests/test_build_e2e.py), prune + quantize (tests/compress/test_compress_build.py), a transfer comparison
(tests/train/test_transfer_build.py) and a bundle that could not be made (tests/runtime/test_bundle.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from tests.report.conftest import make_guard
from tlcompile.report.schema import Report, ReportSchemaError, report_json_schema, validate_report


@pytest.fixture
def real_report(tiny_build) -> dict:
    """A private copy of the tiny build's report.json, as read from disk."""
    out, _ = tiny_build
    return json.loads((out / "report.json").read_text())


def test_a_builds_report_json_matches_the_schema(tiny_build, real_report):
    report = validate_report(real_report)
    assert isinstance(report, Report) and [r.runtime for r in report.artifacts] == ["onnxruntime", "torch"]
    assert report.artifacts[0].clinical.endpoints.checks["min_specificity"].target == 0.01
    assert report.artifacts[0].clinical.calibration_unscaled is not None  # temperature scaling is on
    assert report.bundle is None and report.transfer is None  # absent in this build
    # Nothing of the file is left out of the model: dumped back by alias, the same keys and values.
    assert report.model_dump(mode="json", by_alias=True, exclude_unset=True) == json.loads(json.dumps(real_report))


def test_the_published_json_schema_accepts_the_real_report_and_refuses_a_smuggled_key(real_report):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(report_json_schema())
    assert list(validator.iter_errors(real_report)) == []
    real_report["artifacts"][0]["metrics"]["auc_"] = 0.9
    assert [list(e.absolute_path) for e in validator.iter_errors(real_report)] == [["artifacts", 0, "metrics"]]


def test_a_smuggled_key_in_a_rows_guard_is_named_by_its_path(real_report):
    real_report["artifacts"][1]["guard"] = make_guard(met=False)  # the real guard record, from tlcompile.compress.guard
    validate_report(real_report)
    smuggled = copy.deepcopy(real_report)
    smuggled["artifacts"][1]["guard"]["checks"][0]["_says"] = "MACs 12.3M"
    with pytest.raises(ReportSchemaError, match=r"^report.json: artifacts\.1\.guard\.checks\.0\._says: unknown key"):
        validate_report(smuggled)
    misspelt = copy.deepcopy(real_report)
    misspelt["artifacts"][1]["guard"]["acitons"] = misspelt["artifacts"][1]["guard"].pop("actions")
    message = r"guard\.acitons: unknown key \(.*\); 'actions' is missing: misspelt\? \(and 1 more problem\)"
    with pytest.raises(ReportSchemaError, match=message):
        validate_report(misspelt)


def _set(path: str, value):
    """A change to a report: set the key at a dotted path (list indices as numbers)."""
    *parents, key = path.split(".")

    def change(report: dict) -> None:
        node = report
        for step in parents:
            node = node[int(step)] if isinstance(node, list) else node[step]
        node[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("artifact", []), r"^report.json: artifact: unknown key"),
        (
            lambda r: r["operating_point"].pop("temperature"),
            r"^report.json: operating_point.temperature: required key is missing$",
        ),
        (
            _set("artifacts.0.metrics.auc", "0.91"),
            r"artifacts.0.metrics.auc: input should be a valid number \(got '0.91",
        ),
        (_set("artifacts.0.clinical.grading", None), r"artifacts.0.clinical.grading: "),  # absent, never null
        (_set("artifacts.1.parity.n", 8), r"artifacts.1.parity.n: unknown key"),  # a torch row: parity with itself
        (_set("data.counts.test.referable", 1.5), r"data.counts.test.referable: input should be a valid integer"),
        (
            _set("bundle", {"error": "no artifact meets the endpoints", "skipped": "x"}),
            r"^report.json: bundle.skipped: ",
        ),
        (_set("artifacts.0.compression", {"method": "int4"}), r"artifacts.0.compression: method must be channel, "),
    ],
)
def test_a_bad_key_or_value_is_named_by_its_path(real_report, change, message):
    change(real_report)
    with pytest.raises(ReportSchemaError, match=message):
        validate_report(real_report)


@pytest.mark.parametrize(
    "bundle",
    [
        {"error": "bundle: no artifact on openvino meets the accuracy guard, evaluate.endpoints and ... (...)"},
        {"skipped": "no openvino or onnxruntime row in the bench to ship; add one to bench.runtimes"},
    ],
)
def test_the_bundle_that_could_not_be_made_or_was_skipped_is_typed(real_report, bundle):
    """The two forms stage_bundle records instead of a bundle (the error form is also checked on a real failure in
    tests/runtime/test_bundle.py)."""
    real_report["bundle"] = bundle
    assert validate_report(real_report).bundle.model_dump() == bundle


def test_the_schema_module_is_torch_free():
    code = (
        "import sys, tlcompile.report.schema; heavy = {'torch', 'numpy', 'tlcompile.recipe', 'tlcompile.compress', "
        "'tlcompile.train', 'tlcompile.data', 'tlcompile.models', 'tlcompile.export'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_schema_prints_the_json_schema_and_writes_only_a_new_file(tmp_path, monkeypatch, capsys):
    from tlcompile.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["tlcompile", "report", "schema", *args])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code

    assert run() == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == report_json_schema() and printed["title"] == "tlcompile report.json"
    assert printed["additionalProperties"] is False and {"Row", "Guard", "Clinical", "Bundle"} <= set(printed["$defs"])
    out = tmp_path / "report.schema.json"
    assert run("--out", str(out)) == 0
    assert json.loads(out.read_text()) == printed and f"wrote {out}" in capsys.readouterr().out
    out.write_text("mine")
    assert run("--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out '{out}' already exists; give a new file name (nothing was written)\n"
    assert out.read_text() == "mine"
