"""A tiny build with prune + quantize end to end (and resumed), and the accuracy guard's remedies in action."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from tlcompile.build import build
from tlcompile.build.context import Artifact, BuildContext, StageRun
from tlcompile.recipe import validate_recipe_dict
from tlcompile.report.schema import validate_report
from tlcompile.runtime.cpuinfo import cpu_info


@pytest.fixture
def compress_recipe(tiny_recipe_dict) -> dict:
    r = dict(tiny_recipe_dict)
    r["data"] = {**r["data"], "num_images": 80, "image_size": 32}
    r["export"] = {**r["export"], "parity_images": 8}
    no_limits = {"max_auc_drop": None, "max_sensitivity_drop": None, "max_specificity_drop": None}  # tiny val: noise
    r["prune"] = {"ratio": 0.5, "steps": 1, "finetune_epochs": 1, "calibration_images": 16, **no_limits}
    r["quantize"] = {"epochs": 1, "calibration_images": 16, **no_limits}
    r["bench"] = {**r["bench"], "runtimes": ["openvino", "onnxruntime"], "iterations": 2}
    r["evaluate"] = {"bootstrap_resamples": 100}
    r["bundle"] = {"enabled": False}
    return r


ISA = ", ".join(cpu_info()["isa"]) or "no AVX2"


def _build(recipe_dict: dict, out):
    recipe = validate_recipe_dict(recipe_dict)
    return recipe, build(recipe, out, console=Console(quiet=True)).report


def test_prune_and_quantize_build_end_to_end(compress_recipe, tmp_path):
    out = tmp_path / "build"
    _, report = _build(compress_recipe, out)
    validate_report(json.loads((out / "report.json").read_text()))  # guard and compression records included
    rows = {(a["name"], a["runtime"]): a for a in report["artifacts"]}
    names = ("fp32", "pruned", "int8", "pruned-int8")
    assert set(rows) == {(n, rt) for n in names for rt in ("openvino", "onnxruntime")}
    lineage = {n: rows[(n, "openvino")]["lineage"] for n in names}
    assert lineage == {
        "fp32": "fp32",
        "pruned": "fp32 <- pruned-channel-0.5",
        "int8": "fp32 <- qat-int8",
        "pruned-int8": "fp32 <- pruned-channel-0.5 <- qat-int8",
    }
    fp32, pruned, int8, pruned_int8 = (rows[(n, "openvino")] for n in names)
    # Channels were physically removed: a quarter of the work and weights is left; the file is smaller too.
    assert pruned["macs"] < 0.3 * fp32["macs"] and pruned_int8["macs"] == pruned["macs"]
    assert pruned["size_bytes"] < 0.3 * fp32["size_bytes"]
    assert int8["size_bytes"] < 0.3 * fp32["size_bytes"] and pruned_int8["size_bytes"] < 0.3 * pruned["size_bytes"]
    # What really ran: int8 kernels on both runtimes, and the exports agree with the fake-quantized torch model.
    assert int8["exec_precision"] in ("u8", "i8") and rows[("int8", "onnxruntime")]["exec_precision"] == "int8"
    for name in ("int8", "pruned-int8"):
        for runtime in ("openvino", "onnxruntime"):
            parity = rows[(name, runtime)]["parity"]
            # int8 on a CPU without VNNI must agree like any other (7-bit weights: no int16 saturation in VPMADDUBSW).
            assert parity["top1_agreement"] >= 0.9, f"{name} on {runtime}: {parity} on a CPU with {ISA}"
    # Every compressed row carries its guard and what compression did; fp32 has none.
    assert "guard" not in fp32
    assert pruned["guard"]["met"] and pruned["guard"]["checks"][0]["against"] == "fp32"
    assert [c["against"] for c in pruned_int8["guard"]["checks"]] == ["fp32", "pruned"]
    assert int8["compression"]["ptq"]["test"]["auc"] is not None and int8["compression"]["batchnorm_folded"] == 4
    # QAT distils the model it quantizes (the guard's reference), not always the unpruned FP32 model.
    assert (
        int8["compression"]["distill"]["teacher"] == "fp32"
        and pruned_int8["compression"]["distill"]["teacher"] == "pruned"
    )
    assert pruned["compression"]["widths"] == {
        "features.layer1.conv": [32, 16],
        "features.layer2.conv": [64, 32],
        "features.layer3.conv": [128, 64],
        "features.layer4.conv": [256, 128],
    }
    for rel in (
        "03_prune/architecture.json",
        "03_prune/pruned.pt",
        "04_quantize/int8.nncf.json",
        "04_quantize/int8.pt",
        "04_quantize/pruned-int8.nncf.json",
        "05_export/pruned-int8.onnx",
        "05_export/pruned-int8.xml",
    ):
        assert (out / rel).is_file(), rel
    assert {"prune", "quantize"} <= set(report["stage_seconds"])


@pytest.mark.slow
def test_a_resumed_build_rebuilds_the_compressed_models_from_their_files(compress_recipe, tmp_path):
    out = tmp_path / "build"
    recipe, report = _build(compress_recipe, out)
    rows = {(a["name"], a["runtime"]): a for a in report["artifacts"]}
    # The compressed models are rebuilt from architecture.json / NNCF config + state_dict, not recomputed.
    saved = {
        p: (out / p).stat().st_mtime_ns
        for p in ("03_prune/pruned.pt", "04_quantize/int8.pt", "04_quantize/pruned-int8.pt")
    }
    again = build(recipe, out, resume=True, console=Console(quiet=True)).report
    assert {p: (out / p).stat().st_mtime_ns for p in saved} == saved
    rows2 = {(a["name"], a["runtime"]): a for a in again["artifacts"]}
    for key, row in rows.items():
        assert rows2[key]["metrics"]["auc"] == row["metrics"]["auc"], key
        assert rows2[key]["guard" if "guard" in row else "lineage"] == row["guard" if "guard" in row else "lineage"]


def test_resume_redoes_only_the_stages_whose_recipe_sections_changed(compress_recipe, tmp_path, no_plots):
    """Iterating on compression must not retrain: each stage is reused while the sections it reads are unchanged."""
    r = {k: v for k, v in compress_recipe.items() if k != "quantize"}
    r["bench"] = {**r["bench"], "runtimes": ["onnxruntime"]}
    r["export"] = {**r["export"], "formats": ["onnx"]}
    out = tmp_path / "build"
    console = Console(record=True, width=300)  # --resume into a folder that is not there yet (a mistyped --out)
    build(validate_recipe_dict(r), out, resume=True, console=console)
    assert f"resume: nothing to resume in {out} (a new or empty folder); building from the start" in (
        console.export_text()
    )
    files = ("02_train/fp32.pt", "03_prune/pruned.pt", "05_export/fp32.onnx", "05_export/pruned.onnx")

    def stamps():
        return {f: (out / f).stat().st_mtime_ns for f in files}

    first = stamps()
    # Only the bench changes: nothing is trained, pruned or exported again.
    _, report = _build_resumed({**r, "bench": {**r["bench"], "iterations": 3}}, out)
    assert stamps() == first and {a["name"] for a in report["artifacts"]} == {"fp32", "pruned"}
    # The pruning changes: training is reused, pruning and export are redone.
    changed = {**r, "bench": {**r["bench"], "iterations": 3}, "prune": {**r["prune"], "ratio": 0.25}}
    _, report = _build_resumed(changed, out)
    now = stamps()
    assert now["02_train/fp32.pt"] == first["02_train/fp32.pt"]
    assert all(now[f] != first[f] for f in files[1:])
    assert next(a for a in report["artifacts"] if a["name"] == "pruned")["lineage"] == "fp32 <- pruned-channel-0.25"
    # The training changes: everything is redone.
    _build_resumed({**changed, "train": {**changed["train"], "lr": 0.001}}, out)
    assert stamps()["02_train/fp32.pt"] != now["02_train/fp32.pt"]


def _build_resumed(recipe_dict: dict, out):
    recipe = validate_recipe_dict(recipe_dict)
    return recipe, build(recipe, out, resume=True, console=Console(quiet=True)).report


def _ctx(tiny_data, tmp_path, quantize: dict | None = None, prune: dict | None = None) -> BuildContext:
    recipe = validate_recipe_dict(
        {
            "data": {"num_images": 64, "image_size": 32},
            "train": {"epochs": 1, "batch_size": 16},
            **({"quantize": quantize} if quantize else {}),
            **({"prune": prune} if prune else {}),
        }
    )
    ctx = BuildContext(
        recipe=recipe, out_dir=tmp_path, console=Console(quiet=True), device=torch.device("cpu"), data=tiny_data
    )
    ctx.operating_point = {"threshold": 0.5, "temperature": 1.0}
    ctx.stage = StageRun(folder=tmp_path)  # what the build loop gives a running stage
    return ctx


def _check(met: bool, auc: float = 0.9) -> dict:
    item = {"reference": 0.9, "value": auc, "drop": 0.9 - auc, "max_drop": 0.01, "met": met}
    none = {"reference": 0.5, "value": 0.5, "drop": 0.0, "max_drop": None}
    return {
        "against": "fp32",
        "split": "val",
        "auc": item,
        "sensitivity": none,
        "specificity": none,
        "accuracy": none,
        "met": met,
    }


def test_finetuning_keeps_the_state_the_guard_prefers_and_can_freeze_bn_statistics(
    tiny_data, calibration_inputs, tmp_path
):
    from tests.compress.conftest import settled
    from tlcompile.build import tuning

    ctx = _ctx(tiny_data, tmp_path)
    model = settled("cbr_small", calibration_inputs)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    verdicts = iter([_check(True), _check(False, auc=0.99)])  # the starting state meets the guard, the epoch does not
    tuned = tuning.finetune(
        ctx, model, epochs=1, lr=0.01, label="t", judge=lambda m, **_: next(verdicts), freeze_bn_stats=True
    )
    assert tuned["best_epoch"] == 0 and tuned["check"]["met"] and len(tuned["history"]) == 1
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # the better-AUC epoch was not kept

    verdicts = iter([_check(False), _check(True, auc=0.8)])
    tuned = tuning.finetune(
        ctx, model, epochs=1, lr=0.01, label="t", judge=lambda m, **_: next(verdicts), freeze_bn_stats=True
    )
    assert tuned["best_epoch"] == 1
    state = model.state_dict()
    assert not torch.equal(state["features.layer1.conv.weight"], start["features.layer1.conv.weight"])  # trained ...
    for key in ("features.layer1.bn.running_mean", "features.layer1.bn.running_var"):
        assert torch.equal(state[key], start[key])  # ... on frozen BatchNorm statistics


def test_an_epochs_judge_gets_the_val_logits_fit_predicted_not_a_second_pass(tiny_data, calibration_inputs, tmp_path):
    """Fine-tuning judges each epoch on the val logits fit() computed for its AUC: the same numbers a fresh prediction
    of that state gives, without predicting val twice."""
    from tests.compress.conftest import settled
    from tlcompile.build import tuning
    from tlcompile.train import loop

    ctx = _ctx(tiny_data, tmp_path)
    model = settled("cbr_small", calibration_inputs)
    x_val, _ = ctx.data.subset("val")
    calls = []

    def judge(m, logits=None):
        fresh = loop.predict(m, x_val, ctx.data.spec, device=ctx.device)
        calls.append((logits, fresh))
        return _check(True)

    tuning.finetune(ctx, model, epochs=2, lr=0.01, label="t", judge=judge)
    assert [given is None for given, _ in calls] == [True, False, False]  # the start state, then one per epoch
    for given, fresh in calls[1:]:
        np.testing.assert_array_equal(given, fresh)


def test_pruning_does_not_depend_on_what_ran_before_in_the_process(tiny_data, calibration_inputs, tmp_path):
    """Fine-tuning seeds the global RNG (dropout): a build resumed after training prunes exactly as an uninterrupted
    one."""
    from tests.compress.conftest import settled
    from tlcompile.build.stages import prune

    ctx = _ctx(
        tiny_data, tmp_path, prune={"steps": 1, "finetune_epochs": 1, "calibration_images": 16, "recovery_epochs": 0}
    )
    # MobileNetV3's classifier has dropout (cbr_small has none, so it could not show the difference).
    fp32 = Artifact(
        name="fp32", module=settled("mobilenet_v3_small", calibration_inputs), precision="fp32", lineage="fp32"
    )
    states, losses = [], []
    for warm_up in (0, 7):
        torch.rand(warm_up)  # a different history of the global RNG
        model, record = prune._prune_channels(ctx, fp32)
        states.append(model.state_dict())
        losses.append([h["loss"] for h in record["compression"]["steps"][0]["finetune"]["history"]])
    assert losses[0] == losses[1]  # the training itself, not only the state kept (which may be the untrained one)
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


def test_a_guard_failing_on_decisions_alone_is_realigned_by_the_classifier_bias(
    tiny_data, calibration_inputs, tmp_path
):
    """A pruned model that ranks like fp32 but scores everyone higher: the bias shift restores the val decisions."""
    import copy

    from tests.compress.conftest import settled
    from tlcompile.build import tuning
    from tlcompile.compress import guard
    from tlcompile.compress.realign import shift_referable_bias
    from tlcompile.evaluate.metrics import referable_score
    from tlcompile.train import loop

    ctx = _ctx(tiny_data, tmp_path, prune={"ratio": 0.5})
    fp32 = settled("cbr_small", calibration_inputs)
    val_x, _ = ctx.data.subset("val")
    scores = referable_score(loop.predict(fp32, val_x, ctx.data.spec, device=ctx.device))
    ctx.operating_point = {"threshold": float(np.median(scores)), "temperature": 1.0}
    reference = tuning.split_metrics(ctx, fp32, "val")
    judge = tuning.make_judge(ctx, reference, against="fp32", limits=guard.limits_of(ctx.recipe.prune))
    moved = copy.deepcopy(fp32)
    shift_referable_bias(moved, 20.0)  # every image referred: specificity collapses, the AUC does not move
    check = judge(moved)
    assert check["auc"]["met"] and not check["met"]
    actions: list[str] = []
    after = tuning.realign(ctx, ctx.recipe.prune, moved, reference, judge, check, actions)
    assert after["met"] and after["auc"]["value"] == check["auc"]["value"]
    assert len(actions) == 1 and "referable bias was shifted by" in actions[0]
    # Switched off by the recipe, nothing is done.
    off = ctx.recipe.prune.model_copy(update={"realign": False})
    again = copy.deepcopy(fp32)
    shift_referable_bias(again, 20.0)
    assert tuning.realign(ctx, off, again, reference, judge, judge(again), []) == judge(again)
    # The same remedy on an NNCF int8 model (the quantize stage's first remedy): its classifier bias moves too.
    from tlcompile.compress.quantize import fold_batchnorm, quantize_ptq

    folded = copy.deepcopy(fp32)
    fold_batchnorm(folded)
    int8 = quantize_ptq(folded, ctx.data.subset("train")[0][:16], ctx.data.spec, device=ctx.device)
    shift_referable_bias(int8, 20.0)
    quantized_check = judge(int8)
    assert not quantized_check["met"]
    quantized_actions: list[str] = []
    cfg = validate_recipe_dict({"quantize": {}}).quantize
    assert tuning.realign(ctx, cfg, int8, reference, judge, quantized_check, quantized_actions)["met"]
    assert len(quantized_actions) == 1


def test_a_failing_guard_gets_more_qat_epochs_then_fp32_layers(tiny_data, calibration_inputs, tmp_path, monkeypatch):
    from tests.compress.conftest import settled
    from tlcompile.build.loop import run_stage
    from tlcompile.build.stages import quantize as stage
    from tlcompile.compress import guard
    from tlcompile.compress.quantize import quantizer_hooks

    ctx = _ctx(
        tiny_data,
        tmp_path,
        {"epochs": 1, "recovery_epochs": 1, "fp32_fallback_layers": 2, "calibration_images": 16, "distill": False},
    )
    fp32 = Artifact(name="fp32", module=settled("cbr_small", calibration_inputs), precision="fp32", lineage="fp32")
    real_check, real_sensitivity, calls = guard.check, stage.layer_sensitivity, []

    def strict_check(candidate, reference, **kwargs):  # fails, as a real big drop would, until layers are kept in FP32
        result = real_check(candidate, reference, **kwargs)
        if not calls:
            result = {**result, "met": False, "auc": {**result["auc"], "drop": 0.5, "max_drop": 0.01, "met": False}}
        return result

    def sensitivity(*args, **kwargs):
        calls.append("sensitivity")
        return real_sensitivity(*args, **kwargs)

    monkeypatch.setattr(guard, "check", strict_check)
    monkeypatch.setattr(stage, "layer_sensitivity", sensitivity)
    [_, art] = run_stage(ctx, stage.STAGE, [fp32])  # as the build loop runs it: in 04_quantize, with stage.json
    g, c = art.metadata["guard"], art.metadata["compression"]
    assert calls == ["sensitivity"] and g["met"]
    assert "1 more QAT epochs" in g["actions"][0] and "val AUC -50.00 pp (limit -1.00 pp)" in g["actions"][0]
    assert "kept the 2 most sensitive layers in FP32" in g["actions"][1]
    assert len(c["fp32_layers"]) == 2 and len(c["sensitivity"]) == 5
    assert len(c["final"]["history"]) == 1  # the model kept is the second attempt's (one QAT epoch)
    assert art.lineage == "fp32 <- qat-int8 (2 layers fp32)"
    # The chosen layers really run in FP32: no quantizer on their weights.
    hooks = [name for name, _ in quantizer_hooks(art.module)]
    for layer in c["fp32_layers"]:
        assert not any(h.startswith(f"pre_hooks.{layer}__1") for h in hooks), layer
    # The record is saved for resume and the report.
    saved = json.loads((tmp_path / "04_quantize" / "quantize.json").read_text())
    assert saved["int8"]["compression"]["fp32_layers"] == c["fp32_layers"]


def test_reference_logits_are_computed_once_per_weights_and_never_for_an_nncf_model(
    tiny_data, calibration_inputs, tmp_path, monkeypatch
):
    from tests.compress.conftest import settled
    from tlcompile.build import tuning
    from tlcompile.compress.quantize import fold_batchnorm, quantize_ptq

    ctx = _ctx(tiny_data, tmp_path)
    calls = []
    predict = tuning.loop.predict
    monkeypatch.setattr(tuning.loop, "predict", lambda model, *a, **k: calls.append(model) or predict(model, *a, **k))
    model = settled("cbr_small", calibration_inputs)
    first = tuning.split_logits(ctx, model, "val")
    first[:] = 0.0  # a caller's copy: the cache is not changed through it
    again = tuning.split_logits(ctx, model, "val")
    assert len(calls) == 1 and np.array_equal(again, predict(model, *ctx.data.subset("val")[:1], ctx.data.spec))
    tuning.split_metrics(ctx, model, "val")
    tuning.make_judge(ctx, tuning.split_metrics(ctx, model, "val"), against="fp32", limits={}, reference_model=model)
    assert len(calls) == 1
    tuning.split_logits(ctx, model, "test")  # another split
    with torch.no_grad():
        model.get_classifier().bias.add_(1.0)  # changed weights: a new key
    changed = tuning.split_logits(ctx, model, "val")
    assert len(calls) == 3 and not np.allclose(changed, again)
    folded = settled("cbr_small", calibration_inputs)
    fold_batchnorm(folded)
    int8 = quantize_ptq(folded, ctx.data.subset("train")[0][:16], ctx.data.spec, device=ctx.device)
    tuning.split_logits(ctx, int8, "val")
    tuning.split_logits(ctx, int8, "val")
    assert len(calls) == 5
