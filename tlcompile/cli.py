"""The ``tlcompile`` command: parse, call the library, print. No logic lives here.

User mistakes (:class:`TlcompileError`) print one line on stderr and exit non-zero; no traceback.
Heavy modules (torch) are imported inside the commands that need them, so the runtime commands start fast
and work on a torch-free install.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from tlcompile.errors import TlcompileError
from tlcompile.runtime.backends import FILE_RUNTIMES, MODEL_SUFFIXES, RUNTIMES

app = typer.Typer(
    name="tlcompile",
    help="Edge-deployment model compiler for diabetic-retinopathy screening: recipe in, measured artifacts out.\n\n"
    "Words used everywhere: an artifact is one model variant (fp32, pruned, int8, pruned-int8); a runtime runs it "
    "(openvino, onnxruntime; torch as the reference); a candidate is an artifact on a runtime (int8@openvino); the "
    "accuracy guard's verdict is met, failed or reference; 'front' marks the Pareto front; deltas are new - fp32 in "
    "percentage points (pp).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Recipe utilities.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: check a recipe's data; the synthetic fundus generator.", no_args_is_help=True)
report_app = typer.Typer(help="Reports: render and merge.", no_args_is_help=True)
bundle_app = typer.Typer(help="Deployment bundles: make a signing key pair, sign a bundle.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(report_app, name="report")
app.add_typer(bundle_app, name="bundle")

SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional here
    typer.Option("--set", "-s", help="Override a recipe value: --set train.epochs=3 (repeatable)."),
]


def _console() -> Console:
    # Logs and CI are not terminals: give tables room instead of rich's 80-column default, unless COLUMNS says how wide.
    # Lines are never broken by rich (soft_wrap): a path broken across lines cannot be copied (report.json would print
    # as "report.\njson" under a long build folder); the terminal wraps what is too long, tables keep the width.
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console = Console(highlight=False, soft_wrap=True, width=max(console.width, 160))
    return console


def _hide_flag_types() -> None:
    """typer >= 0.20 shows ``<bool>`` beside every flag (``--help <bool>``); a flag takes no value, so show none."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - older typer shows no types
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_tlcompile", False):
        return

    def display_type_rich(self, ctx):  # noqa: ANN001, ANN202
        return None if getattr(self, "is_flag", False) and not getattr(self, "metavar", None) else shown(self, ctx)

    display_type_rich._tlcompile = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()


def _version(value: bool) -> None:
    if value:
        from tlcompile import __version__

        typer.echo(f"tlcompile {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """The options before any command (--version)."""


# The recipe's top-level sections, as tlcompile.recipe.Recipe declares them (a test keeps the two in step).
RECIPE_SECTIONS = (
    "name",
    "seed",
    "data",
    "model",
    "train",
    "export",
    "bench",
    "evaluate",
    "bundle",
    "quality",
    "transfer",
    "prune",
    "quantize",
    "tracking",
)
BUILD_HELP = (
    "Build a recipe: data -> train -> (prune, quantize) -> export -> bench -> quality -> report -> bundle "
    "-> explain.\n\n"
    f"Recipe sections (YAML keys, all optional): {', '.join(RECIPE_SECTIONS)}. "
    "data: source, split, preprocessing; model: arch, pretrained; evaluate: operating point, endpoints; "
    "bundle: selection, candidates, intended use; quality: the image-quality gate; tracking: MLflow.\n\n"
    "Every key with its type, default and description: tlcompile recipe schema. "
    "Check a recipe without running it: tlcompile validate RECIPE. Example: recipes/quickstart.yaml."
)


@app.command(help=BUILD_HELP)
def build(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: runs/<name>-<time>).")  # noqa: UP045
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the build in --out, reusing finished stages.")
    ] = False,
) -> None:
    from tlcompile.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    if resume and out is None:
        raise TlcompileError("--resume needs --out naming the build folder to continue")
    out = out or Path("runs") / f"{r.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    from tlcompile.build import build as run_build
    from tlcompile.data.datamodule import allow_worker_processes
    from tlcompile.report.render import artifact_table

    allow_worker_processes()  # this command's entry point is guarded: generated data may be drawn across processes
    console = _console()
    result = run_build(r, out, resume=resume, console=console)
    if not result.report:  # a torchrun worker (rank > 0): rank 0 reports
        return
    console.print(artifact_table(result.report))
    console.print(f"report: {out / 'report.json'}, {out / 'report.md'}, {out / 'report.html'}")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Check a recipe without running it; prints the resolved recipe's fingerprint."""
    from tlcompile.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    typer.echo(
        f"{recipe}: valid (name {r.name}, model {r.model.arch}, data {r.data.source}; sha256 {r.fingerprint()[:16]})"
    )


def _models_cache_key(size: int, num_classes: int) -> str:
    """What the models table depends on: tlcompile, torch and torchvision versions, the model code, size and classes."""
    import hashlib
    from importlib import metadata

    from tlcompile import __version__

    h = hashlib.sha256(f"{__version__}|{size}|{num_classes}".encode())
    for dist in ("torch", "torchvision"):
        try:
            h.update(f"|{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"|{dist}=none".encode())
    for source in sorted((Path(__file__).parent / "models").glob("*.py")):
        h.update(source.name.encode() + source.read_bytes())
    return h.hexdigest()[:24]


def _models_cache_dir() -> Path:
    root = os.environ.get("TLCOMPILE_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "tlcompile" if root else Path.home() / ".cache" / "tlcompile"


def model_rows(size: int, num_classes: int, console: Console | None = None) -> list[dict]:
    """Name, family, params, MACs, blocks and description of every registered model. Building ~25 models and counting
    their MACs takes ~20 s, so the result is cached under ~/.cache/tlcompile (TLCOMPILE_CACHE), keyed by everything it
    depends on (versions, the model code, size, classes): a hit needs no torch import at all."""
    from tlcompile.io import atomic_write_json

    path = _models_cache_dir() / f"models-{_models_cache_key(size, num_classes)}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, list) and all(
            isinstance(r, dict) and {"model", "params", "macs"} <= set(r) for r in cached
        ):
            return cached
    except (OSError, ValueError):
        pass
    from contextlib import nullcontext

    with console.status("loading torch and the model registry") if console else nullcontext() as status:
        from tlcompile.models import count_macs, count_params, get_model, list_models, model_info

        rows = []
        names = list_models()
        for i, name in enumerate(names, start=1):
            if status is not None:
                status.update(f"counting parameters and MACs: {name} ({i}/{len(names)}; cached for next time)")
            model = get_model(name, num_classes=num_classes)
            info = model_info(name)
            rows.append(
                {
                    "model": name,
                    "family": info.family,
                    "params": count_params(model),
                    "macs": count_macs(model, size),
                    "blocks": len(model.blocks()),
                    "description": info.description,
                }
            )
    try:
        atomic_write_json(path, rows)
    except OSError:  # a read-only home: list without caching
        pass
    return rows


@app.command()
def models(
    size: Annotated[int, typer.Option(help="Input size for the MACs column.", min=32, max=1024)] = 224,
    blocks: Annotated[Optional[str], typer.Option("--blocks", help="Show the transfer blocks of this model.")] = None,  # noqa: UP045
    num_classes: Annotated[int, typer.Option(help="Classes of the head.", min=1)] = 2,
) -> None:
    """List the registered models with parameters and MACs (cached after the first run)."""
    from tlcompile.runtime.terminal import FitTable

    console = _console()
    if blocks:
        from tlcompile.models import get_model

        model = get_model(blocks, num_classes=num_classes)
        table = FitTable(
            ["#", "block", "params"],
            title=f"{blocks}: blocks (input -> output); unfreeze_last / partial:K count these",
            right={"#", "params"},
        )
        for i, (name, module) in enumerate(model.blocks(), start=1):
            table.add_row(str(i), name, f"{sum(p.numel() for p in module.parameters()):,}")
        table.add_row("head", "classifier", f"{sum(p.numel() for p in model.get_classifier().parameters()):,}")
        console.print(table)
        return
    # The name (what --set model.arch= takes) is never cut; the description (which names the family) wraps.
    table = FitTable(
        ["model", "params", "MMACs", "blocks", "description"],
        title=f"registered models ({num_classes} classes, MACs at {size} px)",
        right={"params", "MMACs", "blocks"},
        wrap={"description"},
    )
    for r in model_rows(size, num_classes, console):
        table.add_row(r["model"], f"{r['params']:,}", f"{r['macs'] / 1e6:,.1f}", str(r["blocks"]), r["description"])
    console.print(table)


def _int_list(text: str, option: str, most: int | None = None) -> list[int]:
    """Comma-separated whole numbers, each once (a repeated value is measured once, not twice), in the order given."""
    try:
        values = [int(v) for v in text.split(",")]  # an empty entry ('1,,2') is a typo, refused
    except ValueError as err:
        raise TlcompileError(f"{option} '{text}': expected comma-separated whole numbers, e.g. 1,2,4") from err
    if not values or any(v < 1 for v in values):
        raise TlcompileError(f"{option} '{text}': every value must be >= 1")
    if most is not None and max(values) > most:
        raise TlcompileError(f"{option} '{text}': value {max(values)} is out of range; valid: 1 to {most}")
    return list(dict.fromkeys(values))


#: bench --batch: 1024 camera-size inputs at 224 px are ~600 MB of float32 already; 100,000 asked numpy for 28 GiB.
MAX_BENCH_BATCH = 1024


_BENCH_PATHS_HELP = f"Build folders, bundles or {'/'.join(MODEL_SUFFIXES)} files (default: the latest build in runs/)."
_BENCH_RUNTIME_HELP = (
    f"{' | '.join(FILE_RUNTIMES)} (repeatable; default: every runtime that opens the file: OpenVINO runs an .onnx too)."
)


@app.command()
def bench(
    paths: Annotated[Optional[list[Path]], typer.Argument(help=_BENCH_PATHS_HELP)] = None,  # noqa: UP045
    runtime: Annotated[
        Optional[list[str]], typer.Option("--runtime", "-r", help=_BENCH_RUNTIME_HELP)  # noqa: UP045
    ] = None,
    device: Annotated[str, typer.Option(help="OpenVINO device: CPU, GPU, NPU, AUTO.")] = "CPU",
    threads: Annotated[str, typer.Option(help="Thread counts to sweep, e.g. 1,2,4 (default: all cores).")] = "",
    batch: Annotated[str, typer.Option(help="Batch sizes to sweep, e.g. 1,8.")] = "1",
    precision: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="OpenVINO execution precision: auto | f32 | bf16 | f16 (default: what the build benched / the bundle "
            "deploys with)."
        ),
    ] = None,
    hint: Annotated[
        str, typer.Option(help="latency | throughput (throughput runs parallel requests/streams).")
    ] = "latency",
    iterations: Annotated[int, typer.Option(help="Timed inferences per row (at least).", min=1)] = 100,
    duration: Annotated[
        Optional[float], typer.Option(help="Time each row for at least this many seconds.", min=0)  # noqa: UP045
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed inferences first.", min=0)] = 10,
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Accuracy through the runtime: a recipe .yaml (its test split) or a folder of grade sub-folders."
        ),
    ] = None,
    budget_ms: Annotated[
        Optional[float], typer.Option("--budget-ms", help="Latency budget: pass/fail on p90.", min=0)  # noqa: UP045
    ] = None,
    e2e: Annotated[
        bool, typer.Option("--e2e", help="Also time decode + fundus crop + resize + inference on camera-size JPEGs.")
    ] = False,
    e2e_image: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option("--e2e-image", help="Camera images for --e2e (default: synthetic 2048x1536 JPEGs)."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Append the results to this JSON file.")] = None,  # noqa: UP045
) -> None:
    """Measure latency, throughput, memory and accuracy of exported models on this machine (torch-free)."""
    from tlcompile.benchdata import eval_set_loader, synthetic_camera_images
    from tlcompile.runtime.bench import BenchOptions, append_results, bench_table, check_results_target, run_bench
    from tlcompile.runtime.inference import check_threads, default_threads

    valid = {"precision": ("auto", "f32", "bf16", "f16"), "hint": ("latency", "throughput")}
    for option, value in (("precision", precision), ("hint", hint)):
        if value is not None and value not in valid[option]:
            raise TlcompileError(f"--{option} '{value}' is not valid; valid: {', '.join(valid[option])}")
    for r in runtime or []:
        if r not in FILE_RUNTIMES:
            eager = ", ".join(x for x in RUNTIMES if x not in FILE_RUNTIMES)
            raise TlcompileError(
                f"--runtime '{r}' is not valid; valid: {', '.join(FILE_RUNTIMES)} ({eager} rows come from the build)"
            )
    for image in e2e_image or []:
        if not image.is_file():
            raise TlcompileError(f"--e2e-image '{image}' does not exist")
    if out is not None:  # before anything is measured: a refused --out costs nothing
        check_results_target(out, list(paths or []))
    opts = BenchOptions(
        runtimes=list(dict.fromkeys(runtime)) if runtime else None,  # each once
        device=device,
        threads=[check_threads(t, f"--threads '{threads}': value") for t in _int_list(threads, "--threads")]
        if threads
        else [default_threads()],
        batches=_int_list(batch, "--batch", MAX_BENCH_BATCH),
        precision=precision,
        hint=hint,
        iterations=iterations,
        duration=duration,
        warmup=warmup,
        budget_ms=budget_ms,
        e2e=e2e or bool(e2e_image),
        e2e_images=list(e2e_image or []),
    )
    console = _console()
    with console.status("benchmarking") as status:
        if opts.e2e and not opts.e2e_images:
            opts.e2e_images = synthetic_camera_images(Path(os.environ.get("TMPDIR", "/tmp")) / "tlcompile-e2e")
        result = run_bench(
            list(paths or []),
            opts,
            eval_sets=eval_set_loader(data),
            on_row=lambda row: status.update(
                f"benchmarking: {row['name']} {row['runtime']} t={row['threads']} b={row['batch']}: p50 "
                f"{row['latency_ms']['p50']:.2f} ms"
            ),
        )
    from tlcompile.runtime.pinning import load_average

    load = load_average()
    rows = result["rows"]
    unstable = [f"{r['name']}/{r['runtime']}" for r in rows if not (r.get("stability") or {}).get("stable", True)]
    rounds = sorted({(r.get("stability") or {}).get("rounds", 1) for r in rows})
    noise = (
        f"p90 NOT stable after {max(rounds)} rounds for {', '.join(unstable)} (spread > 10% of p90): the box is busy, "
        "compare with care"
        if unstable
        else f"p90 stable within 10% over {min(rounds)}-{max(rounds)} rounds per row"
    )
    console.print(
        bench_table(
            rows,
            title=f"tlcompile bench on {result['host']['cpu']['model']} "
            f"(ISA: {', '.join(result['host']['cpu']['isa']) or '-'}"
            + (f"; load average {load[0]:.2f} on {os.cpu_count()} cores" if load else "")
            + f"): {noise}",
        )
    )
    preprocessing = sorted({r["e2e"]["preprocessing"] for r in rows if r.get("e2e")})  # every e2e row says which
    if preprocessing:
        console.print(f"e2e preprocessing here: {'; '.join(preprocessing)}")
    if out is not None:
        append_results(out, result)
        console.print(f"appended {len(result['rows'])} rows to {out}")


@report_app.command("merge")
def report_merge(
    results: Annotated[list[Path], typer.Argument(help="Results files written by `tlcompile bench --out`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the merged rows here as JSON.")] = None,  # noqa: UP045
) -> None:
    """Merge bench results from several devices into one table with one Pareto front."""
    from tlcompile.io import atomic_write_json
    from tlcompile.runtime.bench import bench_table, merge_results
    from tlcompile.runtime.outputs import check_new_file

    if out is not None:
        check_new_file("--out", out)  # its own input included
    rows = merge_results(results)
    _console().print(bench_table(rows, title=f"merged: {len(results)} files, {len(rows)} rows"))
    if out is not None:
        atomic_write_json(out, {"runs": [{"merged_from": [str(p) for p in results], "rows": rows}]})


@report_app.command("render")
def report_render(
    build_dir: Annotated[Path, typer.Argument(help="A build folder holding report.json.")],
) -> None:
    """Re-render report.md and report.html from BUILD_DIR/report.json alone."""
    from tlcompile.build.outdir import BUILD_MARKER
    from tlcompile.report.render import load_report, write_reports

    report = load_report(build_dir)
    if not (build_dir / BUILD_MARKER).is_file():
        mine = [name for name in ("report.md", "report.html") if (build_dir / name).exists()]
        if mine:
            raise TlcompileError(
                f"{build_dir} is not a build folder (no {BUILD_MARKER}); its {' and '.join(mine)} are never "
                "overwritten; copy report.json into a new folder and render there"
            )
    try:
        paths = write_reports(report, build_dir)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        from tlcompile.report.schema import validate_report

        validate_report(report)  # a report.json that does not match the schema: one line naming the first bad key
        raise  # it matches: a bug in the renderer, which keeps its traceback
    for path in paths:
        typer.echo(f"wrote {path}")


@report_app.command("schema")
def report_schema(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write it to a new file.")] = None,  # noqa: UP045
) -> None:
    """Print the JSON Schema of report.json, the contract other tools read (models: tlcompile.report.schema)."""
    from tlcompile.report.schema import report_json_schema

    text = json.dumps(report_json_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        with open(out, "x", encoding="utf-8") as f:  # "x": never overwrite
            f.write(text)
    except FileExistsError as err:
        raise TlcompileError(f"--out '{out}' already exists; give a new file name (nothing was written)") from err
    except OSError as err:
        raise TlcompileError(f"--out '{out}': cannot write it ({err.strerror or err})") from err
    typer.echo(f"wrote {out}")


# The three commands a clinic's box runs: they import tlcompile.runtime only (never torch), after
# `pip install tlcompile`.
BundleArgument = Annotated[Path, typer.Argument(help="The bundle folder a build wrote (BUILD_DIR/bundle).")]
ThreadsOption = Annotated[
    Optional[int], typer.Option("--threads", help="Inference threads (default: all usable cores).", min=1)  # noqa: UP045
]
# predict and serve: their workers keep the cores busy on a backlog (tlcompile.runtime.pipeline.model_threads)
BacklogThreadsOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--threads",
        help="Inference threads (default: all usable cores; beside several workers, for a model cheap beside the "
        "photo's decode (at most 100 M multiply-accumulates), the cores the workers leave, at least one).",
        min=1,
    ),
]
WorkersOption = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--workers",
        help="Threads that read, decode and preprocess photos ahead of the model, results kept in order "
        "(default: one per usable core, up to 4; 1: one photo at a time).",
    ),
]
TrustOption = Annotated[
    Optional[list[Path]],  # noqa: UP045
    typer.Option(
        "--trust",
        help="Public key (.pub from `tlcompile bundle keygen`): accept only a bundle this key signed (repeatable).",
    ),
]


FhirUrlOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--fhir-url",
        help="POST each FHIR Bundle (a transaction) to this FHIR server base URL, through an outbox folder that keeps "
        "every unsent one for the next run (implies --fhir; predict's default folder: ./fhir).",
    ),
]


PatientIdSystemOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--patient-id-system",
        help="FHIR: the register the DICOM PatientIDs come from, as a URI (urn:oid:..., https://hospital.example/mrn): "
        "the Patient identifier's system, so the server can match it, where a file's IssuerOfPatientID "
        "qualifiers name none (needs --fhir or --fhir-url).",
    ),
]


def _check_patient_id_system(value: str | None, fhir: bool) -> str | None:
    from tlcompile.runtime.outputs import check_identifier_system
    from tlcompile.runtime.terminal import printable

    if value is None:
        return None
    if not fhir:
        raise TlcompileError(
            f"--patient-id-system '{printable(value[:200])}' goes into FHIR bundles only; valid: with --fhir or "
            "--fhir-url"
        )
    return check_identifier_system(value)


def _count(n: int, noun: str) -> str:
    """'1 heatmap', '2 heatmaps'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _model_card_disclaimer(meta: dict) -> str | None:
    """One line from the bundle's model card: NOT for clinical use when it was trained on synthetic data."""
    card = meta.get("model_card") or {}
    if (card.get("data_provenance") or {}).get("source") == "synthetic":
        return (
            "note: this bundle was trained and tested on synthetic images only: a demonstration, NOT for clinical use"
        )
    return None


@app.command()
def predict(
    bundle: BundleArgument,
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write one CSV row per image here.")] = None,  # noqa: UP045
    threads: BacklogThreadsOption = None,
    workers: WorkersOption = None,
    trust: TrustOption = None,
    fhir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--fhir", help="Also write one FHIR R4B Bundle (DiagnosticReport + Observations) per image here."),
    ] = None,
    fhir_url: FhirUrlOption = None,
    patient_id_system: PatientIdSystemOption = None,
    explain: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--explain", help="Also write a heatmap overlay PNG per gradable image here (<stem>.explain.png)."
        ),
    ] = None,
) -> None:
    """Referral decision, grade and P(referable DR) per image, with the bundle's preprocessing (verified first)."""
    from collections import Counter

    from rich.table import Table
    from rich.text import Text

    from tlcompile.runtime.bundle import bundle_root, open_verified
    from tlcompile.runtime.inference import check_threads
    from tlcompile.runtime.outputs import check_output_folder, check_server_url, refuse_inside_bundle
    from tlcompile.runtime.pipeline import check_workers
    from tlcompile.runtime.predict import check_csv_target, expand_inputs, predict_paths, write_results_csv
    from tlcompile.runtime.terminal import printable

    workers, threads = check_workers(workers), check_threads(threads)
    skipped: list[str] = []
    paths = expand_inputs(images, skipped)
    for line in skipped:
        print(line, file=sys.stderr)
    workers = min(workers, max(1, len(paths)))  # one photo: one worker, whose model threads spin and answer sooner
    root = bundle_root(bundle)
    if csv is not None:  # before anything is decided: a refused --csv costs nothing
        check_csv_target(csv, inputs=paths, bundle_root=root)
    fhir_folder = fhir if fhir is not None else Path("fhir") if fhir_url else None
    patient_id_system = _check_patient_id_system(patient_id_system, fhir_folder is not None)
    if fhir_folder is not None:  # likewise a refused --fhir folder or --fhir-url
        if fhir_url:
            check_server_url(fhir_url)
        refuse_inside_bundle("--fhir", fhir_folder, root, kind="folder")
        check_output_folder("--fhir", fhir_folder, what="the FHIR bundles")
    if explain is not None:  # likewise a refused --explain target
        from tlcompile.runtime.explain import check_explain_dir, explain_targets

        targets = explain_targets(paths, check_explain_dir(explain, bundle_root=root, inputs=images))
    verified = open_verified(bundle, threads=threads, trust=trust, workers=workers, explain=explain is not None)
    print(verified.notice, file=sys.stderr)
    b = verified.bundle
    disclaimer = _model_card_disclaimer(b.meta)
    if disclaimer:
        print(disclaimer, file=sys.stderr)
    explainer = None
    if explain is not None:
        from tlcompile.runtime.explain import Explainer

        explainer = Explainer(b, verified.session)
    unexplained: list[str] = []  # heatmaps that could not be written (their decisions stand)

    def warn(line: str) -> None:
        unexplained.append(line)
        print(line, file=sys.stderr)

    results = predict_paths(
        b,
        verified.session,
        paths,
        workers=workers,
        explain=(lambda path, prepared: explainer.write(prepared, targets[path])) if explainer else None,
        warn=warn,
    )
    table = Table(title=f"{b.name} ({b.candidate_id}): refer when P(referable DR) >= {b.threshold:.4f}")
    for col in ("image", "referral", "P(referable DR)") + (("grade",) if b.task == "grade" else ()) + ("note",):
        table.add_column(col, justify="right" if col.startswith("P(") else "left")
    names = Counter(Path(r.file).name for r in results)  # a name two inputs share is shown as given (a/x.jpg, b/x.jpg)
    for r in results:
        prob = "-" if r.referable_dr_probability is None else f"{r.referable_dr_probability:.3f}"
        note = r.error or (r.ungradable_reason or "no field of view found: retake or refer" if r.ungradable else "")
        # file names and messages as plain text, escaped: a name like '[red]x.jpg' or one holding ESC or a
        # right-to-left override neither restyles nor reorders the table
        table.add_row(
            Text(printable(Path(r.file).name if names[Path(r.file).name] == 1 else r.file)),
            r.referral or "ERROR",
            prob,
            *((r.grade_name or "-",) if b.task == "grade" else ()),
            Text(printable(note)),
        )
    console = _console()
    console.print(table)
    if csv is not None:
        write_results_csv(results, csv, inputs=paths, bundle_root=verified.bundle.root)
        console.print(f"wrote {csv}")
    if explainer is not None and explainer.ms:
        console.print(
            f"wrote {_count(sum(r.explanation is not None for r in results), 'heatmap')} into {explain} "
            f"({explainer.method}, "
            f"median {sorted(explainer.ms)[len(explainer.ms) // 2]:.0f} ms per image)"
        )
    if unexplained:
        print(
            f"error: {_count(len(unexplained), 'heatmap')} could not be written (see above); every decision stands",
            file=sys.stderr,
        )
    unsent = (
        _write_fhir(verified, results, fhir_folder, fhir_url, console, patient_id_system)
        if fhir_folder is not None
        else 0
    )
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"error: {failed} of {len(results)} images could not be read (see the note column)", file=sys.stderr)
        raise typer.Exit(1)
    if unsent or unexplained:  # an output asked for is missing: the decisions stand, the run did not do all it was told
        raise typer.Exit(1)


def _write_fhir(
    verified: Any, results: list, folder: Path, url: str | None, console: Any, patient_id_system: str | None
) -> int:
    """predict --fhir: one FHIR bundle per decided image; returns how many still wait in the outbox."""
    import datetime as dt

    from tlcompile.runtime.fhir import FhirOutput, model_identity

    out = FhirOutput(
        folder,
        model_identity(verified),
        url=url,
        log=lambda line: print(line, file=sys.stderr),
        patient_id_system=patient_id_system,
    )
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    # one bundle per image and model: copies of one photo under other names share it (the same ids: exactly once)
    named = {out.write({**r.to_dict(), "processed_at": now}).get("fhir") for r in results} - {None}
    left = out.flush(final=True)
    earlier = len(named) - out.written  # an earlier run's (exactly once: never written again)
    console.print(
        f"wrote {_count(out.written, 'FHIR bundle')} to {folder}"
        + (f" ({earlier} already there)" if earlier else "")
        + (f"; sent {out.sent} to {url}" if url else "")
    )
    return left


@app.command()
def verify(
    bundle: BundleArgument,
    threads: ThreadsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")] = False,
    repin: Annotated[
        bool,
        typer.Option(
            "--repin", help="Bench the candidates again and re-pin, even if device.json already pins one for this CPU."
        ),
    ] = False,
    no_pin: Annotated[
        bool, typer.Option("--no-pin", help="Check only; do not bench the candidates or write device.json.")
    ] = False,
    trust: TrustOption = None,
) -> None:
    """Check every sha256 in the bundle's manifest (and, with --trust, its signature) and run every candidate's golden
    samples on this box; bench those that pass and pin the fastest for this CPU in BUNDLE/device.json (predict and
    serve run it): PASS or FAIL (exit 1)."""
    from tlcompile.runtime.bundle import BUNDLE_JSON, bundle_root, load_bundle, verify_bundle, verify_lines
    from tlcompile.runtime.inference import check_threads
    from tlcompile.runtime.manifest import MANIFEST_JSON

    threads = check_threads(threads)
    root = bundle_root(bundle)
    if not as_json and not (root.is_dir() and ((root / BUNDLE_JSON).exists() or (root / MANIFEST_JSON).exists())):
        # not a bundle at all (a typo, an image): one line, exit 2; a damaged one gets the report, and --json always
        # does (a monitor parses it: passed false, exit 1)
        load_bundle(bundle)
    result = verify_bundle(bundle, threads=threads, pin=not no_pin, repin=repin, trust=trust)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else "\n".join(verify_lines(result)))
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def serve(
    bundle: BundleArgument,
    watch: Annotated[
        Path,
        typer.Option(
            "--watch",
            help="Folder the fundus camera writes images into (its images are never modified; the records go to "
            "WATCH/results unless --out says where).",
        ),
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Folder for the JSON records (default: WATCH/results).")  # noqa: UP045
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Decide the images there now, then exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between looks at the folder.")] = 1.0,
    settle: Annotated[
        float, typer.Option(help="Seconds a file must stay unchanged before it is read (camera still writing).")
    ] = 1.0,
    threads: BacklogThreadsOption = None,
    workers: WorkersOption = None,
    trust: TrustOption = None,
    fhir: Annotated[
        bool, typer.Option("--fhir", help="Also write one FHIR R4B Bundle per decided image into OUT/fhir/.")
    ] = False,
    fhir_url: FhirUrlOption = None,
    patient_id_system: PatientIdSystemOption = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Also write a heatmap overlay PNG beside each gradable image's record.")
    ] = False,
) -> None:
    """Watch a folder: one JSON record per new image (errors/ for unreadable files); restart-safe; Ctrl-C stops."""
    from tlcompile.runtime.inference import check_threads
    from tlcompile.runtime.outputs import check_server_url
    from tlcompile.runtime.serve import serve as run_serve

    threads = check_threads(threads)
    if fhir_url:
        check_server_url(fhir_url)  # at start: a long-running serve would otherwise stop at its first image
    patient_id_system = _check_patient_id_system(patient_id_system, bool(fhir or fhir_url))
    outputs = []
    if fhir or fhir_url:
        from tlcompile.runtime.fhir import FhirOutput, model_identity

        def fhir_output(verified: Any, out_dir: Path) -> FhirOutput:
            return FhirOutput(
                out_dir / "fhir",
                model_identity(verified),
                url=fhir_url,
                log=lambda line: print(line, flush=True),
                in_records=True,
                patient_id_system=patient_id_system,
            )

        outputs.append(fhir_output)

    stats = run_serve(
        bundle,
        watch,
        out,
        once=once,
        interval=interval,
        settle=settle,
        threads=threads,
        workers=workers,
        trust=trust,
        log=lambda line: print(line, flush=True),
        outputs=outputs,
        explain=explain,
    )
    typer.echo(stats.summary())


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="Base recipe YAML file.")],
    grid: Annotated[
        list[str], typer.Option("--grid", "-g", help="key.path=v1,v2 (repeatable); every combination is built.")
    ],
    set_: SetOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Sweep folder (default: runs/sweep-<name>-<time>).")  # noqa: UP045
    ] = None,
    address: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--address",
            help="host:port of a running Ray cluster (`ray start --head --port PORT`); default: RAY_ADDRESS, else a "
            "local Ray. 'local' forces a local Ray.",
        ),
    ] = None,
    cpus_per_variant: Annotated[int, typer.Option(help="CPU cores reserved (and threads used) per build.", min=1)] = 1,
) -> None:
    """Build every combination of --grid values on Ray; merge all rows into one report with the Pareto front."""
    from tlcompile.recipe import load_recipe
    from tlcompile.sweep import render_sweep_markdown, run_sweep

    base = load_recipe(recipe, set_ or [])
    out = out or Path("runs") / f"sweep-{base.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    console = _console()
    report = run_sweep(
        recipe,
        grid,
        out_dir=out,
        base_overrides=set_ or [],
        address=address,
        cpus_per_variant=cpus_per_variant,
        on_done=lambda v, o: console.print(
            f"{v.name}: {'done' if o['ok'] else 'FAILED: ' + o['error']} ({o.get('wall_s', 0):.0f} s)"
        ),
    )
    console.print(render_sweep_markdown(report))
    console.print(f"sweep report: {out / 'sweep.json'}, {out / 'sweep.md'}")
    failed = [v["name"] for v in report["variants"] if not v["ok"]]
    if failed:
        raise TlcompileError(
            f"{len(failed)} of {len(report['variants'])} variants failed: {', '.join(failed)} (their errors are in "
            "sweep.md)"
        )


@bundle_app.command("keygen")
def bundle_keygen(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Folder for tlcompile-signing.key (0600) and tlcompile-signing.pub; existing files are never "
            "overwritten.",
        ),
    ],
) -> None:
    """Make an Ed25519 key pair for signing bundles: keep the .key with whoever releases models, put the .pub on \
the boxes."""
    from tlcompile.runtime.signing import keygen

    private_path, public_path, kid = keygen(out)
    typer.echo(
        f"key {kid}: private {private_path} (mode 0600; keep it off the boxes), public {public_path} (give it to "
        "verify/predict/serve --trust)"
    )


@bundle_app.command("sign")
def bundle_sign(
    bundle: BundleArgument,
    key: Annotated[Path, typer.Option("--key", help="Private key file from `tlcompile bundle keygen`.")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing signature.json.")] = False,
) -> None:
    """Sign the bundle's manifest.json (which holds the sha256 of every bundle file): writes BUNDLE/signature.json."""
    from tlcompile.runtime.signing import SIGNATURE_JSON, sign_bundle

    record = sign_bundle(bundle, key, replace=replace)
    typer.echo(
        f"signed {bundle / 'manifest.json'} (sha256 {record['manifest_sha256'][:16]}) with key {record['key_id']}: "
        f"{bundle / SIGNATURE_JSON}"
    )


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe's JSON Schema (for editors: yaml-language-server)."""
    from tlcompile.recipe import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema(), indent=2))


@data_app.command("synth")
def data_synth(
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Write an APTOS-style folder here (train.csv + train_images/).")  # noqa: UP045
    ] = None,
    n: Annotated[
        int,
        typer.Option("--n", help="Number of images (at most 200,000, as a recipe's num_images).", min=1, max=200_000),
    ] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.", min=32, max=4096)] = 256,
    seed: Annotated[int, typer.Option(help="Seed.", min=0)] = 0,
    difficulty: Annotated[
        Optional[float], typer.Option(help="0 (obvious) .. 1 (subtle); default: the generator's.", min=0, max=1)  # noqa: UP045
    ] = None,
    style: Annotated[str, typer.Option(help="Camera look.")] = "default",
    preview: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--preview", help="Write a PNG grid, one row per grade, beside a real retina photo."),
    ] = None,
    degrade: Annotated[
        int,
        typer.Option(
            "--degrade",
            help="Also write this many degraded copies per image (blur, exposure, partial field, glare, eyelash "
            "shadow, uneven light) into --out's degraded_images/, listed in degraded.csv with a gradable column "
            "(the rule: tlcompile/data/degrade.py).",
            min=0,
            max=20,
        ),
    ] = 0,
) -> None:
    """Generate synthetic fundus images with DR grades 0-4."""
    from tlcompile.data import synthetic

    if out is None and preview is None:
        raise TlcompileError("data synth: give --out DIR (an APTOS-style dataset) and/or --preview FILE.png")
    if degrade and out is None:
        raise TlcompileError(f"data synth: --degrade {degrade} writes beside the dataset; give --out DIR as well")
    if style not in synthetic.FUNDUS_STYLES:
        raise TlcompileError(f"--style '{style}' is not valid; valid: {', '.join(sorted(synthetic.FUNDUS_STYLES))}")
    _check_new_outputs(out, preview)  # before anything is generated: a user's file is never replaced
    kwargs = {"seed": seed, "style": style}
    if difficulty is not None:
        kwargs["difficulty"] = difficulty
    if out is not None:
        csv_path = synthetic.write_aptos(out, n, size=size, **kwargs)
        typer.echo(f"wrote {n} images and {csv_path}")
        if degrade:
            from tlcompile.data.degrade import write_degraded

            typer.echo(f"wrote {n * degrade} degraded copies and {write_degraded(out, seed=seed, per_image=degrade)}")
    if preview is not None:
        real = None
        try:
            from skimage import data as skdata

            real = skdata.retina()
        except ImportError:
            pass
        typer.echo(f"wrote {synthetic.preview_grid(preview, real_image=real, **kwargs)}")


def _check_new_outputs(out: Path | None, preview: Path | None) -> None:
    """data synth's --out must be a new or empty folder, --preview a new .png file, both where this user can write."""
    from tlcompile.runtime.outputs import check_new_file, check_output_folder

    if out is not None:
        check_output_folder("--out", out, what="the data set")
        if out.is_dir() and any(out.iterdir()):
            raise TlcompileError(
                f"--out '{out}' is a folder that is not empty; a data set is written only into a new or empty folder "
                "(nothing in it is ever replaced)"
            )
    if preview is not None:
        check_new_file("--preview", preview)
        if preview.suffix.lower() != ".png":
            raise TlcompileError(f"--preview '{preview}' is not a .png file name; give one such as preview.png")


def _check_data_check_out(out: Path) -> None:
    """data check's --out: a folder; data_check.json and problems.csv in it are replaced only when a data check wrote
    them."""
    from tlcompile.data.checks import PROBLEMS_CSV_COLUMNS
    from tlcompile.runtime.outputs import check_output_folder

    check_output_folder("--out", out, what="data_check.json and problems.csv")
    for name, ours in (
        ("problems.csv", lambda text: text.split("\n", 1)[0].strip() == ",".join(PROBLEMS_CSV_COLUMNS)),
        ("data_check.json", lambda text: '"problem_counts"' in text and text.lstrip().startswith("{")),
    ):
        path = out / name
        if path.exists() or path.is_symlink():
            try:
                text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
            except OSError:
                text = ""
            if path.is_symlink() or not ours(text):
                raise TlcompileError(
                    f"--out '{out}': {name} there is not one a data check wrote; it is never overwritten; "
                    "give another folder"
                )


@data_app.command("check")
def data_check(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (its data section is checked).")],
    set_: SetOption = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Also write data_check.json and problems.csv into this folder.")  # noqa: UP045
    ] = None,
) -> None:
    """Check a recipe's data alone: images per grade, sizes, patients, split, and every bad file with its reason.
    Exits 1 when problems are found."""
    from tlcompile.data.datamodule import check_data
    from tlcompile.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    if out is not None:  # before the check runs: a refused --out costs nothing
        _check_data_check_out(out)
    report = check_data(r.data, seed=r.seed)
    for line in report.summary_lines():
        typer.echo(line)
    if out is not None:
        json_path, csv_path = report.write(out)
        typer.echo(f"wrote {json_path} and {csv_path}")
    if report.problems or any(note.startswith("no build can use this split") for note in report.notes):
        raise typer.Exit(1)


# click's errors, as the typer installed raises them (typer >= 0.22 carries its own copy of click): found from the one
# it exports, so either kind is caught.
_CLICK_ERRORS = {c.__name__: c for c in typer.BadParameter.__mro__}
_UsageError, _ClickException = _CLICK_ERRORS["UsageError"], _CLICK_ERRORS["ClickException"]


def _usage_line(err: Any, argv: list[str]) -> str:
    """A usage error (a missing argument, an unknown option or command, a value of the wrong type) as one line that
    names the value given and where to read what is valid, instead of click's usage block and box."""
    message = " ".join(err.format_message().split()).rstrip(".")
    param = getattr(err, "param", None)
    if isinstance(err, typer.BadParameter) and getattr(param, "param_type_name", "") == "option":
        given = None
        for i, token in enumerate(argv):
            for opt in param.opts:
                if token == opt and i + 1 < len(argv):
                    given, spelled = argv[i + 1], opt
                elif token.startswith(opt + "="):
                    given, spelled = token[len(opt) + 1 :], opt
        if given is not None:
            message = f"{spelled} {given!r} is not valid: {err.message.rstrip('.')}"
    path = err.ctx.command_path if err.ctx is not None else "tlcompile"
    if "No such command" not in message:  # an option's missing value is reported by a parent group's context
        deepest = _command_path(argv)
        path = deepest if len(deepest) > len(path) else path
    return f"{path}: {message}; see '{path} --help'"


def _command_path(argv: list[str]) -> str:
    """'tlcompile data synth' for ``data synth --n``: the deepest command the arguments name."""
    command, path = typer.main.get_command(app), ["tlcompile"]
    for token in argv:
        commands = getattr(command, "commands", None)
        if not commands or token not in commands:
            break
        command = commands[token]
        path.append(token)
    return " ".join(path)


def _empty_value(argv: list[str]) -> str | None:
    """The one-line refusal of an empty value (``--watch ''``, ``--watch=``, an image ``''``), or None. An empty path
    is the current folder to Python: ``serve --watch "$DIR"`` with DIR unset would watch and write where it was run."""
    if "--help" in argv or "-h" in argv:
        return None
    for i, token in enumerate(argv):
        before = argv[i - 1] if i else ""
        if re.fullmatch(r"-[A-Za-z]=.*", token) and "--" not in argv[:i]:
            # click reads -o=out as the value '=out' (a build then wrote into a folder named '=')
            path = _command_path(argv)
            return (
                f"{path}: {token!r}: a short option takes its value after a space ({token[:2]} VALUE), or give "
                f"the long name with '='; see '{path} --help'"
            )
        if token.startswith("--") and "=" in token and not token.split("=", 1)[1]:
            what = f"the value of {token.split('=', 1)[0]}"
        elif token == "" and before.startswith("-") and before != "--" and "=" not in before:
            what = f"the value after {before}"
        elif token == "":
            what = "an argument"
        else:
            continue
        path = _command_path(argv)
        return f"{path}: {what} is empty (''); give a value, see '{path} --help'"
    return None


def _one_line(message: str) -> str:
    """A message whose quoted value holds a line break, escaped onto one line."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def main() -> None:
    """Console-script entry point. A user mistake prints one line on stderr and exits with its code (2): one raised
    by the library, and a usage error (see :func:`_usage_line`); Ctrl-C exits with 130. Anything else is a bug and
    keeps its traceback."""
    # numpy's BLAS (OpenBLAS) shares a product out to a thread per core and then keeps those threads spinning, waiting
    # for the next one: on a 2-core box one spinning thread takes a core from ONNX Runtime's, OpenVINO's or torch's
    # own threads, which do all of tlcompile's heavy work. One numpy product per batch of RISE masks made every
    # session call after it twice as slow (quickstart explain stage 9.0-10.1 s -> 4.5-5.2 s with one BLAS thread,
    # 2-core AVX-512 EPYC; checkpoints byte-identical). numpy's own products here are small. Read when numpy is first
    # imported, which the commands do after this line; a value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    empty = _empty_value(sys.argv[1:])
    if empty:
        print(f"error: {_one_line(empty)}", file=sys.stderr)
        sys.exit(2)
    try:
        from tlcompile.runtime.threads import default_threads  # (not runtime.inference: numpy, 67 ms a command)

        if not {"--help", "-h", "--version"} & set(sys.argv[1:]):  # (help and the version need no threads)
            default_threads()  # a bad TLCOMPILE_NUM_THREADS is said before anything runs, not where a command reads it
        code = app(prog_name="tlcompile", standalone_mode=False)  # click raises its errors, not prints them in a box
    except TlcompileError as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except _UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a command group named alone: its help, as click shows it
            if err.format_message().strip():  # (typer's rich help is printed while the error is made)
                print(err.format_message(), file=sys.stderr)
            sys.exit(err.exit_code)
        print(f"error: {_one_line(_usage_line(err, sys.argv[1:]))}", file=sys.stderr)
        sys.exit(err.exit_code)
    except _ClickException as err:  # e.g. a file argument click could not open
        print(f"error: {' '.join(err.format_message().split())}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Abort:  # end of input at a prompt
        print("aborted", file=sys.stderr)
        sys.exit(1)
    # typer.Exit(code) and Ctrl-C (130) come back as the code; no command returns a value, so anything else is a
    # success (0), as in click's own standalone mode
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":
    main()
