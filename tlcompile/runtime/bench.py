"""``tlcompile bench``: latency, throughput, memory and accuracy of exported models, measured where they run.

Torch-free (the edge box has no torch). Targets come from a build folder (report.json + its exports), a bundle
(bundle.json + model files) or model files (.xml, .onnx). Every row records what really ran: the execution
precision read back from the runtime, the thread count and the CPU's instruction sets.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlcompile.compat import import_openvino
from tlcompile.errors import TlcompileError
from tlcompile.evaluate.metrics import classification_metrics
from tlcompile.io import atomic_write_json
from tlcompile.runtime import fast_preprocess
from tlcompile.runtime.backends import FILE_RUNTIMES, FORMATS, MODEL_SUFFIXES, RUNTIMES, backend, format_of, size_bytes
from tlcompile.runtime.bundle import BUNDLE_JSON, bundle_root
from tlcompile.runtime.cpuinfo import cpu_info
from tlcompile.runtime.inference import default_threads, open_session, predict_logits
from tlcompile.runtime.latency import measure_latency
from tlcompile.runtime.outputs import check_parent_writable, refuse_inside_bundle
from tlcompile.runtime.preprocess import PreprocessSpec, load_rgb, prepare_image, targets_for, to_input

# The model files bench takes and the formats it reads from a build report: those a runtime session opens.
FILE_FORMATS = tuple(backend(r).format for r in FILE_RUNTIMES)  # ('openvino', 'onnx')
_SUFFIXES_SLASH = " / ".join(MODEL_SUFFIXES)  # '.xml / .onnx'
_SUFFIXES_OR = " or ".join(MODEL_SUFFIXES)  # '.xml or .onnx'
# (images, DR grades) to score a model on, prepared with the spec it is given (``--data``; see tlcompile.benchdata).
EvalSetLoader = Callable[[PreprocessSpec], tuple[np.ndarray, np.ndarray]]


class BenchError(TlcompileError):
    """A bench target or option is invalid."""


@dataclass
class BenchTarget:
    """One model file to measure, with what the build knew about it."""

    name: str
    files: dict[str, Path]  # format (backends.FORMATS: 'openvino' | 'onnx') -> model file
    precision: str = "unknown"
    spec: PreprocessSpec | None = None
    threshold: float | None = None
    temperature: float = 1.0  # locked with the threshold on the FP32 model's val split (temperature scaling)
    run_precision: str = (
        "auto"  # OpenVINO precision the build benched / the bundle deploys with (--precision overrides)
    )
    macs: int | None = None
    lineage: str = ""
    source: str = ""
    build_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # runtime -> metrics from the build

    @property
    def path(self) -> Path:
        """The file that describes the model's input (IR preferred)."""
        return next(self.files[f] for f in FORMATS if f in self.files)


# ------------------------------------------------------------------------------------------ discovery
def latest_build(root: Path = Path("runs")) -> Path:
    builds = [p.parent for p in root.glob("*/report.json")] if root.is_dir() else []
    if not builds:
        raise BenchError(
            f"no PATH given and no build found under '{root}/' (a folder with report.json); "
            "give a build folder, bundle or model file"
        )
    return max(builds, key=lambda p: (p / "report.json").stat().st_mtime)


def _spec_from(d: dict[str, Any] | None) -> PreprocessSpec | None:
    return PreprocessSpec.from_dict(d) if d else None


def targets_from_build(build_dir: Path) -> list[BenchTarget]:
    try:
        report = json.loads((build_dir / "report.json").read_text())
    except (OSError, ValueError, RecursionError) as err:
        why = err if not isinstance(err, RecursionError) else "nested too deeply"
        raise BenchError(f"{build_dir / 'report.json'}: cannot read the build report ({why})") from err
    spec = _spec_from(report.get("preprocessing"))
    threshold = report.get("operating_point", {}).get("threshold")
    temperature = report.get("operating_point", {}).get("temperature") or 1.0
    targets: dict[str, BenchTarget] = {}
    for row in report.get("artifacts", []):
        if row.get("format") not in FILE_FORMATS:
            continue
        target = targets.setdefault(
            row["name"],
            BenchTarget(
                name=row["name"],
                files={},
                precision=row.get("precision", "unknown"),
                spec=spec,
                threshold=threshold,
                temperature=temperature,
                run_precision=report.get("recipe", {}).get("bench", {}).get("precision", "auto"),
                macs=row.get("macs"),
                lineage=row.get("lineage", ""),
                source=str(build_dir),
            ),
        )
        target.files[row["format"]] = build_dir / row["path"]
        target.build_metrics[row["runtime"]] = row.get("metrics", {})
    if not targets:
        raise BenchError(f"{build_dir}: the build report lists no ONNX or OpenVINO artifacts to bench")
    return list(targets.values())


def targets_from_bundle(bundle_dir: Path) -> list[BenchTarget]:
    """One target per artifact of the bundle, with the model file of each runtime it is a candidate on."""
    try:
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        op = meta["operating_point"]
        listed = meta.get("candidates") or [{"artifact": meta["artifact"], "model": meta["model"]}]
        targets: dict[str, BenchTarget] = {}
        for c in listed:
            artifact, model = c["artifact"], c["model"]
            files = {format_of(f): bundle_dir / f for f in model["files"] if Path(f).suffix in MODEL_SUFFIXES}
            target = targets.setdefault(
                artifact.get("name", "bundle"),
                BenchTarget(
                    name=artifact.get("name", "bundle"),
                    files={},
                    precision=artifact.get("precision", "unknown"),
                    spec=_spec_from(meta.get("preprocessing")),
                    threshold=op.get("threshold"),
                    temperature=op.get("temperature") or 1.0,
                    run_precision=model.get("precision", "auto")
                    if model.get("precision") in ("auto", "f32", "bf16", "f16")
                    else "auto",
                    macs=artifact.get("macs"),
                    lineage=artifact.get("lineage", ""),
                    source=str(bundle_dir),
                ),
            )
            target.files.update(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise BenchError(f"{bundle_dir / 'bundle.json'}: cannot read the bundle ({err})") from err
    if not any(t.files for t in targets.values()):
        raise BenchError(f"{bundle_dir}: the bundle holds no {_SUFFIXES_OR} model")
    return list(targets.values())


def discover_targets(paths: list[Path]) -> list[BenchTarget]:
    """Build folders, bundles and model files -> targets (no PATH: the most recent build under runs/)."""
    paths = list(paths) or [latest_build()]
    targets: list[BenchTarget] = []
    for path in paths:
        if path.is_dir() and (path / "report.json").is_file():
            targets += targets_from_build(path)
        elif path.is_dir() and (path / "bundle.json").is_file():
            targets += targets_from_bundle(path)
        elif path.is_file() and path.suffix in MODEL_SUFFIXES:
            targets.append(BenchTarget(name=path.stem, files={format_of(path): path}, source=str(path)))
        elif not path.exists():
            raise BenchError(
                f"'{path}' does not exist; give a build folder, a bundle folder, or a {_SUFFIXES_SLASH} file"
            )
        else:
            raise BenchError(
                f"'{path}' is not a build folder (report.json), a bundle (bundle.json), or a {_SUFFIXES_SLASH} model"
            )
    # model files of one name in two formats (pruned.xml, pruned.onnx) on one runtime gave two rows both 'pruned':
    # such files are named with their suffix
    stems = [t.name for t in targets if t.source and Path(t.source).is_file()]
    for t in targets:
        if t.source and Path(t.source).is_file() and stems.count(t.name) > 1:
            t.name = Path(t.source).name
    names = [t.name for t in targets]
    for t in targets:  # still two of one name (a/fp32.onnx, b/fp32.onnx; a file beside a build's fp32): the path
        if t.source and Path(t.source).is_file() and names.count(t.name) > 1:
            t.name = str(t.source)
    return targets


def _input_size(target: BenchTarget) -> int:
    if target.spec is not None:
        return target.spec.size
    # A bare model file: read the input's spatial size from the model itself.
    ov = import_openvino()

    shape = ov.Core().read_model(str(target.path)).inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape]
    if len(dims) != 4 or dims[2] is None:
        raise BenchError(
            f"{target.path}: cannot tell the input size from shape {shape}; bench a build folder or bundle instead"
        )
    return int(dims[2])


# --------------------------------------------------------------------------------------------- memory
def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (Linux: writing 5 to clear_refs) so each row gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # pragma: no cover - Windows
        return None


# -------------------------------------------------------------------------------------------- measure
@dataclass
class BenchOptions:
    runtimes: list[str] | None = None  # None: each file's natural runtime
    device: str = "CPU"
    threads: list[int] = field(default_factory=lambda: [default_threads()])
    batches: list[int] = field(default_factory=lambda: [1])
    precision: str | None = None  # None: what the build benched / the bundle deploys with
    hint: str = "latency"
    iterations: int = 100
    duration: float | None = None
    warmup: int = 10
    budget_ms: float | None = None
    e2e: bool = False
    e2e_images: list[Path] = field(default_factory=list)
    # Latency is measured in rounds until the p90 spread over them is within ``stable_spread`` of the median p90
    # (at least ``min_rounds``, at most ``max_rounds``); the row says how stable it got.
    min_rounds: int = 3
    max_rounds: int = 7
    stable_spread: float = 0.10


def _runtimes_for(target: BenchTarget, requested: list[str] | None) -> list[str]:
    """Each runtime the target has a file for: OpenVINO runs IR (or ONNX), ONNX Runtime runs ONNX."""
    available = [r for r in FILE_RUNTIMES if _path_for(target, r) is not None]
    if not requested:
        return available
    for runtime in requested:
        if runtime in RUNTIMES and not backend(runtime).opens_files:  # torch: the build's eager rows
            raise BenchError(
                f"--runtime {runtime} is not available in `tlcompile bench` (the edge box has no "
                f"{backend(runtime).package}); the build report has {runtime} rows"
            )
    return [r for r in requested if r in available]


def _path_for(target: BenchTarget, runtime: str) -> Path | None:
    return backend(runtime).file_for(target.files)


def measure(
    target: BenchTarget,
    runtime: str,
    threads: int,
    batch: int,
    opts: BenchOptions,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One row: latency percentiles, throughput, first inference, peak RSS, GMAC/s, accuracy if data is given.

    ``eval_set``: (images prepared with the target's spec, DR grades), as a :data:`EvalSetLoader` returns them."""
    path = _path_for(target, runtime)
    size = _input_size(target)
    try:
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    except MemoryError as err:
        raise BenchError(
            f"--batch {batch}: {batch} inputs of {size}x{size} px need {batch * 3 * size * size * 12 / 2**30:.1f} GiB "
            "to make, more than this machine could allocate; give a smaller --batch"
        ) from err
    precision = opts.precision or target.run_precision
    _reset_peak_rss()
    t0 = time.perf_counter()
    session = open_session(
        path,
        runtime,
        threads=threads,
        precision=precision,
        device=opts.device,
        hint=opts.hint.upper(),
        static_batch=batch,
    )
    compile_ms = (time.perf_counter() - t0) * 1e3
    latency, stability = measure_in_rounds(lambda: session.run(x), opts)
    throughput = batch * 1e3 / latency["mean"]
    streams = None
    if opts.hint == "throughput" and hasattr(session, "throughput"):
        tp = session.throughput(x, seconds=max(1.0, opts.duration or 2.0))
        throughput, streams = tp["fps"], tp["streams"]
    row: dict[str, Any] = {
        "name": target.name,
        "format": format_of(path),
        "precision": target.precision,
        "path": str(path),
        "source": target.source,
        "lineage": target.lineage,
        "runtime": runtime,
        "device": opts.device if backend(runtime).devices else "CPU",
        "threads": session.threads,
        "batch": batch,
        "hint": opts.hint,
        "requested_precision": precision,
        "exec_precision": session.exec_precision,
        "latency_ms": {k: round(latency[k], 4) for k in ("p50", "p90", "p99", "mean", "min")},
        "first_inference_ms": round(latency["first_ms"], 3),
        "compile_ms": round(compile_ms, 1),
        "iterations": latency["iterations"],
        "stability": stability,
        "throughput_fps": round(throughput, 2),
        "streams": streams,
        "peak_rss_mb": _peak_rss_mb(),
        "size_bytes": size_bytes(path),
        "macs": target.macs,
        "gmacs_per_s": round(target.macs * batch / (latency["p50"] / 1e3) / 1e9, 2) if target.macs else None,
    }
    if eval_set is not None:
        images, labels = eval_set
        logits = predict_logits(
            open_session(path, runtime, threads=threads, precision=precision, device=opts.device),
            to_input(images, target.spec or PreprocessSpec(size=size)),
        )
        if target.threshold is None:
            raise BenchError(
                f"{target.path}: no locked operating point is known for this model; "
                "bench its build folder or bundle to get accuracy"
            )
        targets = targets_for(labels, "referable" if logits.shape[1] == 2 else "grade")
        m = classification_metrics(logits / target.temperature, targets, target.threshold)
        row["metrics"] = {k: m[k] for k in ("auc", "sensitivity", "specificity", "accuracy", "threshold", "n")}
        row["metrics_source"] = "bench --data"
    elif runtime in target.build_metrics:
        row["metrics"] = target.build_metrics[runtime]
        row["metrics_source"] = "build test split"
    if opts.e2e and batch == 1:  # the box handles one photo at a time
        row["e2e"] = measure_end_to_end(
            session,
            target.spec or PreprocessSpec(size=size),
            opts.e2e_images,
            opts.warmup,
            max(5, opts.iterations // 5),
        )
    if opts.budget_ms is not None:
        row["budget_ms"] = opts.budget_ms
        row["within_budget"] = bool(row["latency_ms"]["p90"] <= opts.budget_ms)
    return row


def measure_in_rounds(run, opts: BenchOptions) -> tuple[dict[str, float], dict[str, Any]]:
    """Latency in rounds: repeat until the p90 spread over the rounds (max - min) is within ``opts.stable_spread`` of
    their median p90, or ``opts.max_rounds`` is reached. Returns the median of each percentile over the rounds (the
    first-call time of the first round) and the stability record: rounds, p90 spread (ms and share), whether stable."""
    rounds = [measure_latency(run, warmup=opts.warmup, iterations=opts.iterations, min_seconds=opts.duration or 0.0)]
    while True:
        p90s = np.array([r["p90"] for r in rounds])
        spread = float(p90s.max() - p90s.min())
        share = spread / float(np.median(p90s)) if np.median(p90s) > 0 else 0.0
        enough = len(rounds) >= opts.min_rounds
        if (enough and share <= opts.stable_spread) or len(rounds) >= opts.max_rounds:
            break
        rounds.append(measure_latency(run, warmup=1, iterations=opts.iterations, min_seconds=opts.duration or 0.0))
    latency = {k: float(np.median([r[k] for r in rounds])) for k in ("p50", "p90", "p99", "mean", "min")}
    latency.update(first_ms=rounds[0]["first_ms"], iterations=int(sum(r["iterations"] for r in rounds)))
    return latency, {
        "rounds": len(rounds),
        "p90_spread_ms": round(spread, 4),
        "p90_spread_share": round(share, 4),
        "stable": bool(share <= opts.stable_spread),
    }


def measure_end_to_end(
    session, spec: PreprocessSpec, images: list[Path], warmup: int, iterations: int
) -> dict[str, Any]:
    """What the box really does per photo: decode the JPEG, crop the field of view, resize, normalise, infer."""
    times: dict[str, list[float]] = {"decode_ms": [], "preprocess_ms": [], "infer_ms": [], "total_ms": []}
    for i in range(warmup + iterations):
        path = images[i % len(images)]
        t0 = time.perf_counter()
        rgb = load_rgb(path, draft_size=spec.size * 2)
        t1 = time.perf_counter()
        prepared, _ = prepare_image(rgb, spec)
        x = to_input(prepared, spec)
        t2 = time.perf_counter()
        session.run(x)
        t3 = time.perf_counter()
        if i >= warmup:
            for key, value in (
                ("decode_ms", t1 - t0),
                ("preprocess_ms", t2 - t1),
                ("infer_ms", t3 - t2),
                ("total_ms", t3 - t0),
            ):
                times[key].append(value * 1e3)
    out = {key: round(float(np.percentile(v, 50)), 3) for key, v in times.items()}
    out["total_p90_ms"] = round(float(np.percentile(times["total_ms"], 90)), 3)
    with_size = load_rgb(images[0])
    out["image_size"] = [int(with_size.shape[1]), int(with_size.shape[0])]
    # The compiled preprocessing loops, or numpy and Pillow and why (a box without a C compiler): the same results,
    # not the same milliseconds.
    out["preprocessing"] = fast_preprocess.status()
    return out


# ----------------------------------------------------------------------------------------- analysis
def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """A row is on the accuracy-vs-latency Pareto front when no other row is both faster (p50) and at least as
    accurate (AUC), with one strictly better. Rows without an AUC are not ranked."""
    ranked = [r for r in rows if r.get("metrics", {}).get("auc") is not None]
    for r in rows:
        r["pareto"] = None
    for r in ranked:
        lat, auc = r["latency_ms"]["p50"], r["metrics"]["auc"]
        r["pareto"] = not any(
            o is not r
            and o["latency_ms"]["p50"] <= lat
            and o["metrics"]["auc"] >= auc
            and (o["latency_ms"]["p50"] < lat or o["metrics"]["auc"] > auc)
            for o in ranked
        )


def host_record() -> dict[str, Any]:
    return {"hostname": platform.node(), "cpu": cpu_info(), "platform": platform.platform(), "pid": os.getpid()}


def run_bench(
    paths: list[Path], opts: BenchOptions, *, eval_sets: EvalSetLoader | None = None, on_row=None
) -> dict[str, Any]:
    """Every row of every target. ``eval_sets``: accuracy through the runtime (``--data``), one set per input size;
    ``opts.e2e`` needs ``opts.e2e_images`` (camera photos; the CLI renders synthetic ones when none are given)."""
    targets = discover_targets(paths)
    if opts.e2e and not opts.e2e_images:
        raise BenchError("end-to-end timing (--e2e) needs camera images (e2e_images); none were given")
    loaded: dict[int, Any] = {}
    rows = []
    for target in targets:
        eval_set = None
        if eval_sets is not None:
            spec = target.spec or PreprocessSpec(size=_input_size(target))
            eval_set = loaded.get(spec.size)
            if eval_set is None:
                eval_set = loaded[spec.size] = eval_sets(spec)
        for runtime in _runtimes_for(target, opts.runtimes):
            for threads in opts.threads:
                for batch in opts.batches:
                    row = measure(target, runtime, threads, batch, opts, eval_set)
                    rows.append(row)
                    if on_row:
                        on_row(row)
    mark_pareto(rows)
    host = host_record()
    for row in rows:
        row["host"] = f"{host['hostname']} ({host['cpu']['model']})"
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": host, "rows": rows}


def check_results_target(path: Path, models: Iterable[Path] = ()) -> None:
    """``--out``, before anything is measured: not inside a bundle being benched, not a folder, a results file of
    ``tlcompile bench --out`` if it exists (it is appended to, never replaced), and in a folder that can be written."""
    for model in models:
        if (bundle_root(model) / BUNDLE_JSON).is_file():
            refuse_inside_bundle("--out", path, model)
    if path.is_dir():
        raise BenchError(f"--out '{path}' is a folder; give a results file such as bench.json")
    if path.exists():
        try:
            read_results(path)
        except BenchError as err:
            raise BenchError(
                f"--out {err}; it is never overwritten; give a new file name, or a results file to append to"
            ) from err
    check_parent_writable("--out", path)


def append_results(path: Path, run: dict[str, Any]) -> None:
    """``--out``: results files hold a list of runs; a new run is appended (atomically), earlier ones kept."""
    runs = read_results(path)["runs"] if path.is_file() else []
    try:
        atomic_write_json(path, {"runs": [*runs, run]})
    except OSError as err:
        raise BenchError(
            f"--out '{path}': cannot write it ({err.strerror or err}); the table above was not saved"
        ) from err


def read_results(path: Path) -> dict[str, Any]:
    wanted = "give a results JSON written by tlcompile bench --out"
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise BenchError(f"results file '{path}' does not exist; {wanted}") from err
    except UnicodeDecodeError as err:  # an image, an archive: not text at all
        raise BenchError(f"'{path}': not a bench results file (not text); {wanted}") from err
    except (OSError, ValueError) as err:  # ValueError: not JSON
        raise BenchError(f"'{path}': not a bench results file ({err}); {wanted}") from err
    except RecursionError as err:
        raise BenchError(f"'{path}': not a bench results file (nested too deeply); {wanted}") from err
    if not isinstance(obj, dict) or not isinstance(obj.get("runs"), list):
        raise BenchError(
            f"'{path}': not a bench results file (expected {{\"runs\": [...]}} written by tlcompile bench --out)"
        )
    for i, run in enumerate(obj["runs"]):  # what merging and the table read of each row
        rows = run.get("rows") if isinstance(run, dict) else None
        if not isinstance(rows, list):
            raise BenchError(f"'{path}': runs[{i}] has no 'rows' list; not a run written by tlcompile bench --out")
        for j, row in enumerate(rows):
            missing = [k for k in ("name", "runtime", "latency_ms") if not isinstance(row, dict) or k not in row]
            if missing or not isinstance(row.get("latency_ms"), dict):
                raise BenchError(
                    f"'{path}': runs[{i}].rows[{j}] lacks {', '.join(missing) or 'a latency_ms mapping'}; not a row "
                    "written by tlcompile bench --out"
                )
            _check_row(row, f"'{path}': runs[{i}].rows[{j}]")
    return obj


# What the table and the Pareto front compute with: a number (or absent), as bench --out writes them.
_ROW_NUMBERS = (
    ("latency_ms", "p50"), ("latency_ms", "p90"), ("throughput_fps",), ("gmacs_per_s",), ("peak_rss_mb",),
    ("metrics", "auc"), ("stability", "p90_spread_ms"), ("e2e", "total_ms"), ("threads",), ("batch",),
)  # fmt: skip


def _check_row(row: dict[str, Any], where: str) -> None:
    """One line naming the first value of a results row that is not what bench --out writes (a hand-edited or
    damaged file ended in a traceback where the table formats it)."""
    for key in ("name", "runtime"):
        if not isinstance(row[key], str):
            raise BenchError(f"{where}.{key} is {row[key]!r}; expected a name (a string), as bench --out writes it")
    for keys in _ROW_NUMBERS:
        value: Any = row
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is None and keys != ("latency_ms", "p50"):  # the median latency every row has (the front ranks by it)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise BenchError(
                f"{where}.{'.'.join(keys)} is {value!r}; expected a finite number >= 0, as bench --out writes it"
            )


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """All rows of several results files (e.g. from different devices) in one list, Pareto front recomputed."""
    rows = [row for p in paths for run in read_results(p)["runs"] for row in run["rows"]]
    mark_pareto(rows)
    return rows


def bench_table(rows: list[dict[str, Any]], *, title: str):
    """Terminal table of bench rows: what ran, latency, throughput, memory, accuracy, Pareto and budget. Never truncates
    (:class:`tlcompile.runtime.terminal.FitTable`): all-empty columns are dropped, and a narrow terminal gets one block
    per row. The words are the report's: artifact, runtime, Pareto ``front``."""
    from tlcompile.runtime.terminal import FitTable, num

    hosts = {r.get("host") for r in rows}
    # p99, first inference, compile time, file size and sens/spec at the operating point are in the JSON (--out).
    columns = [
        "artifact",
        "runtime",
        "exec",
        "threads",
        "batch",
        "p50 ms",
        "p90 ms",
        "±p90",
        "img/s",
        "GMAC/s",
        "RSS MB",
        "AUC",
        "Pareto",
    ]
    if any("e2e" in r for r in rows):
        columns.insert(9, "e2e ms")
    if any("within_budget" in r for r in rows):
        columns.append("budget")
    if len(hosts) > 1:
        columns.insert(0, "host")
    table = FitTable(
        columns,
        title=title,
        right={c for c in columns if c not in ("host", "artifact", "runtime", "exec", "Pareto")},
        key=2 if len(hosts) > 1 else 1,
    )
    for r in rows:
        m, lat = r.get("metrics") or {}, r["latency_ms"]
        cells = {
            "host": str(r.get("host", "")),
            "artifact": r["name"],
            "runtime": r["runtime"] + ("" if r.get("device", "CPU") == "CPU" else f"/{r['device']}"),
            "exec": str(r.get("exec_precision", "-")),
            "threads": str(r.get("threads", "-")),
            "batch": str(r.get("batch", 1)),
            "p50 ms": num(lat.get("p50"), ".2f"),
            "p90 ms": num(lat.get("p90"), ".2f"),
            # The p90 spread over the measurement rounds; '!' marks a row that never got within 10% (a busy box).
            "±p90": num((r.get("stability") or {}).get("p90_spread_ms"), ".2f")
            + ("" if (r.get("stability") or {}).get("stable", True) else "!"),
            "e2e ms": num((r.get("e2e") or {}).get("total_ms"), ".1f"),
            "img/s": num(r.get("throughput_fps"), ".1f"),
            "GMAC/s": num(r.get("gmacs_per_s"), ".1f"),
            "RSS MB": num(r.get("peak_rss_mb"), ".0f"),
            "AUC": num(m.get("auc"), ".3f"),
            "Pareto": {True: "front", False: "", None: "-"}[r.get("pareto")],
            "budget": {True: "pass", False: "FAIL"}.get(r.get("within_budget"), "-"),
        }
        table.add_row(*[cells[c] for c in columns])
    return table
