"""The CLI's own words: --version, build --help naming the recipe sections, no value types on flags, and a models
list that is fast on the second run and shows every name whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tlcompile import __version__
from tlcompile.cli import RECIPE_SECTIONS, app, model_rows

runner = CliRunner()


def test_version():
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"tlcompile {__version__}"


def test_build_help_lists_every_recipe_section_and_points_to_the_schema(monkeypatch):
    from tlcompile.recipe import Recipe

    assert set(RECIPE_SECTIONS) == set(Recipe.model_fields)  # a new section must be named in the help too
    monkeypatch.setenv("COLUMNS", "100")
    text = " ".join(runner.invoke(app, ["build", "--help"]).output.split())
    assert "tlcompile recipe schema" in text
    for section in RECIPE_SECTIONS:
        assert f" {section}," in text or f" {section}." in text, section


@pytest.mark.parametrize("args", [["--help"], ["build", "--help"], ["bench", "--help"], ["verify", "--help"]])
def test_flags_show_no_value_type(args):
    out = runner.invoke(app, args)
    assert out.exit_code == 0 and "<bool>" not in out.output


def test_models_are_cached_and_a_hit_needs_no_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCOMPILE_CACHE", str(tmp_path))
    import tlcompile.models as models

    calls = []
    real = models.count_macs

    def counting(model, size):
        calls.append(size)
        return real(model, size)

    monkeypatch.setattr(models, "count_macs", counting)
    first = model_rows(64, 2)
    assert len(calls) == len(models.list_models())
    # The cached numbers are the real ones.
    m = models.get_model("mobilenet_v3_small", num_classes=2)
    row = next(r for r in first if r["model"] == "mobilenet_v3_small")
    assert row["params"] == models.count_params(m) and row["macs"] == real(m, 64)
    assert model_rows(64, 2) == first and len(calls) == len(models.list_models())  # a hit counts nothing
    model_rows(96, 2)  # another size is another key
    assert len(calls) == 2 * len(models.list_models())
    # A hit in a process where torch cannot be imported, at 80 columns: every name whole.
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['tlcompile', 'models', '--size', '64']; "
        "from tlcompile.cli import main; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "TLCOMPILE_CACHE": str(tmp_path),
            "COLUMNS": "80",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": ":".join(p for p in sys.path if p),
        },
    )
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and max(len(line) for line in out.stdout.splitlines()) <= 80
    for name in models.list_models():
        assert name in out.stdout
    # A damaged cache file is recomputed, not trusted.
    for f in (tmp_path / "tlcompile").glob("models-*.json"):
        f.write_text("{not json")
    assert model_rows(64, 2) == first
    assert json.loads(next((tmp_path / "tlcompile").glob("models-*.json")).read_text())


@pytest.mark.parametrize("user_value", [None, "2"])
def test_the_command_runs_numpy_blas_on_one_thread_unless_told(user_value):
    """numpy's OpenBLAS threads spin between products and take a core from the runtimes' own threads: the command
    (cli.main) sets OPENBLAS_NUM_THREADS=1 before any command imports numpy, and keeps a value the user set."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    code = (
        "import sys; sys.argv = ['tlcompile', '--version']; import tlcompile.cli as cli\n"
        "assert 'numpy' not in sys.modules, 'the CLI module imports numpy: the setting would come too late'\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "import numpy, threadpoolctl, json\n"
        "print(json.dumps([i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(p for p in sys.path if p)}
    if user_value is not None:
        env["OPENBLAS_NUM_THREADS"] = user_value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.splitlines()[-1])
    assert threadpoolctl and counts, "numpy's BLAS was not found"
    # OpenBLAS runs no more threads than the CPUs it may use.
    expected = 1 if user_value is None else min(int(user_value), len(os.sched_getaffinity(0)))
    assert set(counts) == {expected}, counts


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["predict"], "tlcompile predict: Missing argument 'bundle'; see 'tlcompile predict --help'"),
        (
            ["predict", "b", "x.jpg", "--workers", "abc"],
            "tlcompile predict: --workers 'abc' is not valid: Input should be a valid integer",
        ),
        (["predict", "b", "x.jpg", "--workers=2x"], "tlcompile predict: --workers '2x' is not valid"),
        (["frobnicate"], "tlcompile: No such command 'frobnicate'; see 'tlcompile --help'"),
        (["build", "--nope", "r.yaml"], "tlcompile build: No such option: --nope; see 'tlcompile build --help'"),
        (["verify", "--threads"], "tlcompile verify: Option '--threads' requires an argument"),
        # a runtime asked for 100,000 threads starts them all (a 2-core box ran out of memory)
        *(
            ([*cmd, "--threads", "100000"], "--threads 100000 is out of range; valid: a whole number of threads from 1")
            for cmd in (["predict", "b", "x.jpg"], ["verify", "b"], ["serve", "b", "--watch", "w"])
        ),
        (["data", "synth", "--nope"], "tlcompile data synth: No such option: --nope"),
        (
            ["serve", "b", "--watch", "w", "--patient-id-system", "urn:oid:1.2"],
            "--patient-id-system 'urn:oid:1.2' goes into FHIR bundles only; valid: with --fhir or --fhir-url",
        ),
        (
            ["serve", "b", "--watch", "w", "--fhir", "--patient-id-system", "hospital MRN"],
            "--patient-id-system 'hospital MRN' has a space, a control character or a character outside ASCII in it",
        ),
        # a recipe's num_images is capped at 200,000; 99,999,999,999 at 4096 px ran silently until killed
        (
            ["data", "synth", "--n", "99999999999"],
            "tlcompile data synth: --n '99999999999' is not valid: Input should be less than or equal to 200000",
        ),
        # an option's missing value in a nested command was reported by its group's context
        (["data", "synth", "--out"], "tlcompile data synth: Option '--out' requires an argument"),
        (["bundle", "sign", "b", "--replace=1"], "tlcompile bundle sign: Option '--replace' does not take a value"),
        # an empty value is the current folder to Python: serve --watch "$DIR" with DIR unset watched where it ran
        (
            ["serve", "b", "--watch", "", "--once"],
            "tlcompile serve: the value after --watch is empty (''); give a value",
        ),
        (["serve", "b", "--watch=", "--once"], "tlcompile serve: the value of --watch is empty (''); give a value"),
        (["data", "synth", "-o", ""], "tlcompile data synth: the value after -o is empty ('')"),
        (["predict", "b", ""], "tlcompile predict: an argument is empty (''); give a value"),
        # click reads a short option's -o=x as the value '=x' (a build wrote into a folder named '=')
        (["build", "r.yaml", "-o="], "tlcompile build: '-o=': a short option takes its value after a space (-o VALUE)"),
        (["build", "r.yaml", "-o=out"], "tlcompile build: '-o=out': a short option takes its value after a space"),
        # a line break inside a value stays on the one line, escaped
        (["verify", "no\nsuch"], "bundle 'no\\nsuch' is not a folder"),
        (["serve", "b", "--interval", "1\n2"], "tlcompile serve: --interval '1\\n2' is not valid"),
    ],
)
def test_a_usage_mistake_is_one_line_naming_what_was_given_and_where_help_is(argv, line, monkeypatch, capsys):
    """click's usage block and error box (five lines or more, the value not always named) become one line on stderr,
    exit code 2, like every other user mistake."""
    from tlcompile.cli import main

    monkeypatch.setattr(sys, "argv", ["tlcompile", *argv])
    with pytest.raises(SystemExit) as stopped:
        main()
    out, err = capsys.readouterr()
    assert stopped.value.code == 2 and out == ""
    assert err.startswith(f"error: {line}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["data"], 2), (["--version"], 0), (["verify", "--help"], 0), (["-h"], 0), (["data", "synth", "-h"], 0)],
)
def test_help_version_and_a_group_named_alone_print_to_stdout(argv, code, monkeypatch, capsys):
    from tlcompile.cli import main

    monkeypatch.setattr(sys, "argv", ["tlcompile", *argv])
    with pytest.raises(SystemExit) as stopped:
        main()
    out, err = capsys.readouterr()
    assert stopped.value.code == code and out.strip() and "error" not in err, (out, err)


def test_verify_of_a_path_that_is_not_a_bundle_is_one_line_but_json_for_a_monitor(tmp_path, monkeypatch, capsys):
    from tlcompile.cli import main

    missing = tmp_path / "no-bundle"
    for extra, code in (([], 2), (["--json"], 1)):
        monkeypatch.setattr(sys, "argv", ["tlcompile", "verify", str(missing), *extra])
        with pytest.raises(SystemExit) as stopped:
            main()
        out, err = capsys.readouterr()
        assert stopped.value.code == code
        if extra:  # the report a monitor parses: failed, with the reason
            report = json.loads(out)
            assert report["passed"] is False and "is not a folder" in json.dumps(report)
        else:
            assert (
                out == ""
                and err
                == f"error: bundle '{missing}' is not a folder; give the bundle/ folder a build "
                "wrote (BUILD_DIR/bundle)\n"
            )


@pytest.mark.parametrize("value", ["0", "abc", "-1", "100000", "²"])
def test_a_bad_thread_count_in_the_environment_is_one_line(value, monkeypatch, capsys, tmp_path):
    """TLCOMPILE_NUM_THREADS (a sweep's share of the cores) was used as given above the machine's CPUs (a runtime
    started them all) and silently ignored when not a number; now either is a one-line refusal naming it."""
    from tlcompile.cli import main

    monkeypatch.setenv("TLCOMPILE_NUM_THREADS", value)
    monkeypatch.setattr(sys, "argv", ["tlcompile", "data", "synth", "--n", "70", "--out", str(tmp_path / "synth")])
    with pytest.raises(SystemExit) as stopped:
        main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: TLCOMPILE_NUM_THREADS {value!r} (environment) is out of range; valid: "), err
    assert not (tmp_path / "synth").exists()
    monkeypatch.setattr(sys, "argv", ["tlcompile", "--version"])  # help and the version need no threads
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("tlcompile ")


def test_a_patient_register_is_an_absolute_ascii_uri():
    from tlcompile.errors import TlcompileError
    from tlcompile.runtime.outputs import check_identifier_system

    assert check_identifier_system("urn:oid:1.2.826.0.1.3680043") == "urn:oid:1.2.826.0.1.3680043"
    assert check_identifier_system("https://eye.example.org/mrn") == "https://eye.example.org/mrn"
    assert check_identifier_system("URN:UUID:6E8A5F7C-1B2D-4C3E-8F9A-0B1C2D3E4F5A") == (
        "urn:uuid:6e8a5f7c-1b2d-4c3e-8f9a-0b1c2d3e4f5a"  # one register, one string (as a DICOM file's is written)
    )
    assert check_identifier_system("URN:OID:1.2.3") == "urn:oid:1.2.3"
    for bad, said in (
        ("https://", "has no host"),
        ("MRN", "is not an absolute URI"),
        ("urn:oid:1.02", "is not a valid URN"),
        ("https://eye.example.org/m\u200brn", "outside ASCII"),
        ("C:/registers/mrn", "is not an absolute URI"),
    ):
        with pytest.raises(TlcompileError, match=said):
            check_identifier_system(bad)
