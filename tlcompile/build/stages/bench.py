"""``06_bench``: every artifact on every runtime of the recipe: test-split logits, latency, clinical evaluation.

One row per (artifact, runtime) in ``bench.json`` (and report.json's ``artifacts``); the test logits are saved beside
it so every clinical number can be recomputed. Measured again on every build, also under --resume."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tlcompile.build.context import Artifact, BuildContext, Stage
from tlcompile.evaluate.clinical import add_clinical_to_rows
from tlcompile.evaluate.metrics import classification_metrics
from tlcompile.io import atomic_save_npy, atomic_write_json
from tlcompile.models import count_macs, count_params
from tlcompile.runtime.backends import backend, size_bytes
from tlcompile.runtime.inference import default_threads, open_session, predict_logits
from tlcompile.runtime.latency import measure_latency
from tlcompile.runtime.preprocess import LazyInputs


def run(ctx: BuildContext, artifacts: list[Artifact]) -> list[Artifact]:
    r, data, folder = ctx.recipe, ctx.data, ctx.stage.folder
    threads = r.bench.threads or default_threads()
    x_test, y_test = data.subset("test")
    test_inputs = LazyInputs(x_test, data.spec)  # converted a batch at a time
    one = np.ascontiguousarray(test_inputs[:1])
    previous_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    row_logits: list[np.ndarray] = []  # the test logits of each row, in order (also saved beside bench.json)
    try:
        torch.set_num_threads(threads)
        for art in artifacts:
            params = count_params(art.module)
            macs = count_macs(art.module, data.spec.size)
            for runtime in r.bench.runtimes:
                row = backend(runtime)
                fmt = row.format
                path = art.files.get(fmt)
                if path is None:
                    ctx.console.print(
                        f"[yellow]bench[/]: no {fmt} export of {art.name}; add it to export.formats for a {runtime} row"
                    )
                    continue
                with ctx.console.status(f"[bold]bench[/]: {art.name} on {runtime}"):
                    if row.opens_files:
                        session = open_session(path, runtime, threads=threads, precision=r.bench.precision)
                    else:  # the eager torch row: the module in memory
                        session = _torch_session(art.module, threads)
                    logits = predict_logits(session, test_inputs)
                    row_logits.append(logits)
                    latency = measure_latency(
                        lambda s=session: s.run(one),
                        warmup=r.bench.warmup,
                        iterations=r.bench.iterations,
                        max_seconds=r.bench.max_seconds,
                    )
                metrics = classification_metrics(logits / ctx.operating_point["temperature"], y_test, ctx.threshold)
                logits_path = atomic_save_npy(folder / "logits" / f"{art.name}.{runtime}.npy", logits)
                rows.append(
                    {
                        "name": art.name,
                        "format": fmt,
                        "precision": art.precision,
                        "path": str(path.relative_to(ctx.out_dir)),
                        "size_bytes": size_bytes(path),
                        "params": params,
                        "macs": macs,
                        "runtime": runtime,
                        "threads": session.threads,
                        "exec_precision": session.exec_precision,
                        "latency_ms": {
                            k: round(v, 4) for k, v in latency.items() if k in ("p50", "p90", "p99", "mean", "first_ms")
                        },
                        "latency_iterations": int(latency["iterations"]),
                        "metrics": {
                            k: metrics[k]
                            for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "threshold", "n")
                        },
                        "parity": art.parity.get(
                            fmt, {"max_abs_diff": 0.0, "top1_agreement": 1.0, "reference": "self"}
                        ),
                        "lineage": art.lineage,
                        "logits_path": str(logits_path.relative_to(ctx.out_dir)),
                        # Compressed artifacts: the accuracy guard on val (met / checks / actions) and what
                        # compression did.
                        **{k: art.metadata[k] for k in ("guard", "compression") if k in art.metadata},
                    }
                )
        for art in artifacts:
            art.module.to(ctx.device)
    finally:
        torch.set_num_threads(previous_threads)
    atomic_save_npy(folder / "logits" / "test_targets.npy", y_test)
    with ctx.console.status("[bold]evaluate[/]: bootstrap CIs, paired deltas vs fp32, calibration"):
        add_clinical_evaluation(ctx, rows, row_logits, y_test)
    flag_test_drops(rows)
    ctx.bench_rows = rows
    atomic_write_json(folder / "bench.json", rows)
    ctx.stage.record = {"rows": len(rows)}
    return artifacts


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


def flag_test_drops(rows: list[dict[str, Any]]) -> None:
    """``row["test_flags"]``: where a compressed artifact's test-split drop against the model its guard compared it
    with (same runtime) exceeds the guard's own limits. Flags only: selection stays on val (choosing on test would make
    the test figures optimistic), but a reader must see when test disagrees with the val verdict."""
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
                flags.append(
                    {
                        "metric": metric,
                        "reference": check["against"],
                        "drop": round(a - b, 6),
                        "max_drop": limit,
                        "text": f"test {metric} {100 * (b - a):+.1f} pp vs {check['against']} (guard limit "
                        f"{-100 * limit:.1f} pp; the guard judged val)",
                    }
                )
        row["test_flags"] = flags


def bootstrap_seed(ctx: BuildContext) -> int:
    return ctx.recipe.seed if ctx.recipe.evaluate.seed is None else ctx.recipe.evaluate.seed


def add_clinical_evaluation(
    ctx: BuildContext, rows: list[dict[str, Any]], logits: list[np.ndarray], test_targets: np.ndarray
) -> None:
    """Add ``clinical`` to every bench row from its test logits (the ones saved beside it), at the locked operating
    point."""
    e, op = ctx.recipe.evaluate, ctx.operating_point
    add_clinical_to_rows(
        rows,
        logits,
        test_targets,
        threshold=op["threshold"],
        temperature=op["temperature"],
        endpoints=e.endpoints.model_dump(exclude={"rule"}),
        endpoint_rule=e.endpoints.rule,
        resamples=e.bootstrap_resamples,
        seed=bootstrap_seed(ctx),
        calibration_bins=e.calibration_bins,
    )


STAGE = Stage(name="bench", folder="06_bench", sections=None, run=run, reusable=False)
