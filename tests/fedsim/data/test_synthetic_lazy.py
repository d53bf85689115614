"""Synthetic(α, β) generated per user on demand (data.options.lazy = true): same users, same sizes,
deterministic, natural partition as index views, no sample generated before a client asks."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import load_dataset, make_federation
from fedsim.data.partitioners import partition
from fedsim.data.synthetic_lazy import LazySynthetic
from fedsim.errors import ConfigError, DataError
from fedsim.rng import numpy_rng

LAZY = {"num_samples": 900, "num_users": 15, "dim": 12, "num_classes": 4, "lazy": True}


def test_lazy_keeps_the_eager_user_sizes_and_is_deterministic():
    eager = load_dataset("synthetic", 3, 0.2, {k: v for k, v in LAZY.items() if k != "lazy"})
    lazy = load_dataset("synthetic", 3, 0.2, LAZY)
    assert isinstance(lazy, LazySynthetic) and not isinstance(eager, LazySynthetic)
    assert lazy.users.sizes.sum() == 900
    eager_sizes = np.bincount(np.concatenate([eager.natural_ids, eager.natural_ids_test]))
    assert np.array_equal(lazy.users.sizes, eager_sizes), "same LEAF power law from the same stream"
    again = load_dataset("synthetic", 3, 0.2, LAZY)
    rows = np.array([0, 5, 17, 200, 700])
    assert np.array_equal(lazy.x_train[rows], again.x_train[rows])
    assert np.array_equal(lazy.y_train[rows], again.y_train[rows])
    assert np.array_equal(lazy.x_test, again.x_test) and np.array_equal(lazy.y_test, again.y_test)
    other = load_dataset("synthetic", 4, 0.2, LAZY)
    assert not np.array_equal(lazy.x_train[rows], other.x_train[rows])
    assert lazy.x_train[rows].dtype == np.float32 and lazy.y_train[rows].dtype == np.int64
    assert lazy.y_train[:].max() < 4 and np.isfinite(lazy.x_train[:]).all()


def test_a_user_is_generated_from_its_own_stream_whatever_else_was_asked():
    first = load_dataset("synthetic", 0, 0.2, LAZY)
    second = load_dataset("synthetic", 0, 0.2, LAZY)
    starts = first.users.train_starts
    last = slice(int(starts[-2]), int(starts[-1]))
    first.x_train[:]  # every user generated, in order
    assert np.array_equal(second.x_train[last], first.x_train[last]), "user 14 alone gives the same rows"
    # user k's rows follow the model of the docstring: its labels are argmax(x W_k + b_k)
    x, y = second.x_train[last], second.y_train[last]
    rng = numpy_rng(0, "dataset", "synthetic", "user", 14)
    shift, _ = rng.normal(0, 1.0), rng.normal(0, 1.0)
    weights, bias = rng.normal(shift, 1, (12, 4)), rng.normal(shift, 1, 4)
    assert np.mean(np.argmax(x.astype(np.float64) @ weights + bias, axis=1) == y) >= 0.95  # x stored as float32
    shared = load_dataset("synthetic", 0, 0.2, {**LAZY, "iid": True})
    assert not np.array_equal(shared.y_train[:], first.y_train[:])


def test_lazy_federation_is_the_natural_partition_as_views_of_one_index_array():
    fed = make_federation("synthetic", 6, "natural", options=LAZY, test_fraction=0.2, seed=1)
    users = fed.dataset.users
    natural_ids = np.repeat(np.arange(users.num_users), users.train_sizes)
    expected = partition("natural", np.zeros(len(natural_ids), np.int64), 6, np.random.default_rng(0),
                         natural_ids=natural_ids)
    assert [p.tolist() for p in fed.client_indices] == [p.tolist() for p in expected]
    base = fed.client_indices[0].base
    assert base is not None and all(i.base is base for i in fed.client_indices), "views, not copies"
    assert not base.flags.writeable and len(fed.server_indices) == 0
    assert users._cache == {}, "building the federation generates no training sample"
    x, y = fed.client_data(2)
    assert x.shape == (len(fed.client_indices[2]), 12) and len(users._cache) == len(
        np.unique(np.searchsorted(users.train_starts, fed.client_indices[2], side="right") - 1))


def test_memory_of_a_large_lazy_federation_is_index_shaped():
    n = 100_000
    fed = make_federation("synthetic", n, "natural", test_fraction=0.2, seed=0,
                          options={"num_samples": 50 * n, "num_users": n, "lazy": True, "test_users": 50})
    assert fed.num_clients == n and len(fed.dataset.users._cache) == 0
    base = fed.client_indices[0].base
    assert base.nbytes == 8 * fed.dataset.num_train and all(i.base is base for i in fed.client_indices[::997])
    assert fed.x_test.nbytes < 50 * 60 * 4 * 60, "the test set comes from test_users users only"
    assert fed.client_sizes().sum() == fed.dataset.num_train


def test_lazy_refusals_name_the_key():
    with pytest.raises(ConfigError, match="data.partitioner"):
        make_federation("synthetic", 4, "iid", options=LAZY)
    with pytest.raises(ConfigError, match="data.server_labelled"):
        make_federation("synthetic", 4, "natural", options=LAZY, server_labelled=10)
    with pytest.raises(ConfigError, match="data.partition.alpha"):
        make_federation("synthetic", 4, "natural", partition={"alpha": 1.0}, options=LAZY)
    with pytest.raises(DataError, match="data.num_clients"):
        make_federation("synthetic", 16, "natural", options=LAZY)
    with pytest.raises(ConfigError, match="data.options.test_users"):
        load_dataset("synthetic", 0, 0.2, {"num_samples": 600, "test_users": 3})
    with pytest.raises(ConfigError, match="data.options.lazy"):
        load_dataset("synthetic", 0, 0.2, {"num_samples": 600, "lazy": 1})


def test_client_runtime_cache_is_bounded(monkeypatch):
    import torch

    from fedsim.clients import runtime as rt_module
    from tests.conftest import tiny

    rt = rt_module._build(tiny(data={"dataset": "synthetic", "num_clients": 15, "partitioner": "natural",
                                     "options": LAZY}))
    one = sum(t.nbytes for t in rt.client_data(0))
    monkeypatch.setattr(rt_module, "DATA_CACHE_BYTES", 3 * one)
    for pid in range(15):
        x, y = rt.client_data(pid)
        assert x.dtype == torch.float32 and y.dtype == torch.long
    assert len(rt._data) < 15 and rt._data_bytes <= 3 * one + max(t.nbytes for v in rt._data.values() for t in v)
    again = rt.client_data(0)  # evicted, rebuilt identically
    fed = rt.federation
    assert torch.equal(again[0], torch.tensor(fed.client_data(0)[0]))
