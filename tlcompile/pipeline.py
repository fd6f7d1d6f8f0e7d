"""``build(recipe, out_dir)``: run the stages in order, each in its own numbered folder, and write the report.

Stages: 01_data -> 02_train -> 05_export -> 06_bench -> report (03_prune and 04_quantize slot in between when
the recipe asks for them). A stage is ``run(ctx, artifacts) -> artifacts`` and ends by writing ``stage.json``;
``resume=True`` reuses every stage whose ``stage.json`` matches the recipe's fingerprint.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import tlcompile
from tlcompile.checkpoint import load_state, save_state
from tlcompile.data.datamodule import DataModule, class_names_for, load_data
from tlcompile.errors import BundleError, TlcompileError
from tlcompile.evaluate.clinical import CI_LEVEL, CI_METHODS, add_clinical_to_rows, lock_operating_point
from tlcompile.evaluate.metrics import classification_metrics
from tlcompile.export.exporters import check_parity, export_onnx, export_openvino
from tlcompile.io import atomic_write_json, atomic_write_text, atomic_write_with, sha256_file
from tlcompile.models import count_macs, count_params, get_model
from tlcompile.recipe import STAGE_SECTIONS, Recipe
from tlcompile.runtime.inference import default_threads, open_session, predict_logits
from tlcompile.runtime.latency import measure_latency
from tlcompile.runtime.preprocess import to_input
from tlcompile.train import loop, transfer

RUNTIME_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx", "torch": "torch"}
FORMAT_SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "torch": ".pt"}


@dataclass
class Artifact:
    """One model that came out of a stage: the torch module plus the files exported from it."""

    name: str  # fp32 | pruned | int8 | pruned-int8
    module: torch.nn.Module
    precision: str  # fp32 | int8
    lineage: str  # e.g. "fp32 <- pruned-0.5 <- qat-int8"
    files: dict[str, Path] = field(default_factory=dict)  # format -> file
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> parity record
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    recipe: Recipe
    out_dir: Path
    console: Console
    device: torch.device
    resume: bool = False
    data: DataModule | None = None
    threshold: float = 0.5
    operating_point: dict[str, Any] = field(default_factory=dict)  # threshold, method, temperature: locked on FP32 val
    stage_seconds: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    transfer: dict[str, Any] | None = None  # report["transfer"]: the variant table, selection and source
    weight_source: Any = None  # models.pretrained.SourceWeights read by preflight_transfer, reused by stage_train
    bench_rows: list[dict[str, Any]] = field(default_factory=list)
    resume_plan: dict[str, list[str]] | None = None  # --resume: the stage folders reused, redone and removed

    def stage_dir(self, name: str) -> Path:
        d = self.out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage_done(self, name: str) -> dict[str, Any] | None:
        """The saved stage record when resuming and it belongs to this same recipe, else None."""
        marker = self.out_dir / name / "stage.json"
        if not (self.resume and marker.is_file()):
            return None
        record = json.loads(marker.read_text())
        return record if record.get("fingerprint") == self.stage_fingerprint(name) else None

    def stage_fingerprint(self, name: str) -> str:
        """The fingerprint of the recipe sections stage ``name`` reads: a change elsewhere (bench, bundle, a later
        stage's settings) keeps the stage reusable by --resume."""
        return self.recipe.fingerprint(STAGE_SECTIONS.get(name))

    def finish_stage(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.out_dir / name / "stage.json", {"fingerprint": self.stage_fingerprint(name), **record})


@dataclass
class BuildResult:
    out_dir: Path
    report: dict[str, Any]


# -------------------------------------------------------------------------------------------- stages
def stage_data(ctx: BuildContext) -> None:
    d = ctx.recipe.data
    folder = ctx.stage_dir("01_data")
    with ctx.console.status(f"[bold]data[/]: loading {d.source} images ({d.image_size} px)"):
        # The data check report (data_check.json, problems.csv) lands beside splits.csv, also when problems stop the build.
        ctx.data = load_data(d, seed=ctx.recipe.seed, report_dir=folder)
    ctx.data.write_splits_csv(folder / "splits.csv")
    report = ctx.data.report
    summary = {"counts": ctx.data.counts(), "preprocessing": ctx.data.spec.to_dict(), "task": d.task,
               "class_names": list(ctx.data.class_names), "fov_not_found": int((~ctx.data.fov_found).sum()),
               "balance": d.balance, "problems_skipped": len(report.problems) if report else 0,
               "patients_in_two_splits": report.splits.get("patients_in_two_splits") if report else None}
    atomic_write_json(folder / "summary.json", summary)
    ctx.finish_stage("01_data", {"images": len(ctx.data.ids)})
    counts = ", ".join(f"{k} {sum(v.values())}" for k, v in summary["counts"].items())
    skipped = f"; {summary['problems_skipped']} problem images left out (01_data/problems.csv)" if summary["problems_skipped"] else ""
    ctx.console.print(f"[bold]data[/]: {len(ctx.data.ids)} images ({counts}); task {d.task}{skipped}")


def _build_model(ctx: BuildContext) -> torch.nn.Module:
    torch.manual_seed(ctx.recipe.seed)
    return get_model(ctx.recipe.model.arch, num_classes=ctx.data.num_classes).to(ctx.device)


def preflight_transfer(ctx: BuildContext) -> None:
    """Before the data stage: the source weights exist and fit, every variant's blocks exist (fail in seconds, not after data).

    Skipped when a finished train stage will be resumed: its checkpoint no longer needs the source.
    """
    if ctx.stage_done("02_train") and (ctx.out_dir / "02_train" / "fp32.pt").is_file():
        return
    ctx.weight_source = transfer.check_transfer_plan(ctx.recipe, len(class_names_for(ctx.recipe.data.task)))


def stage_train(ctx: BuildContext) -> Artifact:
    """Train through tlcompile.train.transfer: the recipe's init and strategy, and every transfer.compare variant."""
    r, data = ctx.recipe, ctx.data
    folder = ctx.stage_dir("02_train")
    ckpt = folder / "fp32.pt"
    done = ctx.stage_done("02_train")
    if done and ckpt.is_file():
        model = _build_model(ctx)
        model.load_state_dict(load_state(ckpt))
        ctx.training, ctx.transfer = done["training"], done.get("transfer")
        ctx.console.print(f"[bold]train[/]: resumed from {ckpt} (best epoch {ctx.training['best_epoch']})")
    else:
        tc, plan = r.train, r.effective_transfer()
        runs = len(plan.variants()) * plan.repeats
        steps = loop.steps_per_epoch(len(data.subset("train")[1]), tc.batch_size)
        with _progress(ctx.console) as progress:
            task = progress.add_task("train", total=runs * tc.epochs * steps, info="")

            def on_epoch(label: str, rec: dict[str, Any]) -> None:
                progress.update(task, info=f"{label + ': ' if runs > 1 else ''}epoch {rec['epoch']}/{tc.epochs} "
                                f"loss {rec['loss']:.3f} val AUC {rec['val_auc']:.3f}")

            outcome = transfer.run_transfer(
                r, data, device=ctx.device, source=ctx.weight_source, log=lambda msg: ctx.console.print(msg, markup=False),
                on_epoch=on_epoch, on_step=lambda _loss: progress.advance(task), checkpoint_dir=folder,
            )
        model = outcome.model
        save_state(ckpt, model.state_dict())
        ctx.training, ctx.transfer = outcome.training, outcome.table
        ctx.weight_source = None  # the source tensors are not needed after training
        if ctx.transfer is not None:
            atomic_write_json(folder / "transfer.json", ctx.transfer)
            ctx.console.print(_transfer_table(ctx.transfer))
        ctx.finish_stage("02_train", {"training": ctx.training, "transfer": ctx.transfer, "checkpoint_sha256": sha256_file(ckpt)})
        for path in transfer.checkpoint_paths(r, folder).values():  # stage.json now stands for them (tens of MB each)
            path.unlink(missing_ok=True)
        t = ctx.training
        ctx.console.print(f"[bold]train[/]: {t['variant']}, best epoch {t['best_epoch']}, val AUC {t['best_val_auc']:.3f} ({t['wall_s']:.0f} s)")
    model.eval()
    lock_fp32_operating_point(ctx, model)
    return Artifact(name="fp32", module=model, precision="fp32", lineage="fp32", files={"torch": ckpt})


def lock_fp32_operating_point(ctx: BuildContext, model: torch.nn.Module) -> None:
    """Lock the referral threshold (and temperature) on the FP32 model's validation split; every artifact is judged at it."""
    e = ctx.recipe.evaluate
    x_val, y_val = ctx.data.subset("val")
    val_logits = loop.predict(model, x_val, ctx.data.spec, device=ctx.device)
    locked = lock_operating_point(
        val_logits, y_val, method=e.operating_point, target_sensitivity=e.target_sensitivity, temperature_scaling=e.temperature_scaling
    )
    ctx.operating_point = {**locked, "locked_on": "val", "model": "fp32"}
    ctx.threshold = locked["threshold"]


def stage_export(ctx: BuildContext, artifacts: list[Artifact]) -> None:
    r, data = ctx.recipe, ctx.data
    folder = ctx.stage_dir("05_export")
    done = ctx.stage_done("05_export")
    x_val, _ = data.subset("val")
    inputs = to_input(x_val[: r.export.parity_images], data.spec)
    records: dict[str, Any] = {}
    references: dict[str, np.ndarray] = {"inputs": inputs}
    for art in artifacts:
        module = art.module.cpu().eval()
        with torch.no_grad():
            reference = module(torch.from_numpy(inputs)).numpy()
        references[f"logits_{art.name}"] = reference
        for fmt in r.export.formats:
            path = folder / f"{art.name}{FORMAT_SUFFIX[fmt]}"
            if not (done and path.is_file()):
                with ctx.console.status(f"[bold]export[/]: {art.name} -> {fmt}"):
                    if art.precision == "int8":  # NNCF fake-quantized: FakeQuantize IR / U8S8 QDQ ONNX
                        from tlcompile.export.int8 import export_int8

                        export_int8(module, path, fmt, image_size=data.spec.size, opset=r.export.opset)
                    elif fmt == "onnx":
                        export_onnx(module, path, image_size=data.spec.size, opset=r.export.opset, exporter=r.export.onnx_exporter)
                    else:
                        export_openvino(module, path, image_size=data.spec.size)
            art.files[fmt] = path
            runtime = "onnxruntime" if fmt == "onnx" else "openvino"
            art.parity[fmt] = check_parity(reference, path, runtime, inputs)
            records[f"{art.name}.{fmt}"] = art.parity[fmt]
            p = art.parity[fmt]
            ok = p["max_abs_diff"] <= r.export.parity_max_abs_diff or p["exec_precision"] != "f32"
            ctx.console.print(
                f"[bold]export[/]: {path.name}: max |Δlogit| {p['max_abs_diff']:.2e}, top-1 agreement "
                f"{p['top1_agreement']:.1%} ({runtime}, {p['exec_precision']})" + ("" if ok else " [red]PARITY FAILED[/]")
            )
        art.module.to(ctx.device)
    atomic_write_json(folder / "parity.json", records)
    # The inputs and the torch model's logits behind parity.json: the same check can be rerun on another CPU (or an
    # emulated older one, tlcompile.runtime.isa_emulation) without torch.
    _save_npz(folder / "parity_reference.npz", references)
    ctx.finish_stage("05_export", {"files": {k: str(v) for a in artifacts for k, v in a.files.items()}})


def _torch_session(module: torch.nn.Module, threads: int):
    """A torch eager 'session' with the same interface as the runtime sessions (used for bench rows)."""

    class TorchSession:
        runtime = "torch"
        exec_precision = "f32"

        def __init__(self) -> None:
            self.threads = threads
            self.module = module.cpu().eval()

        @torch.inference_mode()
        def run(self, x: np.ndarray) -> np.ndarray:
            return self.module(torch.from_numpy(x)).numpy()

    return TorchSession()


def stage_bench(ctx: BuildContext, artifacts: list[Artifact]) -> None:
    r, data = ctx.recipe, ctx.data
    folder = ctx.stage_dir("06_bench")
    threads = r.bench.threads or default_threads()
    x_test, y_test = data.subset("test")
    test_inputs = to_input(x_test, data.spec)
    one = np.ascontiguousarray(test_inputs[:1])
    previous_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        torch.set_num_threads(threads)
        for art in artifacts:
            params = count_params(art.module)
            macs = count_macs(art.module, data.spec.size)
            for runtime in r.bench.runtimes:
                fmt = RUNTIME_FORMAT[runtime]
                path = art.files.get(fmt)
                if path is None:
                    ctx.console.print(f"[yellow]bench[/]: no {fmt} export of {art.name}; add it to export.formats for a {runtime} row")
                    continue
                with ctx.console.status(f"[bold]bench[/]: {art.name} on {runtime}"):
                    if runtime == "torch":
                        session = _torch_session(art.module, threads)
                    else:
                        session = open_session(path, runtime, threads=threads, precision=r.bench.precision)
                    logits = predict_logits(session, test_inputs)
                    latency = measure_latency(lambda s=session: s.run(one), warmup=r.bench.warmup, iterations=r.bench.iterations)
                metrics = classification_metrics(logits / ctx.operating_point["temperature"], y_test, ctx.threshold)
                logits_path = _save_array(folder / "logits" / f"{art.name}.{runtime}.npy", logits)
                rows.append({
                    "name": art.name,
                    "format": fmt,
                    "precision": art.precision,
                    "path": str(path.relative_to(ctx.out_dir)),
                    "size_bytes": _file_size(path),
                    "params": params,
                    "macs": macs,
                    "runtime": runtime,
                    "threads": session.threads,
                    "exec_precision": session.exec_precision,
                    "latency_ms": {k: round(v, 4) for k, v in latency.items() if k in ("p50", "p90", "p99", "mean", "first_ms")},
                    "metrics": {k: metrics[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "threshold", "n")},
                    "parity": art.parity.get(fmt, {"max_abs_diff": 0.0, "top1_agreement": 1.0, "reference": "self"}),
                    "lineage": art.lineage,
                    "logits_path": str(logits_path.relative_to(ctx.out_dir)),
                    # Compressed artifacts: the accuracy guard on val (met / checks / actions) and what compression did.
                    **{k: art.metadata[k] for k in ("guard", "compression") if k in art.metadata},
                })
        for art in artifacts:
            art.module.to(ctx.device)
    finally:
        torch.set_num_threads(previous_threads)
    _save_array(folder / "logits" / "test_targets.npy", y_test)
    with ctx.console.status("[bold]evaluate[/]: bootstrap CIs, paired deltas vs fp32, calibration"):
        add_clinical_evaluation(ctx, rows, y_test)
    flag_test_drops(rows)
    ctx.bench_rows = rows
    atomic_write_json(folder / "bench.json", rows)
    ctx.finish_stage("06_bench", {"rows": len(rows)})


def flag_test_drops(rows: list[dict[str, Any]]) -> None:
    """``row["test_flags"]``: where a compressed artifact's test-split drop against the model its guard compared it with
    (same runtime) exceeds the guard's own limits. Flags only: selection stays on val (choosing on test would make the
    test figures optimistic), but a reader must see when test disagrees with the val verdict."""
    by_key = {(r["name"], r["runtime"]): r for r in rows}
    for row in rows:
        guard_record = row.get("guard")
        if not guard_record or not guard_record.get("checks"):
            continue
        check = guard_record["checks"][-1]
        ref = by_key.get((check.get("against"), row["runtime"]))
        if ref is None:
            continue
        flags = []
        for metric in ("auc", "sensitivity", "specificity", "accuracy"):
            limit = (check.get(metric) or {}).get("max_drop")
            a, b = ref.get("metrics", {}).get(metric), row.get("metrics", {}).get(metric)
            if limit is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                continue
            if a - b > limit + 1e-12:
                flags.append({"metric": metric, "reference": check["against"], "drop": round(a - b, 6), "max_drop": limit,
                              "text": f"test {metric} {100 * (b - a):+.1f} pp vs {check['against']} (guard limit {-100 * limit:.1f} pp; "
                                      "the guard judged val)"})
        row["test_flags"] = flags


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write_with(path, write)
    return path


def _save_array(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, array)

    atomic_write_with(path, write)
    return path


def add_clinical_evaluation(ctx: BuildContext, rows: list[dict[str, Any]], test_targets: np.ndarray) -> None:
    """Add ``clinical`` to every bench row from its saved test logits, at the locked operating point."""
    e, op = ctx.recipe.evaluate, ctx.operating_point
    add_clinical_to_rows(
        rows, [np.load(ctx.out_dir / row["logits_path"]) if row.get("logits_path") else None for row in rows], test_targets,
        threshold=op["threshold"], temperature=op["temperature"], endpoints=e.endpoints.model_dump(exclude={"rule"}),
        endpoint_rule=e.endpoints.rule, resamples=e.bootstrap_resamples, seed=_bootstrap_seed(ctx), calibration_bins=e.calibration_bins,
    )


def _bootstrap_seed(ctx: BuildContext) -> int:
    return ctx.recipe.seed if ctx.recipe.evaluate.seed is None else ctx.recipe.evaluate.seed


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    return size


# -------------------------------------------------------------------------------------------- report
def _version(module: str) -> str | None:
    """A runtime's version, or None where it is not installed (a build that exports ONNX only needs no OpenVINO)."""
    import importlib

    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def environment() -> dict[str, Any]:
    from tlcompile.runtime.cpuinfo import cpu_info

    env = {
        "tlcompile": tlcompile.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "openvino": _version("openvino"),
        "onnxruntime": _version("onnxruntime"),
        "platform": platform.platform(),
        "cpu": cpu_info(),
    }
    if torch.cuda.is_available():  # what trained the model, where a GPU did
        env["cuda"] = {"version": torch.version.cuda, "device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return env


def _evaluation_settings(ctx: BuildContext) -> dict[str, Any]:
    """How the clinical numbers in the rows were computed, so report.json explains itself."""
    e = ctx.recipe.evaluate
    return {
        "split": "test",
        "score": "P(referable DR) = softmax(logits / temperature), summed over the referable classes",
        "ci_level": CI_LEVEL,
        "ci_methods": CI_METHODS,
        "bootstrap_resamples": e.bootstrap_resamples,
        "bootstrap_seed": _bootstrap_seed(ctx),
        "calibration_bins": e.calibration_bins,
        "endpoints": e.endpoints.model_dump(),
        "reference": "the fp32 row of the same runtime",
        "test_targets_path": "06_bench/logits/test_targets.npy",
    }


def assemble_report(ctx: BuildContext) -> dict[str, Any]:
    data = ctx.data
    return {
        "tlcompile_version": tlcompile.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "name": ctx.recipe.name,
        "recipe": ctx.recipe.to_yaml_dict(),
        "recipe_sha256": ctx.recipe.fingerprint(),
        "task": data.task,
        "class_names": list(data.class_names),
        "preprocessing": data.spec.to_dict(),
        "data": {"counts": data.counts(), "images": len(data.ids)},
        "operating_point": ctx.operating_point,
        "evaluation": _evaluation_settings(ctx),
        "training": ctx.training,
        **({"transfer": ctx.transfer} if ctx.transfer is not None else {}),
        "artifacts": ctx.bench_rows,
        "stage_seconds": {k: round(v, 2) for k, v in ctx.stage_seconds.items()},
        "environment": environment(),
    }


def _transfer_table(table: dict[str, Any]) -> Table:
    header, rows = transfer.table_cells(table)
    out = Table(title=f"transfer: {table['repeats']} seed(s) per variant; * = best mean val AUC, goes on "
                f"(epochs to val AUC {table['target_val_auc']})")
    for col in header:
        out.add_column(col, justify="left" if col in ("variant", "init", "strategy") else "right", no_wrap=True)
    for row in rows:
        out.add_row(*row)
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


def _timed(ctx: BuildContext, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    ctx.stage_seconds[name] = ctx.stage_seconds.get(name, 0.0) + time.perf_counter() - t0
    return out


def stage_bundle(ctx: BuildContext, report: dict[str, Any]) -> BundleError | None:
    """Write bundle/ from the report (tlcompile.export.bundle) and record it as report["bundle"]. A bundle that cannot
    be made (no artifact meets the endpoints within the budget ...) is recorded and returned, not raised, so that
    build() writes the report first: nothing measured is lost."""
    from tlcompile.export.bundle import write_bundle

    t0 = time.perf_counter()
    error = None
    with ctx.console.status("[bold]bundle[/]: selecting the artifact, writing golden samples, verifying"):
        try:
            record = write_bundle(report, out_dir=ctx.out_dir, data=ctx.data, recipe=ctx.recipe)
        except BundleError as err:
            record, error = {"error": str(err)}, err
    ctx.stage_seconds["bundle"] = time.perf_counter() - t0
    report.setdefault("stage_seconds", {})["bundle"] = round(ctx.stage_seconds["bundle"], 2)
    if record is None:
        record = {"skipped": "no openvino or onnxruntime row in the bench to ship; add one to bench.runtimes"}
        ctx.console.print(f"[yellow]bundle[/]: skipped: {record['skipped']}")
    elif error is None:
        sel = record.get("selection", {})
        passed_over = [f"{c['id']} ({c['why_not']})" for c in sel.get("candidates", []) if c.get("why_not") and sel.get("rule") != "name"]
        why = f": {sel['why']}" if sel.get("why") else f" ({sel.get('ranked_by')})"
        ctx.console.print(
            f"[bold]bundle[/]: {ctx.out_dir / record['path']}: {len(record['candidates'])} candidate(s) for the box to choose "
            f"from ({', '.join(record['candidates'])}); build's choice {record['default_candidate']} ({record['precision']}), "
            f"by select: {sel.get('rule')}{why}"
            + (f"; passed over: {', '.join(passed_over)}" if passed_over else "") + "; "
            f"{record['golden_samples']} golden samples verified (max |Δlogit| {record['verify']['max_abs_logit_diff']:.1e}); "
            f"manifest sha256 {record['manifest_sha256'][:16]}; on the clinic's box, tlcompile verify pins the fastest there"
        )
        if sel.get("noise"):
            ctx.console.print(f"[yellow]bundle[/]: {sel['noise']}")
    report["bundle"] = record
    return error


def input_list_sha256(data: DataModule) -> str:
    """sha256 of the input file list: every image's id, grade, split and (for files) path and size, in a fixed order."""
    import hashlib

    h = hashlib.sha256()
    for i, image_id in enumerate(data.ids):
        path = data.paths[i] if i < len(data.paths) else ""
        size = Path(path).stat().st_size if path and Path(path).is_file() else ""
        h.update(f"{image_id}\t{data.grades[i]}\t{data.split[i]}\t{path}\t{size}\n".encode())
    return h.hexdigest()


def write_build_manifest(ctx: BuildContext) -> None:
    """manifest.json of the whole build, in the bundle's format: sha256 and size of every file, plus the inputs."""
    from tlcompile.runtime.bundle import manifest_entries

    atomic_write_json(ctx.out_dir / "manifest.json", {
        "files": manifest_entries(ctx.out_dir),
        "inputs": {"images": len(ctx.data.ids), "list_sha256": input_list_sha256(ctx.data)},
        "recipe_sha256": ctx.recipe.fingerprint(),
    })


# A build writes and deletes only inside a folder it owns: one it created (or found empty) and marked with this file.
BUILD_MARKER = ".tlcompile-build.json"
# Files and folders of a build that are derived from every stage and rewritten at its end.
_BUILD_OUTPUTS = ("report.json", "report.md", "report.html", "manifest.json")
_STAGE_FOLDER = re.compile(r"\d\d_[a-z]+")


def is_build_dir(path: Path) -> bool:
    """True for a folder a tlcompile build created (it holds the build marker as a regular file)."""
    marker = path / BUILD_MARKER
    return marker.is_file() and not marker.is_symlink()


def prepare_out_dir(out_dir: Path, *, resume: bool) -> None:
    """Check that a build may use ``out_dir``, or refuse without touching anything; creates it when missing.

    A new or empty folder is accepted (:func:`claim_out_dir` marks it once the build's preflight checks pass). A
    folder holding anything else is refused unless it is a tlcompile build (it has the marker) and ``resume`` is set.
    A folder that is not a build is refused with and without --resume, and the message never suggests --resume for
    it: it holds someone's files.
    """
    if out_dir.is_symlink() and not out_dir.exists():
        raise TlcompileError(f"--out '{out_dir}' is a broken symbolic link; give a folder (nothing was changed)")
    if out_dir.exists() and not out_dir.is_dir():
        raise TlcompileError(f"--out '{out_dir}' is a file; give a folder (nothing was changed)")
    try:
        empty = not out_dir.exists() or not any(out_dir.iterdir())
    except OSError as err:
        raise TlcompileError(f"--out '{out_dir}': cannot read the folder ({err.strerror or err})") from err
    if not empty:
        if not is_build_dir(out_dir):
            raise TlcompileError(
                f"--out '{out_dir}' is not empty and is not a tlcompile build folder (no {BUILD_MARKER}); a build writes "
                "only into a new or empty folder or one it made, so nothing was changed; choose a new --out"
            )
        if not resume:
            raise TlcompileError(
                f"output folder '{out_dir}' already holds a build; use --resume to continue it, or choose another --out "
                "(nothing was changed)"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)


def claim_out_dir(out_dir: Path) -> None:
    """Mark a folder :func:`prepare_out_dir` accepted as this build's own (the first file the build writes)."""
    if not is_build_dir(out_dir):
        atomic_write_json(out_dir / BUILD_MARKER, {"tlcompile_build": 1, "tlcompile_version": tlcompile.__version__,
                                                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})


def planned_stages(recipe: Recipe) -> list[str]:
    """The stage folders this recipe's build writes, in order."""
    return ["01_data", "02_train", *(["03_prune"] if recipe.prune is not None else []),
            *(["04_quantize"] if recipe.quantize is not None else []), "05_export", "06_bench"]


def plan_resume(ctx: BuildContext) -> dict[str, list[str]]:
    """Before a resumed build runs: keep each finished stage of this same recipe; clear every other stage folder
    (finished under another recipe, unfinished, or not in this recipe at all) and the build-wide outputs, so that
    nothing of an earlier recipe is mixed into this build or listed in its manifest.

    The epoch checkpoints of an unfinished training stage are kept: each carries the recipe's fingerprint and is
    only resumed by the same recipe. Returns what was reused, redone and removed, by stage folder."""
    import shutil

    planned = planned_stages(ctx.recipe)
    plan: dict[str, list[str]] = {"reused": [], "redone": [], "removed": []}
    for folder in sorted(p for p in ctx.out_dir.iterdir() if p.is_dir() and not p.is_symlink() and _STAGE_FOLDER.fullmatch(p.name)):
        name = folder.name
        if name not in planned:
            shutil.rmtree(folder)
            plan["removed"].append(f"{name} (not in this recipe)")
            continue
        marker = folder / "stage.json"
        try:
            record = json.loads(marker.read_text()) if marker.is_file() else None
        except (OSError, ValueError):
            record = None
        if name != "06_bench" and isinstance(record, dict) and record.get("fingerprint") == ctx.stage_fingerprint(name):
            plan["reused"].append(name)
            continue
        if name == "02_train" and record is None:
            plan["redone"].append(f"{name} (unfinished: continues from its epoch checkpoint when it is this recipe's)")
            continue
        why = ("always measured again" if name == "06_bench" else "unfinished" if record is None
               else "its recipe sections changed: " + ", ".join(STAGE_SECTIONS.get(name, ())))
        shutil.rmtree(folder)
        plan["redone"].append(f"{name} ({why})")
    for rel in _BUILD_OUTPUTS:
        path = ctx.out_dir / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
    if ctx.recipe.bundle.enabled is False and (ctx.out_dir / "bundle").is_dir():
        shutil.rmtree(ctx.out_dir / "bundle")
        plan["removed"].append("bundle (this recipe makes none)")
    ctx.console.print("[bold]resume[/]: " + "; ".join(f"{k} {', '.join(v)}" for k, v in plan.items() if v) if any(plan.values())
                      else "[bold]resume[/]: nothing to reuse")
    return plan


def build(recipe: Recipe, out_dir: Path, *, resume: bool = False, console: Console | None = None) -> BuildResult:
    """Run the whole recipe into ``out_dir``; returns the report (also written as report.json/report.md)."""
    console = console or Console()
    out_dir = Path(out_dir)
    from tlcompile.train import distributed

    run, device = distributed.setup(loop.resolve_device(recipe.train.device))
    if run.enabled and resume:
        raise TlcompileError("--resume is not supported under torchrun yet; resume the build in a single process, or start it again")
    if run.rank > 0:
        # Workers train their shard and write nothing into the build folder: rank 0 owns every file.
        import tempfile

        out_dir, console = Path(tempfile.mkdtemp(prefix=f"tlcompile-rank{run.rank}-")), Console(quiet=True)
    prepare_out_dir(out_dir, resume=resume)
    torch.set_num_threads(max(1, default_threads() // (run.world_size if device.type == "cpu" else 1)))
    ctx = BuildContext(recipe=recipe, out_dir=out_dir, console=console, device=device, resume=resume)
    import yaml

    _timed(ctx, "train", lambda: preflight_transfer(ctx))  # before anything is written: a bad source leaves --out empty
    claim_out_dir(out_dir)
    if resume:
        ctx.resume_plan = plan_resume(ctx)
    atomic_write_text(out_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False))
    _timed(ctx, "data", lambda: stage_data(ctx))
    fp32 = _timed(ctx, "train", lambda: stage_train(ctx))
    if run.enabled:
        distributed.barrier(run)
        distributed.teardown(run)
        if run.rank > 0:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
            return BuildResult(out_dir=out_dir, report={})
    artifacts = [fp32]
    if recipe.prune is not None or recipe.quantize is not None:  # imported only when asked: nncf loads slowly
        from tlcompile.compress.stages import stage_prune, stage_quantize

        if recipe.prune is not None:
            artifacts.append(_timed(ctx, "prune", lambda: stage_prune(ctx, fp32)))
        if recipe.quantize is not None:
            artifacts += _timed(ctx, "quantize", lambda: stage_quantize(ctx, artifacts))
    _timed(ctx, "export", lambda: stage_export(ctx, artifacts))
    _timed(ctx, "bench", lambda: stage_bench(ctx, artifacts))
    report = assemble_report(ctx)
    bundle_error = stage_bundle(ctx, report) if recipe.bundle.enabled else None
    from tlcompile.report.render import write_reports

    atomic_write_json(out_dir / "report.json", report)
    write_reports(report, out_dir)
    write_build_manifest(ctx)
    if bundle_error is not None:
        raise bundle_error
    return BuildResult(out_dir=out_dir, report=report)
