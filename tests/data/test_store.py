"""data.store: disk: each split's images as one file, the same arrays in the same order as in memory, written once
and reused, continued after a kill, read a batch at a time (also by loader processes) with the same batches."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from tlcompile.data import store
from tlcompile.data.datamodule import load_data
from tlcompile.errors import RecipeError
from tlcompile.recipe import DataConfig, load_recipe
from tlcompile.train.loop import iterate_batches

SPLITS = ("train", "val", "test")


def _same_splits(a, b) -> None:
    for name in SPLITS:
        xa, ya = a.subset(name)
        xb, yb = b.subset(name)
        assert np.array_equal(np.asarray(xa), np.asarray(xb)) and np.array_equal(ya, yb), name
    assert np.array_equal(a.split, b.split) and np.array_equal(a.fov_found, b.fov_found)


def test_generated_store_matches_memory_and_is_reused(tmp_path, monkeypatch):
    kw = {"source": "synthetic", "num_images": 90, "image_size": 32}
    memory = load_data(DataConfig(**kw), seed=3)
    disk = load_data(DataConfig(**kw, store="disk", cache=tmp_path / "c"), seed=3)
    assert disk.images is None and store.store_path(disk.subset("train")[0]) is not None
    _same_splits(memory, disk)
    # A later build of the same data reads the store: nothing is generated or written again.
    monkeypatch.setattr("tlcompile.data.datamodule._draw_prepared", lambda args: pytest.fail("generated again"))
    monkeypatch.setattr("tlcompile.data.store.StoreWriter", lambda *a: pytest.fail("store written again"))
    _same_splits(memory, load_data(DataConfig(**kw, store="disk", cache=tmp_path / "c"), seed=3))


def test_generated_store_drawn_by_two_processes_matches_memory(tmp_path, monkeypatch):
    """With two cores the generator runs in two spawned processes, each with one BLAS thread (a thread per core in
    each only made them fight: 1.14x the rate of one process); the images are the same bytes."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tlcompile.data.datamodule import _one_blas_thread

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        with _one_blas_thread():
            seen = pool.submit(os.getenv, "OPENBLAS_NUM_THREADS")
        assert seen.result() == "1" and "OPENBLAS_NUM_THREADS" not in os.environ  # the parent's is put back
    monkeypatch.setenv("TLCOMPILE_NUM_THREADS", "2")
    kw = {"source": "synthetic", "num_images": 130, "image_size": 32}
    _same_splits(load_data(DataConfig(**kw), seed=5), load_data(DataConfig(**kw, store="disk", cache=tmp_path), seed=5))


def test_a_script_without_a_main_guard_gets_the_reason_not_a_hang(tmp_path):
    """Spawned workers import the script that started them: one without ``if __name__ == "__main__"`` would call
    load_data again in each worker, which waited for the store's lock held by its parent (a hang before)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pathlib import Path\n"
        "from tlcompile.data.datamodule import load_data\n"
        "from tlcompile.recipe import DataConfig\n"
        f"load_data(DataConfig(source='synthetic', num_images=130, image_size=32, store='disk', "
        f"cache=Path({str(tmp_path / 'c')!r})), seed=0)\n"
    )
    env = {**os.environ, "TLCOMPILE_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert 'put the script\'s own code under `if __name__ == "__main__":`' in proc.stderr.splitlines()[-1]


def test_generated_in_memory_across_processes_matches_one_process(monkeypatch):
    """The tlcompile command lets generated data held in memory be drawn by one spawned process per core; the
    arrays are the same bytes as one process draws, and a script of the user's own gets one process unless it asks
    (it may have no main guard)."""
    from tlcompile.data import datamodule

    monkeypatch.setenv("TLCOMPILE_NUM_THREADS", "2")
    kw = {"source": "synthetic", "num_images": 130, "image_size": 32}
    started = []
    import concurrent.futures

    original = concurrent.futures.ProcessPoolExecutor

    class CountingPool(original):
        def __init__(self, *args, **kwargs):
            started.append(args[0] if args else kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountingPool)
    monkeypatch.setitem(datamodule._WORKER_PROCESSES, "allowed", False)  # as in a script (a CLI test may have run)
    one = load_data(DataConfig(**kw), seed=5)
    assert started == []  # not allowed: one process, as before
    monkeypatch.setitem(datamodule._WORKER_PROCESSES, "allowed", True)
    two = load_data(DataConfig(**kw), seed=5)
    assert started == [2]
    _same_splits(one, two)
    assert np.array_equal(one.fov_found, two.fov_found) and np.array_equal(one.grades, two.grades)


def test_a_script_without_a_main_guard_still_generates_in_memory(tmp_path):
    """Data held in memory is drawn in the script's own process unless it allows worker processes, so a script with
    no ``if __name__ == "__main__"`` works as it always has."""
    import subprocess
    import sys

    script = tmp_path / "unguarded_memory.py"
    script.write_text(
        "from tlcompile.data.datamodule import load_data\n"
        "from tlcompile.recipe import DataConfig\n"
        "dm = load_data(DataConfig(source='synthetic', num_images=130, image_size=32), seed=0)\n"
        "print(len(dm.ids))\n"
    )
    env = {**os.environ, "TLCOMPILE_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "130"
    # Allowing worker processes outside the guard: the workers would run the script again; it stops with the reason.
    script.write_text(
        "from tlcompile.data.datamodule import allow_worker_processes, load_data\n"
        "from tlcompile.recipe import DataConfig\n"
        "allow_worker_processes()\n"
        "dm = load_data(DataConfig(source='synthetic', num_images=130, image_size=32), seed=0)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "allow_worker_processes() was called outside" in proc.stderr.splitlines()[-1]


def test_file_store_matches_memory_and_keeps_on_error(aptos_root, tmp_path):
    (aptos_root / "train_images" / "a003.png").write_bytes(b"not a png")  # one unreadable file
    kw = {"source": "aptos", "root": aptos_root, "image_size": 32, "on_error": "skip"}
    memory = load_data(DataConfig(**kw), seed=0)
    disk = load_data(DataConfig(**kw, store="disk", cache=tmp_path / "c"), seed=0)
    assert "a003" not in disk.ids and disk.ids == memory.ids and len(disk.report.problems) == 1
    _same_splits(memory, disk)


def test_a_killed_generation_continues(tmp_path):
    calls = []

    def draw(indices):
        calls.append(indices.start)
        if indices.start == 8 and len(calls) == 2:
            raise KeyboardInterrupt  # killed in the second chunk
        for i in indices:
            yield np.full((4, 4, 3), i, np.uint8), i % 5, True

    path = tmp_path / "gen.npy"
    with pytest.raises(KeyboardInterrupt):
        store.fill_generated(path, 20, (4, 4, 3), draw, chunk=8)
    grades, _ = store.fill_generated(path, 20, (4, 4, 3), draw, chunk=8)
    assert calls == [0, 8, 8, 16]  # the first chunk was not drawn again
    assert grades.tolist() == [i % 5 for i in range(20)]
    assert np.array_equal(np.load(path)[:, 0, 0, 0], np.arange(20))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_from_the_store_equal_batches_from_memory(tmp_path, workers):
    kw = {"source": "synthetic", "num_images": 80, "image_size": 32}
    memory = load_data(DataConfig(**kw), seed=1)
    disk = load_data(DataConfig(**kw, store="disk", cache=tmp_path / "c"), seed=1)

    def batches(dm, **extra):
        x, y = dm.subset("train")
        rng = np.random.default_rng([0, 1])
        gen = torch.Generator().manual_seed(5)
        return list(
            iterate_batches(x, y, memory.spec, batch_size=8, device=torch.device("cpu"), shuffle=True, rng=rng,
                            generator=gen, augment_batches=True, **extra)
        )  # fmt: skip

    before = signal.getsignal(signal.SIGCHLD)
    a, b = batches(memory), batches(disk, loader_workers=workers)
    assert len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )
    # No process-wide SIGCHLD handler is left behind (torch's DataLoader leaves one; with OpenVINO's dangling
    # alternate signal stack, the next child process to exit then crashed the build: see store.read_batches).
    assert signal.getsignal(signal.SIGCHLD) == before


def test_disk_store_needs_a_cache_folder(tiny_recipe_dict, write_recipe):
    tiny_recipe_dict["data"]["store"] = "disk"
    with pytest.raises(RecipeError, match="data.store: disk needs data.cache"):
        load_recipe(write_recipe(tiny_recipe_dict))


def test_store_choice_is_not_part_of_the_fingerprint(tiny_recipe_dict, write_recipe):
    a = load_recipe(write_recipe(tiny_recipe_dict))
    b = load_recipe(write_recipe(tiny_recipe_dict), ["data.store=disk", "data.cache=c", "data.loader_workers=4"])
    c = load_recipe(write_recipe(tiny_recipe_dict), ["data.cache=c"])
    assert b.fingerprint() == c.fingerprint() != a.fingerprint()  # the cache folder counts; where images wait does not


def test_a_killed_store_build_is_rebuilt_and_its_leftovers_removed(tmp_path):
    split = np.array(["train", "val", "train", "test", "train"])
    rows = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    folder = tmp_path / "store" / "k"
    (tmp_path / "store" / ".k.12345").mkdir(parents=True)  # what a SIGKILL mid-build leaves

    def interrupted(i):
        if i == 3:
            raise KeyboardInterrupt
        return rows[i]

    with pytest.raises(KeyboardInterrupt):
        store.build_split_store(folder, split, interrupted, (2, 2, 3), {})
    assert not folder.exists()
    built = store.build_split_store(folder, split, lambda i: rows[i], (2, 2, 3), {})
    assert [p.name for p in (tmp_path / "store").iterdir() if p.is_dir()] == ["k"]
    for name in SPLITS:
        assert np.array_equal(built[name], rows[split == name])


def test_lazy_inputs_give_the_same_logits_without_a_float_copy_of_the_split(tmp_path):
    from tlcompile.runtime.inference import predict_logits
    from tlcompile.runtime.preprocess import LazyInputs, PreprocessSpec, to_input

    spec = PreprocessSpec(size=16)
    images = np.random.default_rng(0).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "s.npy", images)
    mapped = store.open_split(tmp_path / "s.npy")
    lazy = LazyInputs(mapped, spec)
    assert lazy.shape == (70, 3, 16, 16) and len(lazy) == 70
    assert np.array_equal(lazy[30:64], to_input(images[30:64], spec))

    class Sums:  # a session whose output is a function of each input alone
        def run(self, x):
            seen.append(len(x))
            return x.reshape(len(x), -1).sum(axis=1, keepdims=True)

    seen: list[int] = []
    assert np.array_equal(predict_logits(Sums(), lazy), predict_logits(Sums(), to_input(images, spec)))
    assert max(seen) == 32  # converted and run a batch at a time


def test_one_image_by_index_from_memory_or_the_store(tmp_path):
    kw = {"source": "synthetic", "num_images": 40, "image_size": 32}
    memory = load_data(DataConfig(**kw), seed=2)
    disk = load_data(DataConfig(**kw, store="disk", cache=tmp_path / "c"), seed=2)
    assert disk.images is None and list(disk.split) == list(memory.split)
    for i in range(40):
        assert np.array_equal(disk.image(i), memory.images[i]) and np.array_equal(memory.image(i), memory.images[i])
