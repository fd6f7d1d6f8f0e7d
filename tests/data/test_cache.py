"""The preprocessed-image cache: keyed by file content and preprocessing, never stale, self-repairing."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.conftest import fundus, save
from tlcompile.data.cache import PreprocessCache, spec_key
from tlcompile.data.datamodule import load_data, preprocess_spec
from tlcompile.errors import DataError
from tlcompile.recipe import DataConfig


def _cfg(root, cache, **kw) -> DataConfig:
    return DataConfig(**{"source": "aptos", "root": root, "image_size": 32, "cache": cache, **kw})


def test_second_load_comes_from_the_cache_without_decoding(aptos_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain = load_data(DataConfig(source="aptos", root=aptos_root, image_size=32), seed=0)
    first = load_data(_cfg(aptos_root, cache), seed=0)
    assert first.report.cache["misses"] == 30 and first.report.cache["hits"] == 0

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr("tlcompile.data.checks.read_image", no_decoding)
    second = load_data(_cfg(aptos_root, cache), seed=0)
    assert second.report.cache["hits"] == 30 and second.report.cache["misses"] == 0
    for dm in (first, second):
        assert np.array_equal(dm.images, plain.images) and np.array_equal(dm.split, plain.split)
        assert dm.report.sizes == plain.report.sizes  # the stored size travels with the entry


def test_key_follows_file_content_and_preprocessing(aptos_root, tmp_path):
    cache = tmp_path / "cache"
    load_data(_cfg(aptos_root, cache), seed=0)
    # A photograph replaced under the same name is a new entry; the others are still hits.
    save(aptos_root / "train_images" / "a004.png", fundus(1004, 4))
    again = load_data(_cfg(aptos_root, cache), seed=0)
    assert (again.report.cache["hits"], again.report.cache["misses"]) == (29, 1)
    # Another preprocessing lives in its own folder.
    ben = load_data(_cfg(aptos_root, cache, ben_graham=True), seed=0)
    assert ben.report.cache["misses"] == 30
    keys = {
        spec_key(preprocess_spec(c))
        for c in (
            _cfg(aptos_root, cache),
            _cfg(aptos_root, cache, ben_graham=True),
            _cfg(aptos_root, cache, image_size=48),
            _cfg(aptos_root, cache, crop_fov=False),
        )
    }
    assert len(keys) == 4
    assert {p.name for p in cache.iterdir()} == {
        spec_key(preprocess_spec(_cfg(aptos_root, cache, ben_graham=b))) for b in (False, True)
    }


def test_damaged_entry_is_decoded_again(aptos_root, tmp_path):
    cache = tmp_path / "cache"
    first = load_data(_cfg(aptos_root, cache), seed=0)
    entries = sorted(cache.rglob("*.npz"))
    assert len(entries) == 30
    entries[0].write_bytes(entries[0].read_bytes()[:50])  # torn write
    second = load_data(_cfg(aptos_root, cache), seed=0)
    assert second.report.cache["repaired"] == 1 and second.report.cache["hits"] == 29
    assert np.array_equal(first.images, second.images)
    assert load_data(_cfg(aptos_root, cache), seed=0).report.cache["hits"] == 30


def test_unusable_cache_folder_names_the_key(aptos_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"data.cache: cannot use '.*file' for the preprocessed-image cache"):
        PreprocessCache(blocker, preprocess_spec(_cfg(aptos_root, blocker)))
