"""`tlcompile bench`: rows from builds and files, torch-free, sweeps, Pareto front, results merge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from tlcompile.benchdata import eval_set_loader
from tlcompile.runtime.bench import (
    BenchError,
    BenchOptions,
    bench_table,
    discover_targets,
    mark_pareto,
    merge_results,
    read_results,
    run_bench,
)


@pytest.fixture
def tiny_build(tiny_build):
    """The folder of the tiny build the runtime tests share (tests/conftest.py): fp32 in ONNX and OpenVINO IR, and a
    bundle with both. Tests here read it and never write into it."""
    return tiny_build.out_dir


# Block torch before tlcompile is imported, as on an edge box where only `pip install tlcompile` ran.
TORCH_BLOCKED = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None; "
    "from tlcompile.cli import main; sys.argv = ['tlcompile'] + sys.argv[1:]; main()"
)


def test_bench_runs_without_torch(tiny_build, tmp_path):
    from tlcompile.benchdata import synthetic_camera_images

    out = tmp_path / "results.json"
    (photo,) = synthetic_camera_images(tmp_path / "photos", count=1, width=800, height=600)
    counts = sorted({1, min(2, os.cpu_count() or 1)})  # --threads above the machine's CPUs is refused
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TORCH_BLOCKED,
            "bench",
            str(tiny_build),
            "--iterations",
            "5",
            "--warmup",
            "1",
            "--threads",
            ",".join(map(str, counts)),
            "--batch",
            "1,2",
            "--budget-ms",
            "1000",
            "--out",
            str(out),
            "--e2e-image",
            str(photo),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "e2e preprocessing here: " in proc.stdout  # compiled loops, or numpy and Pillow and why
    runs = read_results(out)["runs"]
    rows = runs[0]["rows"]
    # 1 artifact x 2 runtimes x 2 thread counts (1 on a 1-CPU machine) x 2 batch sizes
    assert len(rows) == 2 * len(counts) * 2
    assert {(r["runtime"], r["threads"], r["batch"]) for r in rows} == {
        (rt, t, b) for rt in ("openvino", "onnxruntime") for t in counts for b in (1, 2)
    }
    for r in rows:
        assert r["latency_ms"]["p50"] > 0 and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"]
        assert r["peak_rss_mb"] > 0 and r["throughput_fps"] > 0 and r["first_inference_ms"] > 0
        assert r["exec_precision"] in ("f32", "bf16", "f16")
        assert r["within_budget"] is True
        assert r["gmacs_per_s"] > 0  # MACs come from the build report
        assert r["metrics"]["auc"] is not None and r["metrics_source"] == "build test split"
    assert runs[0]["host"]["cpu"]["usable_cores"] >= 1
    # --out appends: a second run keeps the first.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TORCH_BLOCKED,
            "bench",
            str(tiny_build / "05_export" / "fp32.onnx"),
            "--iterations",
            "3",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(read_results(out)["runs"]) == 2
    assert "torch" not in proc.stderr.lower() or "error" not in proc.stderr.lower()


def test_precision_is_what_ran(tiny_build):
    rows = run_bench([tiny_build], BenchOptions(runtimes=["openvino"], precision="f32", iterations=2, warmup=0))["rows"]
    assert rows[0]["exec_precision"] == "f32" and rows[0]["requested_precision"] == "f32"


def test_accuracy_through_runtime_with_data(tiny_build):
    recipe = tiny_build / "recipe.resolved.yaml"
    opts = BenchOptions(runtimes=["onnxruntime"], iterations=2, warmup=0)
    rows = run_bench([tiny_build], opts, eval_sets=eval_set_loader(recipe))["rows"]
    report = json.loads((tiny_build / "report.json").read_text())
    build_row = next(r for r in report["artifacts"] if r["runtime"] == "onnxruntime")
    # Same data, same split, same runtime, same threshold: the same AUC as the build measured.
    assert rows[0]["metrics_source"] == "bench --data"
    assert rows[0]["metrics"]["auc"] == pytest.approx(build_row["metrics"]["auc"], abs=1e-6)
    assert rows[0]["metrics"]["n"] == build_row["metrics"]["n"]


def test_end_to_end_on_camera_size_jpeg(tiny_build, tmp_path):
    from tlcompile.benchdata import synthetic_camera_images
    from tlcompile.runtime import fast_preprocess

    images = synthetic_camera_images(tmp_path, count=1, width=800, height=600)
    rows = run_bench(
        [tiny_build], BenchOptions(runtimes=["openvino"], iterations=5, warmup=1, e2e=True, e2e_images=images)
    )["rows"]
    e2e = rows[0]["e2e"]
    assert e2e["image_size"] == [800, 600]
    assert e2e["total_ms"] >= e2e["infer_ms"] > 0 and e2e["decode_ms"] > 0
    assert e2e["preprocessing"] == fast_preprocess.status()  # which loops ran: compiled, or numpy and Pillow and why


def test_pareto_front():
    def row(p50, auc):
        return {"latency_ms": {"p50": p50}, "metrics": {"auc": auc}}

    rows = [row(1.0, 0.80), row(2.0, 0.90), row(3.0, 0.85), row(0.5, 0.70), {"latency_ms": {"p50": 0.1}, "metrics": {}}]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True, None]


def test_merge_recomputes_the_front(tmp_path):
    def run(p50, auc, host):
        return {
            "runs": [
                {
                    "rows": [
                        {
                            "name": "m",
                            "runtime": "openvino",
                            "host": host,
                            "latency_ms": {"p50": p50},
                            "metrics": {"auc": auc},
                        }
                    ]
                }
            ]
        }

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(1.0, 0.8, "box-a")))
    b.write_text(json.dumps(run(2.0, 0.7, "box-b")))
    rows = merge_results([a, b])
    assert [(r["host"], r["pareto"]) for r in rows] == [("box-a", True), ("box-b", False)]
    console = Console(record=True, width=200)
    console.print(bench_table(rows, title="t"))
    assert "box-b" in console.export_text()  # several hosts: the table gets a host column


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        discover_targets([tmp_path / "nope.xml"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(BenchError, match="not a build folder"):
        discover_targets([tmp_path / "x.txt"])
    (tmp_path / "r.json").write_text("[1, 2]")
    with pytest.raises(BenchError, match="not a bench results file"):
        read_results(tmp_path / "r.json")
    # report merge's inputs: each names what it wanted, a photo without a codec's words
    wanted = "; give a results JSON written by tlcompile bench --out"
    with pytest.raises(BenchError, match=f"^results file '{tmp_path / 'none.json'}' does not exist{wanted}$"):
        read_results(tmp_path / "none.json")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(
        BenchError, match=f"^'{tmp_path / 'photo.png'}': not a bench results file \\(not text\\){wanted}$"
    ):
        read_results(tmp_path / "photo.png")
    # a row's values as the table formats them: a damaged or hand-edited one ended in a traceback there
    row = {"name": "fp32", "runtime": "onnxruntime", "latency_ms": {"p50": 1.0, "p90": 1.2}, "threads": 2}
    for edit, said in (
        ({"latency_ms": {"p50": "NaN"}}, "rows[0].latency_ms.p50 is 'NaN'; expected a finite number >= 0"),
        ({"latency_ms": {"p50": -1}}, "rows[0].latency_ms.p50 is -1"),
        ({"latency_ms": {"p90": 1.0}}, "rows[0].latency_ms.p50 is None"),
        ({"threads": "two"}, "rows[0].threads is 'two'"),
        ({"name": None}, "rows[0].name is None; expected a name"),
        ({"metrics": {"auc": float("inf")}}, "rows[0].metrics.auc is inf"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps({"runs": [{"rows": [{**row, **edit}]}]}))
        with pytest.raises(BenchError, match=re.escape(f"'{tmp_path / 'bad.json'}': runs[0].{said}")):
            read_results(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--threads", "0"], "--threads '0'"),
        (["--threads", "a"], "--threads 'a'"),
        (["--batch", "1,,2"], "--batch '1,,2': expected comma-separated whole numbers"),
        (["--batch", "1,100000"], "--batch '1,100000': value 100000 is out of range; valid: 1 to 1024"),
        (["--threads", "1,100000"], "--threads '1,100000': value 100000 is out of range; valid: a whole number of"),
        (["--precision", "int4"], "--precision 'int4'"),
        (["--runtime", "torch"], "--runtime 'torch'"),
    ],
)
def test_cli_option_errors(args, expected, tiny_build, capsys, monkeypatch):
    from tlcompile.cli import main

    monkeypatch.setattr(sys, "argv", ["tlcompile", "bench", str(tiny_build), *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_bundle_is_benched_as_it_deploys(tiny_build):
    bundle = tiny_build / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    recipe = tiny_build / "recipe.resolved.yaml"
    rows = run_bench([bundle], BenchOptions(iterations=2, warmup=0), eval_sets=eval_set_loader(recipe))["rows"]
    # One row per candidate the box may pin (the tiny build's fp32 on both runtimes).
    assert sorted(f"{r['name']}@{r['runtime']}" for r in rows) == sorted(c["id"] for c in meta["candidates"])
    row = next(r for r in rows if r["runtime"] == meta["model"]["runtime"])
    assert row["runtime"] == meta["model"]["runtime"] and row["requested_precision"] == meta["model"]["precision"]
    # Accuracy through the bundle's runtime, at the bundle's threshold and temperature, equals what the build measured.
    build_row = next(
        r
        for r in json.loads((tiny_build / "report.json").read_text())["artifacts"]
        if r["name"] == meta["artifact"]["name"] and r["runtime"] == row["runtime"]
    )
    assert row["metrics"]["threshold"] == pytest.approx(meta["operating_point"]["threshold"])
    if row["exec_precision"] == build_row["exec_precision"]:
        assert row["metrics"]["auc"] == pytest.approx(build_row["metrics"]["auc"], abs=1e-6)


def test_accuracy_on_a_folder_of_grades(tiny_build, tmp_path):
    import numpy as np
    from PIL import Image

    from tlcompile.data.synthetic import render_fundus

    for grade in range(5):
        (tmp_path / str(grade)).mkdir()
        for i in range(3):
            Image.fromarray(render_fundus(grade, np.random.default_rng([grade, i]), size=96)).save(
                tmp_path / str(grade) / f"{i}.png"
            )
    opts = BenchOptions(runtimes=["onnxruntime"], iterations=2, warmup=0)
    rows = run_bench([tiny_build], opts, eval_sets=eval_set_loader(tmp_path))["rows"]
    assert rows[0]["metrics"]["n"] == 15 and rows[0]["metrics_source"] == "bench --data"
    assert 0.0 <= rows[0]["metrics"]["auc"] <= 1.0


def test_latency_is_measured_in_rounds_until_the_p90_spread_is_small(monkeypatch):
    # Scripted rounds instead of sleeps: a timing-based version of this test failed on a busy CI box.
    import tlcompile.runtime.bench as bench_module
    from tlcompile.runtime.bench import BenchOptions, measure_in_rounds

    def scripted(p90s):
        feed = iter(p90s)

        def fake_measure_latency(run, warmup, iterations, min_seconds=0.0):
            p90 = next(feed)
            return {
                "p50": p90 * 0.9,
                "p90": p90,
                "p99": p90 * 1.1,
                "mean": p90 * 0.95,
                "min": p90 * 0.8,
                "first_ms": 50.0,
                "iterations": iterations,
            }

        return fake_measure_latency

    steady = BenchOptions(iterations=5, warmup=1, min_rounds=3, max_rounds=6, stable_spread=0.1)
    # An outlier round keeps the spread wide: every round is used and the row says it is not stable.
    monkeypatch.setattr(bench_module, "measure_latency", scripted([2.0, 2.05, 9.0, 2.02, 2.01, 2.0]))
    latency, stability = measure_in_rounds(lambda: None, steady)
    assert stability["rounds"] == 6 and not stability["stable"]
    monkeypatch.setattr(bench_module, "measure_latency", scripted([2.0, 2.05, 2.02, 9.0]))
    latency, stability = measure_in_rounds(lambda: None, steady)
    assert stability["rounds"] == 3 and stability["stable"] and latency["p90"] == 2.02
    assert latency["first_ms"] == 50.0 and latency["iterations"] == 15
    assert abs(stability["p90_spread_share"] - 0.05 / 2.02) < 1e-3
    # A box that gets busier every round never settles: all rounds are used and the row says it is not stable.
    monkeypatch.setattr(bench_module, "measure_latency", scripted([1.0, 1.2, 1.4, 1.6, 1.8]))
    _, stability = measure_in_rounds(
        lambda: None, BenchOptions(iterations=5, warmup=1, min_rounds=2, max_rounds=4, stable_spread=0.05)
    )
    assert stability["rounds"] == 4 and not stability["stable"] and stability["p90_spread_share"] > 0.05


def test_a_slow_row_stops_after_max_seconds_with_at_least_ten_timed_calls(monkeypatch):
    """bench.max_seconds: a 90 ms row (a fake-quantized model in torch) is not timed 50 times."""
    from tlcompile.runtime import latency as latency_module

    clock = {"now": 0.0}
    calls = []

    def run():
        calls.append(1)
        clock["now"] += 0.09  # a 90 ms call

    monkeypatch.setattr(latency_module.time, "perf_counter", lambda: clock["now"])
    got = latency_module.measure_latency(run, warmup=2, iterations=50, max_seconds=2.0)
    # Checked before each call: after 22 calls (1.98 s) it goes on, after 23 (2.07 s) it stops.
    assert got["iterations"] == 23 and len(calls) == 2 + 23 and abs(got["p50"] - 90.0) < 1e-6

    # Never fewer than ten timed calls, however slow each is; nor more than `iterations` when they are fewer.
    def very_slow():
        clock["now"] += 5.0

    assert latency_module.measure_latency(very_slow, warmup=0, iterations=50, max_seconds=2.0)["iterations"] == 10
    assert latency_module.measure_latency(run, warmup=0, iterations=4, max_seconds=0.01)["iterations"] == 4
    # Without a limit (null in the recipe), every iteration is timed.
    assert latency_module.measure_latency(run, warmup=0, iterations=50)["iterations"] == 50


def test_model_files_of_one_name_in_two_formats_are_told_apart(tmp_path):
    """`bench pruned.xml pruned.onnx -r openvino` printed two rows both 'pruned' on openvino (found outside-in)."""
    from tlcompile.runtime.bench import discover_targets

    for name in ("pruned.xml", "pruned.onnx", "fp32.onnx"):
        (tmp_path / name).write_bytes(b"")
    targets = discover_targets([tmp_path / "pruned.xml", tmp_path / "pruned.onnx", tmp_path / "fp32.onnx"])
    assert [t.name for t in targets] == ["pruned.xml", "pruned.onnx", "fp32"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fp32.onnx").write_bytes(b"")
    targets = discover_targets([tmp_path / "fp32.onnx", tmp_path / "b" / "fp32.onnx"])
    assert [t.name for t in targets] == [str(tmp_path / "fp32.onnx"), str(tmp_path / "b" / "fp32.onnx")]
