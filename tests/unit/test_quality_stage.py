"""The quality stage's own arithmetic (tlcompile/build/stages/quality.py): the gate's sensitivity/specificity and the
referral effect on constructed cases, the per-split cap, the shrink before degrading, and one referral row per bench
row with test logits."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tlcompile.build.stages.quality import (
    Measured,
    gate_metrics,
    headline,
    measure_splits,
    referral_effect,
    referral_rows,
    split_indices,
)
from tlcompile.data import synthetic
from tlcompile.data.degrade import degrade
from tlcompile.evaluate.clinical import wilson_interval
from tlcompile.recipe import validate_recipe_dict
from tlcompile.runtime.preprocess import find_field
from tlcompile.runtime.quality import WORK_RADIUS, measure, shrink


def _m(kind: str, level: float, gradable: bool) -> Measured:
    return Measured(0, kind, level, gradable, None)


def test_gate_metrics_on_a_constructed_case():
    # 4 gradable (3 passed), 5 ungradable (4 caught: 1 blur passed by mistake)
    copies = [_m("none", 0, True)] * 2 + [_m("blur", 0.003, True)] * 2 + [_m("blur", 0.04, False)] * 3
    copies += [_m("dark", 0.2, False)] * 2
    passed = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0], bool)
    g = gate_metrics(copies, passed)
    assert (g["copies"], g["ungradable"]) == (9, 5)
    assert (g["sensitivity"]["k"], g["sensitivity"]["n"]) == (4, 5)
    assert (g["specificity"]["k"], g["specificity"]["n"]) == (3, 4)
    assert g["sensitivity"]["ci"] == pytest.approx(list(wilson_interval(4, 5)))
    assert g["by_kind"]["blur"]["0.04"] == {"gradable": False, "passed": g["by_kind"]["blur"]["0.04"]["passed"]}
    assert g["by_kind"]["blur"]["0.04"]["passed"]["k"] == 1 and g["by_kind"]["dark"]["0.2"]["passed"]["k"] == 0
    assert g["by_kind"]["blur"]["0.003"]["passed"]["k"] == 1


def test_referral_effect_on_a_constructed_case():
    # 2-class logits: P(referable) = sigmoid(l1 - l0); threshold 0.5 => refer iff l1 > l0
    refer = np.array([1, 1, 0, 1, 0, 0, 0, 1], bool)
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    logits = np.stack([np.zeros(8), np.where(refer, 2.0, -2.0)], axis=1).astype(np.float32)
    passed = np.array([1, 1, 0, 1, 1, 1, 0, 0], bool)  # the missed referable photo (2) was ungradable
    r = referral_effect(logits, truth, passed, threshold=0.5, temperature=1.0)
    # all: referable 0,1,2,7 -> caught 0,1,7 = 3/4; non-referable 3,4,5,6 -> not referred 4,5,6 = 3/4
    assert (r["all_images"]["sensitivity"]["k"], r["all_images"]["sensitivity"]["n"]) == (3, 4)
    assert (r["all_images"]["specificity"]["k"], r["all_images"]["specificity"]["n"]) == (3, 4)
    # gradable only (0,1,3,4,5): referable 0,1 -> 2/2; non-referable 3,4,5 -> 2/3
    assert (r["gradable_only"]["sensitivity"]["k"], r["gradable_only"]["sensitivity"]["n"]) == (2, 2)
    assert (r["gradable_only"]["specificity"]["k"], r["gradable_only"]["specificity"]["n"]) == (2, 3)
    assert (r["share_graded"]["k"], r["share_graded"]["n"]) == (5, 8)
    assert r["share_graded"]["ci"] == pytest.approx(list(wilson_interval(5, 8)))
    assert r["gradable_only"]["specificity"]["ci"] == pytest.approx(list(wilson_interval(2, 3)))


def _recipe(cap: int = 3000, n: int = 60):
    return validate_recipe_dict(
        {
            "seed": 4,
            "data": {"source": "synthetic", "num_images": n, "image_size": 32, "split": {"val": 0.25, "test": 0.25}},
            "quality": {"max_photos_per_split": cap},
        }
    )


def test_the_cap_is_a_deterministic_sorted_sample_of_the_split():
    from tlcompile.data.datamodule import load_data

    recipe = _recipe(cap=10, n=200)
    data = load_data(recipe.data, seed=recipe.seed)
    full = np.flatnonzero(data.split == "test")
    a, b = split_indices(data, recipe, "test"), split_indices(data, recipe, "test")
    assert len(full) > 10 and len(a) == 10 and np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert set(a) <= set(full)
    assert not np.array_equal(a, split_indices(data, recipe, "val"))
    assert np.array_equal(split_indices(data, _recipe(cap=3000, n=200), "test"), full)
    idx, measured, _ = measure_splits(data, recipe, 2)["test"]
    assert np.array_equal(idx, a) and len(measured) == 10 * 3
    assert {m.index for m in measured} == set(a.tolist())


def test_shrink_keeps_the_field_and_what_the_measures_see():
    big = synthetic.render_fundus(0, np.random.default_rng(1), size=1400, difficulty=0.3)
    small = shrink(big)
    f_big, f_small = find_field(big), find_field(small)
    assert f_small.radius <= 4 * WORK_RADIUS + 1 < f_big.radius
    assert shrink(small) is small  # already small enough: unchanged
    a, b = measure(big, f_big), measure(small, f_small)
    for k in ("coverage", "brightness", "saturated", "evenness"):
        assert b[k] == pytest.approx(a[k], abs=0.03 * max(1.0, a[k])), k
    # a degradation defined in field radii gives the same verdict-relevant change at either size
    rng = np.random.default_rng(0)
    hb = degrade(big, "partial", 0.5, rng)
    hs = degrade(small, "partial", 0.5, np.random.default_rng(0))
    cb, cs = measure(hb, find_field(hb))["coverage"], measure(hs, find_field(hs))["coverage"]
    assert cs == pytest.approx(cb, abs=0.05)


def test_referral_rows_cover_every_bench_row_on_the_photos_used(tmp_path):
    split = np.array(["train", "test", "test", "val", "test", "test"])
    targets = np.array([0, 1, 0, 0, 1, 0])
    all_test = np.flatnonzero(split == "test")  # 1, 2, 4, 5
    refer_fp32 = np.array([1, 0, 1, 0], bool)  # per test photo
    refer_int8 = np.array([1, 1, 0, 0], bool)
    rows = []
    for name, refer in (("fp32", refer_fp32), ("int8", refer_int8)):
        logits = np.stack([np.zeros(4), np.where(refer, 2.0, -2.0)], axis=1).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", logits)
        rows.append({"name": name, "runtime": "onnxruntime", "logits_path": f"{name}.npy"})
    rows.append({"name": "pruned", "runtime": "openvino"})  # no logits: no row
    ctx = SimpleNamespace(
        data=SimpleNamespace(split=split, targets=targets),
        out_dir=tmp_path,
        bench_rows=rows,
        operating_point={"threshold": 0.5, "temperature": 1.0},
    )
    used = np.array([1, 4, 5])  # photo 2 left out by the cap
    out = referral_rows(ctx, used, np.array([True, True, False]))
    assert [r["artifact"] for r in out] == ["fp32@onnxruntime", "int8@onnxruntime"]
    fp32, int8 = out
    assert (fp32["all_images"]["sensitivity"]["k"], fp32["all_images"]["sensitivity"]["n"]) == (2, 2)
    assert (int8["all_images"]["sensitivity"]["k"], int8["all_images"]["sensitivity"]["n"]) == (1, 2)
    assert (fp32["share_graded"]["k"], fp32["share_graded"]["n"]) == (2, 3)
    assert all_test.tolist() == [1, 2, 4, 5]


def test_the_report_section_validates_and_shows_every_artifacts_referral_row():
    from tlcompile.evaluate.clinical import proportion
    from tlcompile.report.quality import QualitySection, quality_parts

    copies = [_m("none", 0, True), _m("blur", 0.04, False)]
    metrics = gate_metrics(copies, np.array([True, False]))
    logits = np.array([[0.0, 2.0], [0.0, -2.0]], np.float32)
    effect = referral_effect(logits, np.array([1, 0]), np.array([True, True]), 0.5, 1.0)
    rows = [{"artifact": "fp32@openvino", **effect}, {"artifact": "pruned@onnxruntime", **effect}]
    record = {
        "version": 1,
        "target_gradable": 0.97,
        "limits": {"focus": 0.08},
        "limits_source": {"focus": "calibrated on val"},
        "calibration": {
            "split": "val",
            "photos": 10,
            "photos_in_split": 40,
            "gradable_used": 5,
            "share_passing": 0.97,
            "copies_per_image": 1,
            "gate_on_val": metrics,
        },
        "test": metrics,
        "test_photos": {"used": 10, "in_split": 40},
        "imageability": {"split": "test", **proportion(1, 1)},
        "ms_per_photo": 1.2,
        "referral": rows[0],
        "referral_headline": "fp32; the bundle's candidate is chosen after this stage and may be another row",
        "referral_by_artifact": rows,
    }
    QualitySection.model_validate(record)
    paragraphs, tables = quality_parts({"quality": record})
    text = " ".join(paragraphs)
    assert "correlated" in text and "may be another row" in text and "10 of the 40 test photos" in text
    per_row = next(t for t in tables if "per artifact" in t[0])
    assert [r[0] for r in per_row[2]] == ["fp32@openvino", "pruned@onnxruntime"]


def test_the_headline_row_is_the_named_bundle_artifact_else_fp32():
    rows = [{"artifact": a} for a in ("fp32@openvino", "pruned@openvino", "pruned@onnxruntime")]

    def recipe(bundle):
        return validate_recipe_dict({"data": {"source": "synthetic"}, "prune": {}, "bundle": bundle})

    assert headline(recipe({}), rows)[0]["artifact"] == "fp32@openvino"  # select: fastest is decided later
    row, why = headline(recipe({"select": "name", "artifact": "pruned", "runtime": "onnxruntime"}), rows)
    assert row["artifact"] == "pruned@onnxruntime" and "ships" in why
    assert headline(recipe({"select": "name", "artifact": "pruned"}), rows)[0]["artifact"] == "pruned@openvino"
    assert headline(recipe({}), rows[1:])[0]["artifact"] == "pruned@openvino"


def test_val_and_test_measured_in_two_processes_are_what_one_process_measures(tmp_path):
    """The quality stage measures val and test at once in two processes where the tlcompile command allows worker
    processes: the same measures, in the same order, as one after the other in this process."""
    script = tmp_path / "two_processes.py"
    script.write_text(
        "import os, pickle, sys\n"
        "def pid(_):\n"
        "    return os.getpid()\n"
        "if __name__ == '__main__':\n"  # the workers import this script: torch (the build's modules) only here
        "    from tlcompile.build.stages import quality\n"
        "    from tlcompile.data.datamodule import allow_worker_processes, load_data, process_map\n"
        "    from tlcompile.data.degrade import measure_photos\n"
        "    from tlcompile.recipe import validate_recipe_dict\n"
        "    allow_worker_processes()\n"
        "    quality.PHOTOS_FOR_TWO_PROCESSES = 0\n"
        "    recipe = validate_recipe_dict({'name': 't', 'seed': 4, 'data': {'source': 'synthetic', "
        "'num_images': 32, 'image_size': 32, 'split': {'val': 0.25, 'test': 0.25}}})\n"
        "    data = load_data(recipe.data, seed=recipe.seed)\n"
        "    asked = []\n"  # the workers measure_splits asks process_map for
        "    quality.process_map = lambda fn, tasks, workers: asked.append(workers) or process_map(fn, tasks, "
        "workers=workers)\n"
        "    both = quality.measure_splits(data, recipe, 2)\n"
        "    one = {s: (quality.split_indices(data, recipe, s), *measure_photos((data.photo_source(), "
        "quality.split_indices(data, recipe, s), recipe.seed + k, 2))) for k, s in enumerate(('val', 'test'))}\n"
        "    pids = set(process_map(pid, [0, 1], workers=2))\n"
        "    pickle.dump((both, one, asked, pids, os.getpid()), open(sys.argv[1], 'wb'))\n"
    )
    out = tmp_path / "out.pkl"
    env = {**os.environ, "TLCOMPILE_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    both, one, asked, pids, parent = pickle.loads(out.read_bytes())
    assert asked == [2]  # val and test went to process_map with two workers ...
    assert pids and parent not in pids  # ... which runs its tasks in worker processes
    for split in ("val", "test"):
        (idx_a, measured_a, _), (idx_b, measured_b, _) = both[split], one[split]
        assert np.array_equal(idx_a, idx_b) and len(measured_a) == 3 * len(idx_a) > 0
        assert measured_a == measured_b
