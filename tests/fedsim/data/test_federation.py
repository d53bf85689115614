"""Federations: determinism, caching, the server's labelled split, label counts and the plot."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.data import clear_federation_cache, federation_of, label_counts, make_federation
from fedsim.data.plot import plot_label_distribution
from fedsim.errors import ConfigError, DataError

SYNTH = {"num_samples": 400, "num_users": 8}


def fingerprint(federation):
    return [tuple(i.tolist()) for i in federation.client_indices], tuple(federation.server_indices.tolist())


def test_same_arguments_same_federation_even_after_clearing_the_cache():
    args = dict(dataset="digits", num_clients=6, partitioner="dirichlet", partition={"alpha": 0.5},
                options={}, test_fraction=0.2, server_labelled=40, seed=11)
    first = make_federation(**args)
    assert make_federation(**args) is first, "cached per process"
    clear_federation_cache()
    rebuilt = make_federation(**args)
    assert rebuilt is not first and fingerprint(rebuilt) == fingerprint(first)
    assert np.array_equal(rebuilt.x_test, first.x_test)
    assert fingerprint(make_federation(**{**args, "seed": 12})) != fingerprint(first)


def test_federation_of_a_scenario_is_its_data_table_and_seed():
    from fedsim.config import Scenario
    from tests.conftest import TINY

    data = {**TINY["data"], "partitioner": "dirichlet", "partition": {"alpha": 0.5}, "server_labelled": 20}
    scenario = Scenario.model_validate({**TINY, "data": data})  # the schema only: no registry look-ups
    d = scenario.data
    federation = federation_of(scenario)
    assert federation is make_federation(d.dataset, d.num_clients, d.partitioner, d.partition, d.options,
                                          d.test_fraction, d.server_labelled, scenario.run.seed)
    assert federation.input_shape == federation.dataset.input_shape == (1, 8, 8)
    assert federation.num_classes == federation.dataset.num_classes == 10


def test_equal_settings_written_differently_share_the_cache():
    one = make_federation("synthetic", 4, "dirichlet", {"alpha": [1.0] * 10}, SYNTH, 0.2, 0, 1)
    two = make_federation("synthetic", np.int64(4), "dirichlet", {"alpha": tuple([1.0] * 10)}, dict(SYNTH), 0.2, 0, 1)
    assert one is two


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(["iid", "dirichlet", "pathological", "shard", "quantity", "natural"]),
       st.integers(1, 8), st.integers(0, 60), st.integers(0, 2**16))
def test_server_split_is_stratified_and_disjoint_from_clients(name, num_clients, server_labelled, seed):
    params = {"dirichlet": {"alpha": 1.0, "min_partition_size": 1},
              "pathological": {"num_classes_per_partition": 9}, "shard": {"num_shards_per_partition": 2}}
    try:
        federation = make_federation("synthetic", num_clients, name, params.get(name), SYNTH, 0.2,
                                     server_labelled, seed)
    except DataError as err:  # e.g. a class too rare for the pathological split
        assert "data." in str(err)
        return
    data = federation.dataset
    server = federation.server_indices
    assert len(server) == server_labelled and federation.num_clients == num_clients
    joined = np.concatenate([server, *federation.client_indices])
    assert len(np.unique(joined)) == len(joined), "server and clients overlap"
    assert len(joined) == data.num_train, "every training sample is somewhere"
    expected = server_labelled * np.bincount(data.y_train, minlength=10) / data.num_train
    assert np.all(np.abs(np.bincount(data.y_train[server], minlength=10) - expected) < 1.0 + 1e-9)
    counts = label_counts(federation)
    assert counts.shape == (num_clients, 10) and np.array_equal(counts.sum(axis=1), federation.client_sizes())


def test_natural_partition_follows_users_and_arrays_are_read_only():
    federation = make_federation("synthetic", 8, "natural", None, SYNTH, 0.2, 0, 5)
    ids = federation.dataset.natural_ids
    assert [set(ids[i]) for i in federation.client_indices] == [{user} for user in range(8)]
    x, y = federation.client_data(0)
    assert len(x) == len(y) == len(federation.client_indices[0])
    with pytest.raises(ValueError):
        federation.dataset.x_train[0] = 1.0
    with pytest.raises(ValueError):
        federation.client_indices[0][0] = 0
    with pytest.raises(DataError, match="data.partitioner"):
        make_federation("digits", 3, "natural", seed=0)


def test_federation_errors_name_the_key():
    with pytest.raises(DataError, match="data.server_labelled"):
        make_federation("synthetic", 4, "iid", None, SYNTH, 0.2, 400, 0)
    with pytest.raises(ConfigError, match="data.server_labelled"):
        make_federation("synthetic", 4, "iid", None, SYNTH, 0.2, -1, 0)
    with pytest.raises(ConfigError, match="data.num_clients"):
        make_federation("synthetic", 0, "iid", None, SYNTH, 0.2, 0, 0)
    with pytest.raises(DataError, match="data.num_clients: 5000 clients"):
        make_federation("synthetic", 5000, "iid", None, SYNTH, 0.2, 0, 0)
    with pytest.raises(ConfigError, match="data.partition.alpha"):
        make_federation("synthetic", 4, "iid", {"alpha": 1.0}, SYNTH, 0.2, 0, 0)
    with pytest.raises(ConfigError, match="plain"):
        make_federation("synthetic", 4, "iid", None, {"num_samples": object()}, 0.2, 0, 0)


def test_plot_label_distribution_writes_an_image(tmp_path):
    federation = make_federation("digits", 12, "pathological", {"num_classes_per_partition": 2}, seed=0)
    path = plot_label_distribution(federation, tmp_path / "plots" / "labels.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert plot_label_distribution(federation, tmp_path / "shares.png", normalize=True).stat().st_size > 1000
