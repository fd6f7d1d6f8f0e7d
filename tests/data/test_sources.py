"""Layout presets (aptos, eyepacs, idrid, messidor, folder, csv), label mapping and patient-safe splits."""

from __future__ import annotations

import csv
from collections import defaultdict

import numpy as np
import pytest

from tests.data.conftest import fundus, save, write_csv
from tlcompile.data.datamodule import load_data
from tlcompile.data.sources import parse_grade
from tlcompile.data.splits import stratified_split
from tlcompile.errors import DataError, RecipeError
from tlcompile.recipe import DataConfig, load_recipe


def _cfg(**kw) -> DataConfig:
    return DataConfig(image_size=32, **kw)


def _leaked_patients(patients, split) -> int:
    seen: dict[str, set[str]] = defaultdict(set)
    for p, s in zip(patients, split, strict=True):
        seen[p].add(str(s))
    return sum(len(v) > 1 for v in seen.values())


def test_aptos_preset_reads_root(aptos_root):
    dm = load_data(_cfg(source="aptos", root=aptos_root), seed=0)
    assert dm.images.shape == (30, 32, 32, 3)
    assert dm.ids[:3] == ["a000", "a001", "a002"] and dm.grades[:6].tolist() == [0, 1, 2, 3, 4, 0]
    assert dm.targets[:5].tolist() == [0, 0, 1, 1, 1]  # referable: grade >= 2
    assert dm.patients == dm.ids  # APTOS has no patient ids
    assert dm.paths[0].endswith("train_images/a000.png")
    assert dm.report.used == 30 and dm.report.problems == [] and dm.report.grades["2 moderate"] == 6


@pytest.fixture
def eyepacs_root(tmp_path):
    """EyePACS: trainLabels.csv (image, level) + train/<patient>_<eye>.jpeg; 40 patients, both eyes, often different
    grades (as in the real set)."""
    root = tmp_path / "eyepacs"
    rows = []
    for p in range(40):
        for k, eye in enumerate(("left", "right")):
            grade = (p + k * (p % 3)) % 5
            name = f"{100 + p}_{eye}"
            save(root / "train" / f"{name}.jpeg", fundus(2 * p + k, grade))
            rows.append([name, grade])
    write_csv(root / "trainLabels.csv", ["image", "level"], rows)
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eyepacs_both_eyes_of_a_patient_stay_in_one_split(eyepacs_root, seed):
    dm = load_data(_cfg(source="eyepacs", root=eyepacs_root, task="grade", split={"val": 0.2, "test": 0.2}), seed=seed)
    assert len(dm.ids) == 80 and len(set(dm.patients)) == 40
    assert dm.patients[dm.ids.index("117_right")] == "117"
    assert _leaked_patients(dm.patients, dm.split) == 0
    assert dm.report.splits["patients_in_two_splits"] == 0
    assert set(dm.split) == {"train", "val", "test"}
    # The same images split per image (no grouping) do put eyes of one patient on both sides: the check can fail.
    ungrouped = stratified_split(dm.targets, val=0.2, test=0.2, seed=seed)
    assert _leaked_patients(dm.patients, ungrouped) > 0


def test_splits_csv_has_patient_and_no_leakage(eyepacs_root, tmp_path):
    dm = load_data(_cfg(source="eyepacs", root=eyepacs_root), seed=5)
    out = tmp_path / "splits.csv"
    dm.write_splits_csv(out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["image", "patient", "grade", "label", "split"]
    assert len(rows) == 80
    assert _leaked_patients([r["patient"] for r in rows], [r["split"] for r in rows]) == 0
    assert {r["label"] for r in rows if r["grade"] in ("0", "1")} == {"0"}


def test_split_is_fixed_by_the_seed(eyepacs_root):
    a = load_data(_cfg(source="eyepacs", root=eyepacs_root), seed=3)
    b = load_data(_cfg(source="eyepacs", root=eyepacs_root), seed=3)
    c = load_data(_cfg(source="eyepacs", root=eyepacs_root), seed=4)
    assert (a.split == b.split).all() and (a.split != c.split).any()


def test_idrid_layout_with_its_csv_quirks(tmp_path):
    """IDRiD's grading CSV: 'Image name', 'Retinopathy grade', a header with a trailing space, trailing empty columns
    and blank rows at the end; images in '1. Original Images/a. Training Set/IDRiD_001.jpg'."""
    root = tmp_path / "B. Disease Grading"
    lines = ["Image name,Retinopathy grade,Risk of macular edema ,,,"]
    for i in range(1, 21):
        save(root / "1. Original Images" / "a. Training Set" / f"IDRiD_{i:03d}.jpg", fundus(i, i % 5))
        lines.append(f"IDRiD_{i:03d},{i % 5},{i % 3},,,")
    lines += [",,,,,", ",,,,,"]
    labels = root / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv"
    labels.parent.mkdir(parents=True)
    labels.write_text("\n".join(lines) + "\n")
    dm = load_data(_cfg(source="idrid", root=root, task="grade"), seed=0)
    assert len(dm.ids) == 20 and dm.ids[0] == "IDRiD_001" and dm.grades[:5].tolist() == [1, 2, 3, 4, 0]
    assert dm.report.problems == []


def test_messidor_leaves_out_ungradable_and_finds_other_extensions(tmp_path):
    """Messidor-2 (Krause et al. grades): image_id carries the extension; ungradable rows have no grade and
    adjudicated_gradable 0; the CSV names .png where the folder holds .tif."""
    root = tmp_path / "messidor2"
    rows = []
    for i in range(24):
        name = f"IM{i:06d}.png"
        gradable = 0 if i in (3, 11) else 1
        grade = "" if not gradable else i % 5
        stored = f"IM{i:06d}.tif" if i == 7 else name
        save(root / "IMAGES" / stored, fundus(i, i % 5))
        rows.append([name, grade, 0, gradable])
    write_csv(
        root / "messidor_data.csv",
        ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"],
        rows,
    )
    dm = load_data(_cfg(source="messidor", root=root), seed=0)
    assert len(dm.ids) == 22 and "IM000003.png" not in dm.ids
    assert dm.paths[dm.ids.index("IM000007.png")].endswith("IM000007.tif")
    assert [e["reason"] for e in dm.report.excluded] == ["ungradable (adjudicated_gradable 0)"] * 2
    assert any("another extension" in n for n in dm.report.notes)
    assert dm.report.problems == []


def test_folder_preset_with_a_custom_label_map(tmp_path):
    """Class folders named in words (a common Kaggle re-packaging), mapped to grades; 'Ungradable' mapped to null."""
    names = {"No_DR": 0, "Mild": 1, "Moderate": 2, "Severe": 3, "Proliferate_DR": 4, "Ungradable": None}
    for k, name in enumerate(names):
        for i in range(4):
            save(tmp_path / name / f"{name}_{i}.png", fundus(10 * k + i, k % 5))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "Moderate" / "Thumbs.db").write_bytes(b"\0\1")
    dm = load_data(_cfg(source="folder", root=tmp_path, label_map=names, task="grade"), seed=0)
    assert len(dm.ids) == 20 and sorted(set(dm.grades.tolist())) == [0, 1, 2, 3, 4]
    assert dm.grades[dm.ids.index("Severe/Severe_2.png")] == 3
    assert len(dm.report.excluded) == 4
    assert any("Thumbs.db" in n for n in dm.report.notes)
    # Without the map these folders are not classes: the error says what names are valid.
    with pytest.raises(DataError, match="no class sub-folders; valid names: 0, 1, 2, 3, 4"):
        load_data(_cfg(source="folder", root=tmp_path), seed=0)


def test_generic_csv_with_patient_column_template_and_split_column(tmp_path):
    rows = []
    for i in range(30):
        patient = f"P{i // 3}"  # three photographs per patient
        split = ("train", "train", "train", "train", "val", "val", "test", "test", "test", "train")[(i // 3) % 10]
        save(tmp_path / "photos" / f"{i}.jpg", fundus(i, i % 5))
        rows.append([f"{i}", f"R{i % 5}", patient, split.upper() if i == 0 else split])
    write_csv(tmp_path / "labels.csv", ["file", "grade", "patient", "set"], rows)
    cfg = _cfg(
        source="csv",
        csv=tmp_path / "labels.csv",
        image_column="file",
        label_column="grade",
        path_template="photos/{id}.jpg",
        patient_column="patient",
        split={"column": "set"},
        label_map={f"R{g}": g for g in range(5)},
    )
    dm = load_data(cfg, seed=0)
    assert len(dm.ids) == 30 and dm.patients[:4] == ["P0", "P0", "P0", "P1"]
    assert dm.split[:3].tolist() == ["train"] * 3 and dm.split[12:15].tolist() == ["val"] * 3
    assert dm.report.splits["method"] == "column 'set'" and dm.report.splits["patients_in_two_splits"] == 0

    # A patient listed in two splits is a problem with every one of its images named.
    text = (tmp_path / "labels.csv").read_text().replace("4,R4,P1,train", "4,R4,P1,test")
    (tmp_path / "labels.csv").write_text(text)
    skipped = load_data(cfg.model_copy(update={"on_error": "skip"}), seed=0)
    assert "P1" not in skipped.patients and len(skipped.ids) == 27
    assert {p.id for p in skipped.report.problems} == {"3", "4", "5"}
    assert {p.kind for p in skipped.report.problems} == {"patient_in_two_splits"}


def test_patient_regex_on_generic_csv(tmp_path):
    rows = []
    for i in range(24):
        save(tmp_path / "im" / f"pt{i // 2}-{'OD' if i % 2 else 'OS'}.png", fundus(i, i % 5))
        rows.append([f"pt{i // 2}-{'OD' if i % 2 else 'OS'}", i % 5])
    write_csv(tmp_path / "l.csv", ["id_code", "diagnosis"], rows)
    dm = load_data(
        _cfg(source="csv", csv=tmp_path / "l.csv", images=tmp_path / "im", patient_regex=r"^(?P<patient>pt\d+)-O[DS]$"),
        seed=0,
    )
    assert len(set(dm.patients)) == 12 and _leaked_patients(dm.patients, dm.split) == 0


@pytest.mark.parametrize(
    "raw, label_map, expected",
    [
        ("2", {}, ("ok", 2)),
        (" 3.0 ", {}, ("ok", 3)),
        ("7", {}, ("label_out_of_range", None)),
        ("-1", {}, ("label_out_of_range", None)),
        ("2.5", {}, ("label_invalid", None)),
        ("moderate", {}, ("label_invalid", None)),
        ("", {}, ("label_missing", None)),
        ("R2", {"R2": 2, "U": None}, ("ok", 2)),
        ("2.0", {"2": 4}, ("ok", 4)),
        ("U", {"R2": 2, "U": None}, ("excluded", None)),
        ("R9", {"R2": 2}, ("label_invalid", None)),
    ],
)
def test_label_parsing(raw, label_map, expected):
    status, grade, reason = parse_grade(raw, label_map)
    assert (status, grade) == expected
    assert bool(reason) == (status != "ok")


def test_task_maps_grades_to_targets(aptos_root):
    grade = load_data(_cfg(source="aptos", root=aptos_root, task="grade"), seed=0)
    referable = load_data(_cfg(source="aptos", root=aptos_root, task="referable"), seed=0)
    assert grade.num_classes == 5 and referable.num_classes == 2
    assert np.array_equal(referable.targets, (grade.grades >= 2).astype(int))


def test_balance_weights(aptos_root):
    dm = load_data(_cfg(source="aptos", root=aptos_root, balance="weighted_sampler"), seed=0)
    w = dm.sample_weights("train")
    _, y = dm.subset("train")
    assert w.sum() == pytest.approx(1.0)
    # Each class carries the same total weight, so the sampler draws classes equally often on average.
    assert w[y == 0].sum() == pytest.approx(0.5) and w[y == 1].sum() == pytest.approx(0.5)
    assert load_data(_cfg(source="aptos", root=aptos_root, balance="weighted_loss"), seed=0).sample_weights() is None


def test_recipe_paths_and_preset_errors(tmp_path, aptos_root, write_recipe):
    ok = write_recipe({"data": {"source": "aptos", "root": str(aptos_root), "cache": "cache"}})
    recipe = load_recipe(ok)
    assert recipe.data.root == aptos_root and recipe.data.cache == tmp_path / "cache"
    cases = [
        ({"source": "aptos"}, "needs data.root"),
        ({"source": "aptos", "root": str(tmp_path / "nope")}, "data.root: '"),
        (
            {"source": "eyepacs", "root": str(aptos_root)},
            "has no label CSV of the eyepacs layout (looked for 'trainLabels.csv')",
        ),
        (
            {"source": "csv", "csv": str(aptos_root / "train.csv"), "patient_regex": "([a-z"},
            "is not a regular expression",
        ),
        ({"source": "csv", "csv": str(aptos_root / "train.csv"), "patient_regex": "a.*"}, "has no group"),
        ({"source": "aptos", "root": str(aptos_root), "label_map": {"R9": 9}}, "'R9' maps to 9"),
        ({"source": "folder", "root": str(aptos_root), "patient_column": "p"}, "need a CSV source"),
        ({"source": "aptos", "root": str(aptos_root), "on_error": "ignore"}, "data.on_error"),
        ({"source": "aptos", "root": str(aptos_root), "balance": "oversample"}, "data.balance"),
        (
            {"source": "aptos", "root": str(aptos_root), "path_template": "{id}_{eye}.png"},
            "placeholder other than {id}",
        ),
    ]
    for data, expected in cases:
        with pytest.raises(RecipeError) as info:
            load_recipe(write_recipe({"data": data}))
        assert expected in str(info.value) and "\n" not in str(info.value), (data, str(info.value))


def test_csv_column_errors_name_the_key(aptos_root):
    with pytest.raises(DataError, match="data.label_column 'level' is not a column; columns: id_code, diagnosis"):
        load_data(_cfg(source="aptos", root=aptos_root, label_column="level"), seed=0)
    with pytest.raises(DataError, match="data.split.column 'fold' is not a column"):
        load_data(_cfg(source="aptos", root=aptos_root, split={"column": "fold"}), seed=0)
