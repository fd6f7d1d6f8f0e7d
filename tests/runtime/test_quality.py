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


def test_a_gate_validated_on_colour_only_refuses_a_monochrome_photo_and_an_older_gate_decides_it(gate, test_photos):
    """A red-free photo (its green channel as grey) got a referral at P 0.69 from a model trained and tested on colour
    photographs (0.007 in colour): outside what the build validated. The gate's 'chroma' limit says so."""
    from tlcompile.runtime.screen import MONOCHROME_CHROMA

    colour = test_photos[0]
    red_free = np.repeat(colour[:, :, 1:2], 3, axis=2)
    assert measure(colour, find_field(colour))["chroma"] > 3 * MONOCHROME_CHROMA
    assert measure(red_free, find_field(red_free))["chroma"] == 0.0
    strict = QualityGate(limits={**gate.limits, "chroma": float(MONOCHROME_CHROMA)})
    assert strict.colour_only and not gate.colour_only
    a = strict.assess(red_free, find_field(red_free))
    assert not a.gradable and "chroma" in a.reasons and a.score == 0.0
    assert "monochrome (red-free) photograph, and this model was validated on colour photographs only (chroma 0, " \
        "limit 12)" in a.sentence(strict.limits)  # fmt: skip
    assert strict.assess(colour, find_field(colour)).reasons == gate.assess(colour, find_field(colour)).reasons
    assert gate.assess(red_free, find_field(red_free)).reasons == tuple(r for r in a.reasons if r != "chroma")
    assert QualityGate.from_dict(strict.to_dict()) == strict  # in bundle.json as one more limit


def test_a_photo_brighter_than_every_validated_one_is_ungradable_for_its_exposure(gate, test_photos):
    """An over-exposed copy (Pillow's Brightness 1.75x) of the retina photo, non-referable at P 0.007, was referred at
    P 0.94 with no quality reason: its green channel, which 'saturated' counts, had not reached 200 yet."""
    from PIL import ImageEnhance

    from tlcompile.build.stages.quality import _verdicts
    from tlcompile.data.degrade import Measured

    photo = test_photos[0]
    green = measure(photo, find_field(photo))["green_median"]
    capped = QualityGate(limits={**gate.limits, "green_median": green})
    at_limit = capped.assess(photo, find_field(photo))
    # at the limit: its score is 0.5 there (as every measure's), so a golden frame (>= 0.52) is never one this close
    assert at_limit.reasons == gate.assess(photo, find_field(photo)).reasons and at_limit.score <= 0.5
    bright = np.asarray(ImageEnhance.Brightness(Image.fromarray(photo)).enhance(1.75))
    a = capped.assess(bright, find_field(bright))
    assert a.measures["green_median"] > green and "green_median" in a.reasons and a.score < 0.5
    said = f"(green_median {a.measures['green_median']:.3g}, limit {green:.3g})"
    assert f"over-exposed beyond every photo the model was validated on {said}" in a.sentence(capped.limits)
    assert "green_median" not in gate.assess(bright, find_field(bright)).reasons  # a gate built before: as before
    assert QualityGate.from_dict(capped.to_dict()) == capped
    # an older tlcompile refuses such a gate instead of deciding without the limit (as this one refuses an unknown one)
    with pytest.raises(BundleError, match=r"limits\.sharpness: not a measure; valid: chroma, green_median, coverage, "):
        QualityGate.from_dict({**capped.to_dict(), "limits": {**capped.limits, "sharpness": 1.0}})
    # the stage's verdicts on copies decide as the gate does
    copies = [Measured(0, "none", 0.0, True, measure(photo, find_field(photo))),
              Measured(0, "exposure", 1.75, True, a.measures)]  # fmt: skip
    assert _verdicts(copies, capped.limits).tolist() == [at_limit.gradable, False]


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
        ({"version": 1, "limits": {"sharpness": 0.1}}, "sharpness: not a measure; valid: chroma, green_"),
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
    assert set(q["limits"]) == {*MEASURES, "chroma", "green_median", "green_low"}
    assert q["limits"]["focus"] == 0.0  # focus fixed off
    assert q["imageability"]["split"] == "test" and 0 <= q["imageability"]["value"] <= 1
    assert tiny_build.report["quality"]["imageability"] == q["imageability"]
    # what the build validated on, carried to the box: colour photos only, and up to this exposure
    report_q = tiny_build.report["quality"]
    assert report_q["colour_only"] is True and report_q["photos_as_taken"]["monochrome"] == 0
    assert q["limits"]["chroma"] == 12.0 and q["limits"]["green_median"] == report_q["max_green_median"] > 0
    assert report_q["limits_source"]["green_median"] == "the val photos as taken"
    # ... and no darker than the darkest of them: the calibrated limit is at most 60, every synthetic photo brighter
    assert report_q["min_brightness"] > 60 and q["limits"]["brightness"] == report_q["min_brightness"]
    assert report_q["limits_source"]["brightness"] == "the val photos as taken"
    # ... and no darker in green than the darkest of them (a gamma or a green cast leaves the brightness in range)
    assert q["limits"]["green_low"] == report_q["min_green_median"] > 0
    assert report_q["limits_source"]["green_low"] == "the val photos as taken"
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
    lines: list[str] = []
    stats = serve(tiny_build.bundle, watch, once=True, settle=0, log=lines.append)
    assert stats.results == 2
    records = {r["file"]: r for r in (json.loads(p.read_text()) for p in (watch / "results").glob("*.json"))}
    dark = records["dark.png"]
    assert dark["status"] == "ok" and dark["referral"] == "ungradable" and dark["referable_dr_probability"] is None
    assert "brightness" in dark["quality_reasons"] and dark["ungradable_reason"].endswith("; retake")
    assert records[good[0].name]["quality_score"] >= 0.5
    # the log says why too (it said only 'ungradable'): what the person at the camera must fix
    assert any(line.startswith(f"dark.png: ungradable ({dark['ungradable_reason']}) -> ") for line in lines), lines


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


def _golden_bundle(root, photo, limits):
    """A bundle folder holding one golden frame and the gate's stored verdict on it (what check_quality reads)."""
    (root / "golden").mkdir(parents=True)
    Image.fromarray(photo).save(root / "golden" / "000.png")
    a = QualityGate(limits=limits).assess(photo, find_field(photo))
    golden = [{"image": "golden/000.png", "score": float(a.score), "reasons": list(a.reasons)}]
    return {"quality": {"version": 1, "limits": dict(limits), "golden": golden}}, a


def _one_level_off(photo, share=0.03, seed=9):
    rng = np.random.default_rng(seed)
    moved = (rng.random(photo.shape[:2]) < share) * rng.choice([-1, 1], size=photo.shape[:2])
    return np.clip(photo.astype(np.int16) + moved[:, :, None], 0, 255).astype(np.uint8)


def test_the_golden_quality_check_tolerates_one_grey_level_but_not_an_edit(tmp_path):
    """Pillow builds may resize a golden frame one rounding step apart: near a limit that moves the score by ~0.01 and
    can flip the verdict on that measure. verify must pass such a box, and still fail an edited limit or score."""
    from tlcompile.runtime.quality import SCORE_TOLERANCE, check_quality

    photo = synthetic.generate(6, seed=3, size=224)[0][2]
    focus = measure(photo, find_field(photo))["focus"]
    limits = {k: MEASURES[k][1] for k in MEASURES} | {"focus": focus * 0.999}  # passes, barely
    meta, stored = _golden_bundle(tmp_path / "b", photo, limits)
    assert stored.gradable and abs(stored.score - 0.5) < 0.01
    assert check_quality(tmp_path / "b", meta, "bundle.json", 0).ok

    off = _one_level_off(photo)
    Image.fromarray(off).save(tmp_path / "b" / "golden" / "000.png")
    got = QualityGate(limits=limits).assess(off, find_field(off))
    # the strict check (|score diff| <= 1e-3 and identical reasons) would refuse this box
    assert abs(got.score - stored.score) > SCORE_TOLERANCE or got.reasons != stored.reasons
    check = check_quality(tmp_path / "b", meta, "bundle.json", 0)
    assert check.ok and check.samples == 1, check.problems

    # an edited score or limit in bundle.json still fails, on the perturbed frame too
    edited = json.loads(json.dumps(meta))
    edited["quality"]["golden"][0]["score"] = round(stored.score + 0.1, 4)
    assert "score differs" in check_quality(tmp_path / "b", edited, "bundle.json", 0).problems[0]
    edited = json.loads(json.dumps(meta))
    edited["quality"]["limits"]["brightness"] = 250.0
    assert not check_quality(tmp_path / "b", edited, "bundle.json", 0).ok
    edited = json.loads(json.dumps(meta))
    edited["quality"]["limits"]["focus"] = focus * 1.2  # the verdict flips on a measure clear of the edited limit
    assert not check_quality(tmp_path / "b", edited, "bundle.json", 0).ok


def test_the_golden_tolerance_holds_over_many_one_level_perturbations():
    from tlcompile.runtime.quality import golden_mismatch, golden_tolerance

    photos = synthetic.generate(6, seed=3, size=224)[0]
    failures = []
    for n, photo in enumerate(photos):
        found = find_field(photo)
        m = measure(photo, found)
        for name in ("focus", "evenness", "brightness"):
            limits = {k: MEASURES[k][1] for k in MEASURES} | {name: m[name] * 1.0005}  # fails, barely
            gate = QualityGate(limits=limits)
            stored = gate.assess(photo, found)
            for seed in range(10, 14):
                off = _one_level_off(photo, share=0.04, seed=seed)
                f = find_field(off)
                got = gate.assess(off, f)
                tol, score_tol = golden_tolerance(off, f, limits)
                why = golden_mismatch(got, stored.score, list(stored.reasons), tol, score_tol, limits)
                if why:
                    failures.append((n, name, seed, why))
    assert not failures, failures[:5]
