"""Data time with and without the preprocessed-image cache, on camera-size fundus JPEGs.

    .venv/bin/python benchmarks/data_cache.py [--images 500] [--folder /tmp/tlcompile-camera-jpegs] [--size 224]

Writes (once) an APTOS-style folder of camera-size JPEGs: synthetic fundus photographs rendered large (1400 px
field) on a 2000 x 1500 black sensor, each with its own position, flip, exposure and sensor noise so every file has
its own content (and its own cache key). Then times one pass of ``load_data`` over them (list, read, hash, decode,
crop, resize, check) three ways:

* no cache: what every build pays without ``data.cache``;
* epoch 1: an empty cache (decode, preprocess, write the entries);
* epoch 2: the warm cache (read, hash, load the entry; no JPEG is decoded).

tlcompile keeps a build's preprocessed images in memory, so within one build only the first pass reads files; the
cache is what makes the next build, a ``--resume``, each sweep variant, ``bench --data`` and ``tlcompile data check``
start at epoch-2 speed. Timings on a shared machine are noisy: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlcompile.data.datamodule import load_data
from tlcompile.data.synthetic import DEFAULT_GRADE_PROBS, render_fundus
from tlcompile.recipe import DataConfig
from tlcompile.runtime.inference import default_threads

WIDTH, HEIGHT, FIELD = 2000, 1500, 1400
UNIQUE_RENDERS = 20  # rendering a 1400 px fundus takes ~2 s; variants of 20 renders keep set-up near a minute


def write_camera_jpegs(folder: Path, n: int, *, seed: int = 0) -> Path:
    """An APTOS-style folder (train.csv + train_images/<id>.jpeg) of ``n`` camera-size JPEGs; reused when present."""
    csv_path = folder / "train.csv"
    if csv_path.is_file() and len(csv_path.read_text().splitlines()) == n + 1:
        return csv_path
    images = folder / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=UNIQUE_RENDERS, p=DEFAULT_GRADE_PROBS)
    renders = [render_fundus(int(g), np.random.default_rng([seed, k]), size=FIELD) for k, g in enumerate(grades)]
    rows = ["id_code,diagnosis"]
    for i in range(n):
        k = i % UNIQUE_RENDERS
        field = renders[k][:, ::-1] if rng.random() < 0.5 else renders[k]
        frame = np.zeros((HEIGHT, WIDTH, 3), np.float32)
        x0 = int(rng.integers(0, WIDTH - FIELD))
        y0 = int(rng.integers(0, HEIGHT - FIELD))
        frame[y0 : y0 + FIELD, x0 : x0 + FIELD] = field * rng.uniform(0.8, 1.1)
        frame += rng.normal(0, 2.0, frame.shape).astype(np.float32)
        Image.fromarray(frame.clip(0, 255).astype(np.uint8)).save(images / f"cam{i:04d}.jpeg", quality=92)
        rows.append(f"cam{i:04d},{grades[k]}")
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def timed_pass(cfg: DataConfig) -> tuple[float, dict | None]:
    t0 = time.perf_counter()
    dm = load_data(cfg, seed=0)
    return time.perf_counter() - t0, dm.report.cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "tlcompile-camera-jpegs")
    parser.add_argument("--size", type=int, default=224, help="network input side (data.image_size)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    write_camera_jpegs(args.folder, args.images)
    files = sorted((args.folder / "train_images").glob("*.jpeg"))[: args.images]
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"{len(files)} JPEGs of {WIDTH}x{HEIGHT} ({mb:.0f} MB) "
        f"in {args.folder} (ready in {time.perf_counter() - t0:.0f} s)"
    )

    cache = Path(tempfile.mkdtemp(prefix="tlcompile-cache-"))
    try:
        base = {"source": "aptos", "root": args.folder, "image_size": args.size, "path_template": "{id}.jpeg"}
        no_cache, _ = timed_pass(DataConfig(**base))
        cold, cold_stats = timed_pass(DataConfig(**base, cache=cache))
        warm, warm_stats = timed_pass(DataConfig(**base, cache=cache))
        entries = sum(p.stat().st_size for p in cache.rglob("*.npz")) / 1e6
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    n = len(files)
    print(
        f"\nload_data, {n} images -> {args.size} px, {default_threads()} decode threads; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (noisy: shared machine)\n"
    )
    print("| pass | data time (s) | ms / image | cache hits / decoded |")
    print("|---|---:|---:|---:|")
    print(f"| no cache | {no_cache:.2f} | {1e3 * no_cache / n:.1f} | - |")
    print(
        f"| epoch 1 (empty cache) | {cold:.2f} | {1e3 * cold / n:.1f} | {cold_stats['hits']} / {cold_stats['misses']} |"
    )
    print(
        f"| epoch 2 (warm cache) | {warm:.2f} | {1e3 * warm / n:.1f} | {warm_stats['hits']} / {warm_stats['misses']} |"
    )
    print(
        f"\nepoch 2 vs epoch 1: {cold / warm:.1f}x faster; "
        f"cache size {entries:.1f} MB ({1e3 * entries / n:.0f} kB / image)"
    )


if __name__ == "__main__":
    main()
