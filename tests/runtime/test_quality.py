"""The image-quality gate (tlcompile.runtime.quality): it flags every kind of degradation at a strong level, passes
the photos as taken and the real retina photograph, calibrates to its target, ships in the bundle (verify checks it,
an older bundle without one still runs), and predict / serve report its score and reasons, torch-free."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tlcompile.data import synthetic
from tlcompile.data.degrade import LEVELS, degrade, degraded_copies
from tlcompile.errors import BundleError
from tlcompile.runtime.bundle import load_bundle, verify_bundle, verify_lines
from tlcompile.runtime.manifest import manifest_entries
from tlcompile.runtime.predict import CSV_COLUMNS, check_csv_target, predict_paths
from tlcompile.runtime.preprocess import find_field
from tlcompile.runtime.quality import MEASURES, QualityGate, calibrate, measure

# A failed photo is flagged by the measure made for its kind (partial fields and heavy shadows also darken a side)
EXPECTED_REASON = {
    "blur": {"focus"},
    "dark": {"brightness"},
    "overexposed": {"saturated"},
    "partial": {"coverage", "evenness"},
    "glare": {"glare"},
    "eyelash": {"evenness", "brightness"},
    "uneven": {"evenness"},
}


@pytest.fixture(scope="module")
def gate() -> QualityGate:
    """A gate calibrated like the build does, on gradable photos and mild copies of a 'val' set (140 px, as the
    quickstart's raw frames)."""
    photos = list(synthetic.generate(30, seed=11, size=140)[0])
    copies = [c for c in degraded_copies(photos, seed=1, per_image=2) if c.gradable]
    measured = [measure(c.image, find_field(c.image)) for c in copies]
    limits, share = calibrate({k: np.array([m[k] for m in measured]) for k in MEASURES}, 0.97)
    assert share >= 0.97
    return QualityGate(limits=limits)


@pytest.fixture(scope="module")
def test_photos() -> list[np.ndarray]:
    return list(synthetic.generate(6, seed=12, size=140)[0])


def test_the_gate_flags_every_kind_at_a_strong_level_and_passes_the_photos(gate, test_photos):
    for i, photo in enumerate(test_photos):
        taken = gate.assess(photo, find_field(photo))
        assert taken.gradable and taken.score >= 0.5, (i, taken)
    for kind, levels in LEVELS.items():
        strongest = min(lvl for lvl, ok in levels if not ok) if kind in ("dark", "uneven") else levels[-1][0]
        for i, photo in enumerate(test_photos):
            copy = degrade(photo, kind, strongest, np.random.default_rng(i))
            a = gate.assess(copy, find_field(copy))
            assert not a.gradable and a.score < 0.5, (kind, i, a)
            assert set(a.reasons) & EXPECTED_REASON[kind], (kind, i, a)
            assert a.sentence(gate.limits).endswith("; retake")


def test_the_real_retina_photograph_passes_and_its_strong_degradations_do_not(gate):
    skdata = pytest.importorskip("skimage.data")
    real = np.asarray(Image.fromarray(skdata.retina()).resize((512, 512), Image.LANCZOS))
    a = gate.assess(real, find_field(real))
    # It passes, though with a margin of ~25% on focus: its vessels have less contrast than the generator's, on
    # whose photos the limits were calibrated (the README's quality section quotes the figures).
    assert a.gradable and a.score >= 0.5 and a.measures["focus"] > 1.15 * gate.limits["focus"], a
    for kind, levels in LEVELS.items():
        copy = degrade(real, kind, levels[-1][0], np.random.default_rng(0))
        assert not gate.assess(copy, find_field(copy)).gradable, kind


def test_a_photo_without_a_field_is_scored_zero(gate):
    a = gate.assess(np.zeros((64, 64, 3), np.uint8), None)
    assert a.reasons == ("field",) and a.score == 0.0 and "no field of view" in a.sentence(gate.limits)


def test_calibration_reaches_the_target_share_and_keeps_fixed_limits():
    rng = np.random.default_rng(0)
    n = 2000
    values = {
        "coverage": np.clip(rng.normal(0.99, 0.02, n), 0, 1),
        "focus": rng.lognormal(np.log(0.12), 0.2, n),
        "brightness": rng.normal(170, 30, n),
        "saturated": np.abs(rng.normal(0, 0.03, n)),
        "evenness": np.clip(rng.normal(0.85, 0.08, n), 0, 1),
        "glare": np.abs(rng.normal(0, 0.004, n)),
    }
    for target in (0.9, 0.95, 0.97):
        limits, share = calibrate(values, target)
        assert target <= share <= target + 0.01, (target, share)
    limits, _ = calibrate(values, 0.95, {"brightness": 35.0})
    assert limits["brightness"] == 35.0
    assert MEASURES["saturated"][2] <= limits["saturated"] <= MEASURES["saturated"][3]  # kept within its bounds


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("x", "expected an object"),
        ({"version": 99, "limits": {"focus": 0.1}}, "version is 99"),
        ({"version": 1, "limits": {"sharpness": 0.1}}, "sharpness: not a measure; valid: coverage"),
        ({"version": 1, "limits": {"focus": -1}}, "focus is -1; expected a finite number >= 0"),
        ({"version": 1, "limits": {"focus": True}}, "focus is True"),
    ],
)
def test_a_damaged_quality_block_is_one_line_naming_the_key(block, message):
    with pytest.raises(BundleError, match=message) as info:
        QualityGate.from_dict(block)
    assert "\n" not in str(info.value)


def _rehash(bundle) -> None:
    (bundle / "manifest.json").write_text(json.dumps({"files": manifest_entries(bundle)}))


def test_the_bundle_carries_the_gate_and_verify_checks_it(tiny_build, bundle_copy):
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    q = meta["quality"]
    assert set(q["limits"]) == set(MEASURES) and q["limits"]["focus"] == 0.0  # the tiny build fixes focus off
    assert q["imageability"]["split"] == "test" and 0 <= q["imageability"]["value"] <= 1
    assert tiny_build.report["quality"]["imageability"] == q["imageability"]
    assert len(q["golden"]) == len(meta["golden"]["images"])
    result = verify_bundle(bundle_copy, pin=False)
    assert result.ok and result.quality.present and result.quality.samples == len(q["golden"])
    assert any(line.startswith("  quality gate: pass") for line in verify_lines(result))

    # limits changed after the build (and the manifest re-hashed to hide it): the golden verdicts no longer follow
    q["limits"]["brightness"] = 250.0
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    unhashed = verify_bundle(bundle_copy, pin=False)
    assert not unhashed.ok and unhashed.manifest.problems  # the manifest catches the edit first
    _rehash(bundle_copy)
    tampered = verify_bundle(bundle_copy, pin=False)
    assert not tampered.ok and "quality.golden[0]" in tampered.quality.problems[0]
    assert verify_lines(tampered)[-1].startswith("FAIL: ") and "quality" in verify_lines(tampered)[-1]

    # a malformed block: load_bundle refuses it in one line
    q["limits"]["brightness"] = "dark"
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    _rehash(bundle_copy)
    with pytest.raises(BundleError, match="quality.limits.brightness is 'dark'"):
        load_bundle(bundle_copy)

    # a bundle from before the gate: no quality block; it loads, verifies and says the gate is absent
    del meta["quality"]
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    _rehash(bundle_copy)
    old = verify_bundle(bundle_copy, pin=False)
    assert old.ok and not old.quality.present
    assert "  quality gate: absent (a bundle built without one: photos are not checked for quality)" in verify_lines(
        old
    )
    assert load_bundle(bundle_copy).quality_gate is None


def _dark_copy(path, out):
    rgb = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(degrade(rgb, "dark", 0.12, np.random.default_rng(0))).save(out)
    return out


def test_predict_answers_ungradable_with_reasons_and_retake(tiny_build, tmp_path, fundus_images):
    bundle = load_bundle(tiny_build.bundle)
    good = fundus_images(tmp_path / "in", 2, size=128)
    dark = _dark_copy(good[0], tmp_path / "in" / "dark.png")
    results = predict_paths(bundle, bundle.open_session(), [*good, dark])
    for r in results[:2]:
        assert r.quality_score >= 0.5 and r.quality_reasons == "" and r.referral in ("refer", "no referral")
    d = results[2]
    assert d.referral == "ungradable" and d.ungradable and d.fov_found and d.referable_dr_probability is None
    assert d.quality_score < 0.5 and "brightness" in d.quality_reasons.split(";")
    assert d.ungradable_reason.startswith("ungradable image: too dark") and d.ungradable_reason.endswith("; retake")
    record = d.to_dict()  # what serve writes per photo (and FHIR reads)
    assert record["quality_reasons"] == d.quality_reasons and record["quality_score"] == d.quality_score


def test_the_results_csv_has_the_quality_columns_and_an_earlier_csv_is_still_ours(tmp_path):
    new = CSV_COLUMNS.index("quality_score")
    assert CSV_COLUMNS[new : new + 2] == ("quality_score", "quality_reasons")
    # The header of the results CSV before #16 (quality and explanation columns): still recognised as ours.
    earlier = tmp_path / "old.csv"
    earlier.write_text(",".join(CSV_COLUMNS[:new]) + "\nx.png,refer\n")
    assert CSV_COLUMNS[new - 1] == "ungradable_reason"
    assert check_csv_target(earlier) == earlier  # written by the tlcompile before the gate: may be replaced
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n")
    with pytest.raises(Exception, match="not a results CSV"):
        check_csv_target(foreign)


def test_torch_blocked_predict_runs_the_gate(tiny_build, bundle_copy, tmp_path, fundus_images, run_cli):
    folder = tmp_path / "camera"
    good = fundus_images(folder, 1, size=128)
    _dark_copy(good[0], folder / "dark.png")
    out_csv = tmp_path / "out.csv"
    cli = run_cli("predict", str(bundle_copy), str(folder), "--csv", str(out_csv), block_train_modules=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.endswith("ATTEMPTED:\n"), cli.stdout  # torch & co. were not even tried
    rows = {r["file"]: r for r in csv.DictReader(out_csv.open())}
    dark = rows[str(folder / "dark.png")]
    assert dark["referral"] == "ungradable" and "brightness" in dark["quality_reasons"]
    assert dark["ungradable_reason"].endswith("; retake") and float(dark["quality_score"]) < 0.5
    assert rows[str(good[0])]["referral"] in ("refer", "no referral")


def test_serve_records_the_quality_verdict_with_its_reasons(tiny_build, tmp_path, fundus_images):
    from tlcompile.runtime.serve import serve

    watch = tmp_path / "camera"
    good = fundus_images(watch, 1, size=128)
    _dark_copy(good[0], watch / "dark.png")
    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=lambda line: None)
    assert stats.results == 2
    records = {r["file"]: r for r in (json.loads(p.read_text()) for p in (watch / "results").glob("*.json"))}
    dark = records["dark.png"]
    assert dark["status"] == "ok" and dark["referral"] == "ungradable" and dark["referable_dr_probability"] is None
    assert "brightness" in dark["quality_reasons"] and dark["ungradable_reason"].endswith("; retake")
    assert records[good[0].name]["quality_score"] >= 0.5


def test_a_washed_out_photo_refused_by_the_fundus_check_also_gets_the_gates_reasons(tiny_build, tmp_path):
    bundle = load_bundle(tiny_build.bundle)
    photo = synthetic.generate(1, seed=3, size=128)[0][0]
    path = tmp_path / "washed.png"
    Image.fromarray(degrade(photo, "overexposed", 4.0, np.random.default_rng(0))).save(path)
    r = predict_paths(bundle, bundle.open_session(), [path])[0]
    assert r.referral == "ungradable" and r.referable_dr_probability is None
    assert r.ungradable_reason.startswith("not a fundus photograph")  # its colour no longer looks like a fundus
    assert "(image quality: " in r.ungradable_reason and "over-exposed" in r.ungradable_reason
    assert "saturated" in r.quality_reasons.split(";")
