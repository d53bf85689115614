"""``data.label_noise``: exactly round(fraction·N) training labels flipped to another class, seeded, test clean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.data.federation import federation_of
from fedsim.data.label_noise import flip_labels
from fedsim.errors import ConfigError
from tests.conftest import tiny


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.integers(2, 12), st.floats(0.0, 0.99), st.integers(0, 2**32 - 1))
def test_flip_labels_flips_exactly_the_fraction_to_other_classes(n, k, fraction, seed):
    labels = np.random.default_rng(seed).integers(0, k, size=n)
    noisy, flipped = flip_labels(labels, fraction, k, np.random.default_rng(seed))
    assert len(flipped) == round(fraction * n) and len(np.unique(flipped)) == len(flipped)
    changed = np.flatnonzero(noisy != labels)
    assert np.array_equal(changed, flipped)  # every flipped label changed, no other did
    assert noisy.min() >= 0 and noisy.max() < k
    again, _ = flip_labels(labels, fraction, k, np.random.default_rng(seed))
    assert np.array_equal(noisy, again)


def test_flipped_labels_are_spread_over_the_other_classes():
    labels = np.zeros(30000, dtype=np.int64)
    noisy, _ = flip_labels(labels, 0.5, 4, np.random.default_rng(0))
    counts = np.bincount(noisy, minlength=4)
    assert counts[0] == 15000 and all(abs(c - 5000) < 300 for c in counts[1:])


def test_scenario_label_noise_flips_client_labels_and_leaves_the_test_split_clean():
    clean = federation_of(tiny())
    noisy = federation_of(tiny(["data.label_noise=0.3"]))
    assert np.array_equal(clean.dataset.x_train, noisy.dataset.x_train)
    assert np.array_equal(clean.dataset.y_test, noisy.dataset.y_test)
    diff = clean.dataset.y_train != noisy.dataset.y_train
    assert diff.sum() == round(0.3 * len(diff))
    assert not federation_of(tiny(["data.label_noise=0.3", "run.seed=4"])).dataset.y_train.tolist() == \
        noisy.dataset.y_train.tolist()


def test_label_noise_range_is_checked():
    for bad in ("-0.1", "1.0"):
        with pytest.raises(ConfigError, match="data.label_noise"):
            tiny([f"data.label_noise={bad}"])
    with pytest.raises(ConfigError, match="data.label_noise"):
        flip_labels(np.zeros(5, dtype=np.int64), 0.5, 1, np.random.default_rng(0))
