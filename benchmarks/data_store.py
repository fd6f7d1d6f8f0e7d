"""data.store: disk against data.store: memory: a build's peak memory vs the data set's size, training throughput,
and how fast the store is built.

    .venv/bin/python benchmarks/data_store.py rss [--sizes 1000,2000,4000] [--px 96]
    .venv/bin/python benchmarks/data_store.py rss-data [--sizes 1000,2000,4000] [--px 96] [--workers 2]
        [--distinct 64] [--memory-max 8000]
    .venv/bin/python benchmarks/data_store.py throughput [--images 512] [--px 384]
    .venv/bin/python benchmarks/data_store.py build-rate [--images 256] [--px 384]

rss: one 2-epoch ``tlcompile build`` (synthetic images, cbr_small, onnxruntime only, one thread) per size and store,
in a subprocess; memory sampled every 0.2 s over the build's whole process tree (loader and generator processes
included): peak anonymous memory (Pss_Anon: what the build itself holds, pages shared with forked loaders counted
once) and peak Pss (adds the pages of memory-mapped store files: page cache the kernel takes back under pressure).
The store is written before the measured build (by ``load_data`` of the same recipe), so the build reads it as later
builds and sweep variants do.
rss-data: the same, for the data path alone (load, 2 epochs of training batches, the val/test passes; no model).

throughput: training images/s (mobilenet_v3_small, batch 32, forward + backward + step) from an in-memory array and
from the store with 0 and 2 loader processes, alternated in one process so the ratios share the machine's load.

build-rate: generated images drawn, preprocessed and written to a new store per second with 1 and 2 worker processes
(TLCOMPILE_NUM_THREADS). Timings on a shared machine are noisy: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def _isa() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags)


def _tree_memory(pid: int) -> tuple[int, int]:
    """(anonymous, all) proportional set size in bytes over ``pid`` and its descendants (Pss_Anon, Pss of
    smaps_rollup): pages a forked loader process shares with its parent are counted once, not once per process."""
    import psutil

    anon = pss = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss_Anon:"):
                anon += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return anon, pss


def _peak_of(cmd: list[str], env: dict) -> tuple[float, int, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    peak_anon = peak_all = 0
    while proc.poll() is None:
        anon, allm = _tree_memory(proc.pid)
        peak_anon, peak_all = max(peak_anon, anon), max(peak_all, allm)
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {err[-2000:]}")
    return time.perf_counter() - t0, peak_anon, peak_all, out


def _recipe(folder: Path, n: int, px: int, store: str) -> Path:
    data = {"source": "synthetic", "num_images": n, "image_size": px, "split": {"val": 0.15, "test": 0.2}}
    if store == "disk":
        data.update(store="disk", cache=str(folder / "cache"))
    recipe = {
        "name": f"store-{store}-{n}",
        "seed": 0,
        "data": data,
        "model": {"arch": "cbr_small"},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.002},
        "export": {"formats": ["onnx"], "parity_images": 16},
        "bench": {"runtimes": ["onnxruntime"], "warmup": 1, "iterations": 3},
    }
    path = folder / f"{store}-{n}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _build(recipe: Path, out: Path) -> tuple[float, int, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLCOMPILE_NUM_THREADS": os.environ.get("TLCOMPILE_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlcompile.cli", "build", str(recipe), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        anon, rss = _tree_memory(proc.pid)
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"build of {recipe} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t0, peak_anon, peak_rss


def _write_store(recipe: Path) -> None:
    code = (
        "import sys; from tlcompile.recipe import load_recipe; from tlcompile.data.datamodule import load_data; "
        "r = load_recipe(sys.argv[1]); load_data(r.data, seed=r.seed)"
    )
    subprocess.run([sys.executable, "-c", code, str(recipe)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def rss(sizes: list[int], px: int) -> None:
    print(f"2-epoch builds, synthetic {px} px, cbr_small; CPU {_isa()}; {_load()}")
    print("| images | dataset MB (uint8) | store | wall s | peak anon MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tlstore") as tmp:
        folder = Path(tmp)
        for n in sizes:
            for store in ("memory", "disk"):
                recipe = _recipe(folder, n, px, store)
                if store == "disk":  # write the store first: the build measured reads it
                    _write_store(recipe)
                wall, anon, peak = _build(recipe, folder / f"{store}-{n}")
                mb = n * px * px * 3 / 1e6
                print(f"| {n} | {mb:.0f} | {store} | {wall:.0f} | {anon / 1e6:.0f} | {peak / 1e6:.0f} |", flush=True)
        disk = sum(f.stat().st_size for f in (folder / "cache").rglob("*") if f.is_file())
        print(f"store + generated files on disk for all sizes: {disk / 1e6:.0f} MB; {_load()}")


def throughput(n: int, px: int, rounds: int = 3) -> None:
    import numpy as np
    import torch

    from tlcompile.data.datamodule import load_data
    from tlcompile.models import get_model
    from tlcompile.recipe import DataConfig
    from tlcompile.train.loop import iterate_batches

    torch.set_num_threads(int(os.environ.get("TLCOMPILE_NUM_THREADS", "0")) or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="tlstore") as tmp:
        kw = {"source": "synthetic", "num_images": n, "image_size": px}
        memory = load_data(DataConfig(**kw), seed=0)
        disk = load_data(DataConfig(**kw, store="disk", cache=Path(tmp)), seed=0)
        model = get_model("mobilenet_v3_small", num_classes=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()

        def epoch(dm, workers: int) -> float:
            x, y = dm.subset("train")
            t0 = time.perf_counter()
            seen = 0
            for xb, yb in iterate_batches(
                x, y, dm.spec, batch_size=32, device=torch.device("cpu"), shuffle=True,
                rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0), augment_batches=True,
                loader_workers=workers,
            ):  # fmt: skip
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                seen += len(yb)
            return seen / (time.perf_counter() - t0)

        sources = {"memory": (memory, 0), "disk, 0 loader processes": (disk, 0), "disk, 2 loader processes": (disk, 2)}
        runs: dict[str, list[float]] = {name: [] for name in sources}
        epoch(memory, 0)  # warm-up: first-call allocations and kernels
        for r in range(rounds):  # ABC, CBA, ...: a load that drifts over a round weighs on every source alike
            for name in list(sources) if r % 2 == 0 else list(sources)[::-1]:
                runs[name].append(epoch(*sources[name]))
    print(f"training img/s, mobilenet_v3_small, {px} px, batch 32, {n} images; CPU {_isa()}; {_load()}")
    print(f"| images from | img/s (median of {rounds}) | vs memory (median of the {rounds} rounds' ratios) |")
    print("|---|---|---|")
    for name, values in runs.items():
        ratios = [v / m for v, m in zip(values, runs["memory"], strict=True)]
        print(f"| {name} | {float(np.median(values)):.1f} | {float(np.median(ratios)):.2f} |")


def build_rate(n: int, px: int) -> None:
    print(f"store build (generate + preprocess + write), {n} images at {px} px; CPU {_isa()}; {_load()}")
    print("| worker processes | img/s | wall s |")
    print("|---|---|---|")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="tlstore") as tmp:
            code = (
                "import time; from pathlib import Path; from tlcompile.data.datamodule import load_data; "
                "from tlcompile.recipe import DataConfig; t=time.perf_counter(); "
                f"load_data(DataConfig(source='synthetic', num_images={n}, image_size={px}, store='disk', "
                f"cache=Path('{tmp}')), seed=0); print(time.perf_counter()-t)"
            )
            env = {**os.environ, "PYTHONPATH": str(REPO), "TLCOMPILE_NUM_THREADS": str(workers)}
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            wall = float(out.stdout.strip().splitlines()[-1])
            print(f"| {workers} | {n / wall:.1f} | {wall:.1f} |", flush=True)
    print(_load())


_DATA_PATH = """
import sys, numpy as np, torch
from pathlib import Path
from tlcompile.data.datamodule import load_data
from tlcompile.recipe import DataConfig
from tlcompile.train.loop import iterate_batches
n, px, store, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
distinct = int(sys.argv[7])
if distinct:  # image i is a copy of image i % distinct: the generator's cost left out, every row still preprocessed
    from tlcompile.data import synthetic
    drawn, draw = {}, synthetic._draw_one
    def _tiled(seed, index, *args):
        key = index % distinct
        if key not in drawn:
            drawn[key] = draw(seed, key, *args)
        image, grade = drawn[key]
        return image.copy(), grade
    synthetic._draw_one = _tiled
    import os  # the patch lives in this process: the store must be drawn here, not in spawned drawing processes
    os.environ["TLCOMPILE_NUM_THREADS"] = "1"
kw = dict(source="synthetic", num_images=n, image_size=px)
if store == "disk":
    kw.update(store="disk", cache=Path(cache))
dm = load_data(DataConfig(**kw), seed=0)
if sys.argv[5] == "train":
    for epoch in range(2):  # what training reads: 2 shuffled epochs, then every val and test image in batches
        x, y = dm.subset("train")
        workers = int(sys.argv[6])
        for xb, yb in iterate_batches(x, y, dm.spec, batch_size=32, device=torch.device("cpu"), shuffle=True,
                                      rng=np.random.default_rng([0, epoch]), loader_workers=workers):
            pass
        for name in ("val", "test"):
            x, y = dm.subset(name)
            for xb, yb in iterate_batches(x, y, dm.spec, batch_size=64, device=torch.device("cpu")):
                pass
"""


def rss_data(sizes: list[int], px: int, workers: int, distinct: int = 0, memory_max: int = 10**9) -> None:
    """The data path alone (load_data, then 2 epochs of training batches and the val/test passes), per size/store.
    ``distinct`` > 0: image i is a copy of generated image i % distinct (rendering 20k images at 480 px takes hours
    on 2 cores; memory does not depend on the pixels). ``memory_max``: no in-RAM run above this many images."""
    tiled = f", images tiled from {distinct} distinct" if distinct else ""
    print(f"data path: load + 2 epochs + val/test passes, {px} px, {workers} loader processes{tiled}; CPU {_isa()}; "
          f"{_load()}")  # fmt: skip
    print("| images | dataset MB (uint8) | store | wall s | peak anon MB (Pss_Anon) | peak Pss MB |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TLCOMPILE_NUM_THREADS": os.environ.get("TLCOMPILE_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="tlstore") as tmp:
        for n in sizes:
            for store in ("memory", "disk"):
                if store == "memory" and n > memory_max:
                    continue
                args = [sys.executable, "-c", _DATA_PATH, str(n), str(px), store, tmp]
                if store == "disk":  # the store is written first: later builds read it
                    _peak_of([*args, "load", "0", str(distinct)], env)
                wall, anon, allm, _ = _peak_of([*args, "train", str(workers), str(distinct)], env)
                mb = n * px * px * 3 / 1e6
                print(f"| {n} | {mb:.0f} | {store} | {wall:.0f} | {anon / 1e6:.0f} | {allm / 1e6:.0f} |", flush=True)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*.npy"))
        print(f"disk: {disk / 1e6:.0f} MB of .npy for {sum(sizes)} images (generated file + split store); {_load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("rss")
    a.add_argument("--sizes", default="1000,2000,4000")
    a.add_argument("--px", type=int, default=96)
    b = sub.add_parser("throughput")
    b.add_argument("--images", type=int, default=512)
    b.add_argument("--px", type=int, default=384)
    b.add_argument("--rounds", type=int, default=4)
    d = sub.add_parser("rss-data")
    d.add_argument("--sizes", default="1000,2000,4000")
    d.add_argument("--px", type=int, default=96)
    d.add_argument("--workers", type=int, default=0, help="data.loader_workers of the disk runs")
    d.add_argument("--distinct", type=int, default=0, help="tile the images from this many generated ones (0: all)")
    d.add_argument("--memory-max", type=int, default=10**9, help="no in-RAM run above this many images")
    c = sub.add_parser("build-rate")
    c.add_argument("--images", type=int, default=256)
    c.add_argument("--px", type=int, default=384)
    args = parser.parse_args()
    if args.what == "rss":
        rss([int(v) for v in args.sizes.split(",")], args.px)
    elif args.what == "rss-data":
        rss_data([int(v) for v in args.sizes.split(",")], args.px, args.workers, args.distinct, args.memory_max)
    elif args.what == "throughput":
        throughput(args.images, args.px, args.rounds)
    else:
        build_rate(args.images, args.px)


if __name__ == "__main__":
    main()
