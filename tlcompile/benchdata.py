"""What ``tlcompile bench`` needs from the training side: labelled images for ``--data`` and camera-size frames for
``--e2e``.

The bench itself (:mod:`tlcompile.runtime.bench`) is torch-free and imports nothing from the training side; it takes
what this module loads as parameters. Reading a recipe's data section needs the recipe and data modules (numpy and
Pillow, still no torch), and the synthetic frames come from the data module's fundus generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlcompile.runtime.bench import BenchError, EvalSetLoader
from tlcompile.runtime.preprocess import PreprocessSpec


def synthetic_camera_images(
    folder: Path, *, count: int = 3, width: int = 2048, height: int = 1536, seed: int = 0
) -> list[Path]:
    """Camera-size fundus JPEGs (the generator's field of view on a 4:3 black frame), for end-to-end timing."""
    from PIL import Image

    from tlcompile.data.synthetic import render_fundus

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"camera_{width}x{height}_{i}.jpg"
        if not path.is_file():
            fundus = render_fundus(2 + i % 3, np.random.default_rng([seed, i]), size=height)
            frame = np.zeros((height, width, 3), np.uint8)
            x0 = (width - height) // 2
            frame[:, x0 : x0 + height] = fundus
            Image.fromarray(frame).save(path, quality=92)
        paths.append(path)
    return paths


def load_eval_set(data: Path, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """``--data``: a recipe YAML (its test split, built exactly as in the build) or a folder of grade sub-folders.

    Returns (preprocessed images, DR grades); the images are prepared with exactly the model's preprocessing.
    """
    from tlcompile.data.datamodule import load_data

    if data.is_file() and data.suffix in (".yaml", ".yml"):
        from tlcompile.recipe import load_recipe

        cfg = load_recipe(data)
        dm = load_data(cfg.data, seed=cfg.seed, preprocess_version=spec.version)
        theirs, ours = {**dm.spec.to_dict(), "extra": {}}, {**spec.to_dict(), "extra": {}}
        if theirs != ours:
            diff = ", ".join(f"{k}: {theirs[k]} vs {ours[k]}" for k in ours if theirs.get(k) != ours[k])
            raise BenchError(f"--data {data}: its preprocessing differs from the model's ({diff})")
        test = dm.split == "test"
        return np.asarray(dm.subset("test")[0]), dm.grades[test]  # data.store: disk too
    if data.is_dir():
        from tlcompile.recipe import DataConfig

        cfg = DataConfig(
            source="folder",
            root=data,
            image_size=spec.size,
            crop_fov=spec.crop_fov,
            ben_graham=spec.ben_graham,
            circular_mask=spec.circular_mask,
        )
        dm = load_data(cfg, seed=0, preprocess_version=spec.version)
        return dm.images, dm.grades
    raise BenchError(f"--data '{data}': give a recipe .yaml (its test split is used) or a folder with sub-folders 0..4")


def eval_set_loader(data: Path | None) -> EvalSetLoader | None:
    """``--data PATH`` as :func:`tlcompile.runtime.bench.run_bench` takes it (None: no accuracy rows)."""
    if data is None:
        return None
    return lambda spec: load_eval_set(data, spec)
