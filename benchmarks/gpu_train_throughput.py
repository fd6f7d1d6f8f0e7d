"""How fast does tlcompile's training loop run on this device? Images/s of ``loop.fit`` (the build's own loop:
pinned host batches, augmentation on the device, AMP, channels_last), and the epoch time that implies for a dataset.

Random uint8 images stand in for a preprocessed dataset (what ``data.cache`` holds): this measures the device and
the loop, not JPEG decoding. The first epoch (cuDNN autotuning, allocator warm-up) is reported apart.

    .venv/bin/python benchmarks/gpu_train_throughput.py --device cuda --arch mobilenet_v3_large --size 512 \
        --images 4096 --batch 128 --amp bf16 --channels-last --dataset-images 60000
    # on a CPU box, something small: --device cpu --arch cbr_small --size 64 --images 256 --batch 32 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tlcompile.models import count_macs, get_model
from tlcompile.runtime.preprocess import PreprocessSpec
from tlcompile.train import loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="mobilenet_v3_large")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=4096, help="images per epoch in this benchmark")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--dataset-images", type=int, default=60_000, help="extrapolate an epoch over this many images")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.images, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, size=args.images).astype(np.int64)
    val = (x[: args.batch], y[: args.batch])
    spec = PreprocessSpec(size=args.size)
    torch.manual_seed(0)
    model = get_model(args.arch, num_classes=2).to(device)
    optimizer = loop.make_optimizer(model.parameters(), name="adamw", lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    seconds: list[float] = []

    def on_epoch(rec: dict) -> None:
        seconds.append(rec["seconds"])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    settings = loop.FitSettings(
        epochs=args.epochs,
        batch_size=args.batch,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=torch.nn.CrossEntropyLoss(),
        seed=0,
        device=device,
        amp=args.amp,
        channels_last=args.channels_last,
    )
    loop.fit(model, (x, y), val, spec, settings, loop.FitCallbacks(on_epoch=on_epoch))
    wall = time.perf_counter() - t0
    steady = seconds[1:] or seconds
    rate = args.images / float(np.median(steady))
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "gmacs_forward": round(count_macs(model.cpu(), args.size) / 1e9, 3),
        "images_per_epoch": args.images,
        "epoch_seconds": [round(s, 2) for s in seconds],
        "train_images_per_s": round(rate, 1),
        "wall_s": round(wall, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "dataset_images": args.dataset_images,
        "dataset_epoch_minutes": round(args.dataset_images / rate / 60, 2),
    }
    print(
        f"{row['device']}, torch {row['torch']}: {args.arch} at {args.size} px "
        f"({row['gmacs_forward']} GMACs forward), batch "
        f"{args.batch}, amp {args.amp}, channels_last {args.channels_last}"
    )
    print(f"epochs of {args.images} images: {', '.join(f'{s:.2f} s' for s in seconds)} (first = warm-up)")
    print(
        f"training throughput {rate:,.0f} images/s (val pass of {args.batch} images included); an epoch of "
        f"{args.dataset_images:,} images: {row['dataset_epoch_minutes']:.2f} min of device time; peak GPU memory "
        f"{row['peak_gpu_memory_gib']} GiB"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
