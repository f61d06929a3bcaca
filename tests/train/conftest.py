"""Fixtures shared by the trainer's tests: one cache folder per session, holding the
digits source model (pretrained once)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory) -> Path:
    """The session's cache folder, with the digits source model in it."""
    from afa_ext.train.data import DIGITS_IMAGE_SIZE
    from afa_ext.train.pretrain import digits_source_weights

    cache = tmp_path_factory.getbasetemp() / "afa_ext_cache"
    cache.mkdir(exist_ok=True)
    digits_source_weights(str(cache), DIGITS_IMAGE_SIZE, log=lambda message: None)
    return cache


@pytest.fixture(scope="session")
def cache_dir(train_cache) -> str:
    return str(train_cache)


@pytest.fixture(autouse=True)
def _cache_env(request, monkeypatch):
    """Nothing a trainer test runs may fall back on ~/.cache/afa_ext."""
    if "train_cache" in request.fixturenames or "cache_dir" in request.fixturenames:
        monkeypatch.setenv("AFA_EXT_CACHE", str(request.getfixturevalue("train_cache")))
