"""Where a clinic box's time per photo goes, and how fast it clears a backlog: decode / preprocess / checks / infer.

On camera-size JPEGs (4000x3000 by default: synthetic fundus frames from tlcompile.benchdata and scikit-image's
retina() upscaled onto a black 4:3 frame), through a bundle's own preprocessing and model:

- per photo, p50 of: decode (``load_rgb`` with the JPEG draft scale predict uses), preprocess (field of view fit,
  crop, resize, normalise: ``prepare_image`` + ``to_input``), checks (``damage_reason`` + ``not_fundus_reason``),
  infer (the session), and total (``predict_image``: everything predict does for one photo); the
  preprocess/decode ratio (target <= 0.15);
- backlog: images/s of ``predict_paths`` over ``--backlog`` photos with 1 and 2 workers (``--workers``), in
  interleaved rounds (the median round; on a shared machine the load moves, interleaving makes it hit both alike),
  and their ratio (target >= 1.6 on 2 cores).

It prints the CPU's ISA and the load average beside the figures: on a loaded machine compare ratios from one run.
It also prints which crop-and-resize ran (``TLCOMPILE_FAST_PREPROCESS=0`` measures Pillow's on the same checkout).
It runs on older checkouts too (then the backlog has one worker only), to measure before/after:

    PYTHONPATH=. .venv/bin/python benchmarks/e2e.py [--bundle BUNDLE] [--backlog 200] [--rounds 3]
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/e2e.py --bundle BUNDLE   # same images, old code

Without ``--bundle`` it builds the tests' tiny bundle (cbr_small, 48 px; needs the [train] extras) once into
``--cache``: its model is far cheaper than the quickstart's, so give a quickstart bundle for the README's figures.
"""

# ruff: noqa: E402 - the BLAS setting below must come before numpy is imported
from __future__ import annotations

import os

# As the tlcompile command does (tlcompile.cli.main): numpy's BLAS on one thread, whose spinning threads would
# otherwise take a core from the runtime's. Read when numpy is first imported; a value already set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import inspect
import io
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlcompile.runtime.bundle import load_bundle
from tlcompile.runtime.predict import predict_image, predict_paths
from tlcompile.runtime.preprocess import find_field, load_rgb, prepare_image, to_input
from tlcompile.runtime.screen import damage_reason, not_fundus_reason


def isa() -> str:
    try:
        found = subprocess.run(
            "grep -o -w -E 'avx2|avx512f|avx512_vnni|amx_int8' /proc/cpuinfo | sort -u",
            shell=True,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
    except OSError:
        found = []
    model = ""
    try:
        model = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
    except OSError:
        pass
    return f"{model or 'unknown CPU'}; {len(os.sched_getaffinity(0))} usable cores; ISA: {' '.join(found) or 'n/a'}"


def resize_path() -> str:
    """Which crop-and-resize the preprocessing runs: the compiled kernel, or Pillow and why (old checkouts: Pillow)."""
    try:
        from tlcompile.runtime import fast_preprocess
    except ImportError:
        return "Pillow (this checkout has no compiled kernel)"
    return fast_preprocess.status()


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def camera_images(folder: Path, width: int, height: int, distinct: int) -> list[Path]:
    """``distinct`` synthetic camera frames plus scikit-image's retina on a black frame, all width x height JPEGs."""
    from tlcompile.benchdata import synthetic_camera_images

    paths = synthetic_camera_images(folder, count=distinct, width=width, height=height)
    retina_path = folder / f"skimage_retina_{width}x{height}.jpg"
    if not retina_path.is_file():
        import skimage.data

        side = min(width, height)
        frame = Image.new("RGB", (width, height))
        square = Image.fromarray(skimage.data.retina()).resize((side, side), Image.BICUBIC)
        frame.paste(square, ((width - side) // 2, (height - side) // 2))
        frame.save(retina_path, quality=92)
    return [retina_path, *paths]


def backlog_folder(folder: Path, sources: list[Path], count: int) -> list[Path]:
    """``count`` camera files (copies of the sources in turn): what a clinic's folder holds after a busy morning."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        path = folder / f"{i:04d}_{source.name}"
        if not path.is_file():
            shutil.copyfile(source, path)
        paths.append(path)
    return paths


def tiny_bundle(cache: Path) -> Path:
    """The tests' tiny build (cbr_small, 48 px, 1 epoch), built once."""
    bundle = cache / "tiny-build" / "bundle"
    if (bundle / "bundle.json").is_file():
        return bundle
    from rich.console import Console

    from tlcompile.build import build
    from tlcompile.recipe import validate_recipe_dict

    recipe = validate_recipe_dict(
        {
            "name": "tiny-bundle",
            "seed": 0,
            "data": {"source": "synthetic", "num_images": 120, "image_size": 48, "split": {"val": 0.2, "test": 0.25}},
            "model": {"arch": "cbr_small"},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.0003},
            "export": {"formats": ["onnx", "openvino"], "parity_images": 16},
            "bench": {"runtimes": ["openvino", "onnxruntime"], "warmup": 1, "iterations": 3},
            "evaluate": {"bootstrap_resamples": 200},
            "bundle": {"golden_samples": 6},
        }
    )
    build(recipe, cache / "tiny-build", console=Console(file=io.StringIO(), width=200))
    return bundle


def per_photo(bundle, session, images: list[Path], iterations: int) -> dict[str, float]:
    spec = bundle.preprocessing
    times: dict[str, list[float]] = {k: [] for k in ("decode", "preprocess", "checks", "infer", "total")}
    for i in range(iterations + len(images)):  # the first pass over the images is warm-up
        path = images[i % len(images)]
        t0 = time.perf_counter()
        rgb = load_rgb(path, draft_size=spec.size * 2)
        t1 = time.perf_counter()
        prepared, _ = prepare_image(rgb, spec)
        x = to_input(prepared, spec)
        t2 = time.perf_counter()
        damage_reason(rgb)
        not_fundus_reason(rgb, find_field(rgb, spec.fov_threshold))
        t3 = time.perf_counter()
        session.run(x)
        t4 = time.perf_counter()
        predict_image(bundle, session, path)
        t5 = time.perf_counter()
        if i >= len(images):
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                times[key].append(seconds * 1e3)
    return {key: float(np.percentile(v, 50)) for key, v in times.items()}


def backlog(bundle, sessions, paths: list[Path], workers_list: list[int], rounds: int) -> dict[int, float]:
    """Median images/s per worker count over interleaved rounds."""
    has_workers = "workers" in inspect.signature(predict_paths).parameters
    if not has_workers:
        workers_list = [1]
    rates: dict[int, list[float]] = {w: [] for w in workers_list}
    for _ in range(rounds):
        for workers in workers_list:
            kwargs = {"workers": workers} if has_workers else {}
            t0 = time.perf_counter()
            results = predict_paths(bundle, sessions(workers), paths, **kwargs)
            rates[workers].append(len(paths) / (time.perf_counter() - t0))
            errors = [r.error for r in results if r.error]
            if errors or [r.file for r in results] != [str(p) for p in paths]:
                raise SystemExit(f"backlog run with {workers} workers went wrong: {errors[:1]}")
    return {w: statistics.median(v) for w, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle folder (default: build the tiny test bundle)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tlcompile-e2e-bench"), help="images and tiny bundle")
    parser.add_argument("--size", default="4000x3000", help="camera frame WIDTHxHEIGHT")
    parser.add_argument("--distinct", type=int, default=3, help="distinct synthetic frames (plus the retina)")
    parser.add_argument("--iterations", type=int, default=40, help="per-photo timings")
    parser.add_argument("--backlog", type=int, default=200, help="photos in the backlog (0: per-photo timings only)")
    parser.add_argument("--workers", default="1,2", help="worker counts for the backlog")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved backlog rounds")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: all usable cores)")
    args = parser.parse_args()
    match = re.fullmatch(r"(\d+)x(\d+)", args.size)
    if not match:
        raise SystemExit(f"--size {args.size!r} is not WIDTHxHEIGHT (e.g. 4000x3000)")
    width, height = int(match[1]), int(match[2])
    if args.backlog < 0:
        raise SystemExit(f"--backlog {args.backlog} is negative; valid: 0 (per-photo timings only) or more photos")
    bundle_path = args.bundle or tiny_bundle(args.cache)
    bundle = load_bundle(bundle_path)
    session = bundle.open_session(threads=args.threads)
    # The backlog's sessions as predict and serve open them (runtime.bundle.open_verified): with more than one
    # worker the runtime's threads sleep between runs, and the model gets the cores the workers leave (at least one),
    # where the checkout has those.
    quiet = "busy_wait" in inspect.signature(bundle.open_session).parameters
    try:
        from tlcompile.runtime.pipeline import model_threads
    except ImportError:  # an older checkout: all cores
        model_threads = None
    opened = {}

    def backlog_session(workers: int):
        if workers <= 1 or not quiet:
            return session
        if workers not in opened:
            macs = (bundle.meta.get("artifact") or {}).get("macs")
            if model_threads is None:
                threads = args.threads
            elif "macs" in inspect.signature(model_threads).parameters:
                threads = args.threads or model_threads(workers, macs=macs)
            else:
                threads = args.threads or model_threads(workers)
            opened[workers] = bundle.open_session(threads=threads, busy_wait=False)
        return opened[workers]

    images = camera_images(args.cache / f"camera_{width}x{height}", width, height, args.distinct)
    paths = backlog_folder(args.cache / f"backlog_{width}x{height}", images, args.backlog)

    print(f"CPU: {isa()}; numpy BLAS threads: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    print(f"bundle: {bundle_path} ({bundle.candidate_id}, {bundle.preprocessing.size} px input)")
    print(f"crop and resize: {resize_path()}")
    print(f"images: {len(images)} distinct {width}x{height} JPEGs; load average before: {load()}")
    stages = per_photo(bundle, session, images, args.iterations)
    print(f"load average after per-photo timing: {load()}")
    workers = [int(w) for w in args.workers.split(",")]
    rates = {}
    if paths:
        rates = backlog(bundle, backlog_session, paths, workers, args.rounds)
        print(f"load average after backlog: {load()}")
    print()
    print("| decode | preprocess | checks | infer | predict total | preprocess/decode |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {stages['decode']:.2f} | {stages['preprocess']:.2f} | {stages['checks']:.2f} | {stages['infer']:.2f} | "
        f"{stages['total']:.2f} | {stages['preprocess'] / stages['decode']:.3f} |"
    )
    print("(ms, p50 per photo)")
    if not rates:
        return
    print()
    line = ", ".join(
        f"{w} worker{'s' if w > 1 else ''} (model threads {backlog_session(w).threads}): {r:.1f} img/s"
        for w, r in rates.items()
    )
    if 1 in rates and len(rates) > 1:
        best = max(rates)
        line += f"; {best} vs 1: {rates[best] / rates[1]:.2f}x"
    print(f"backlog of {len(paths)} photos (predict_paths, median of {args.rounds} interleaved rounds): {line}")


if __name__ == "__main__":
    main()
