"""Dataset loaders: shapes, dtypes, determinism, option checking and npz validation."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedsim.data import DATASETS, load_dataset
from fedsim.errors import ConfigError, DataError, UnknownNameError

SMALL = {
    "digits": {},
    "synthetic": {"num_samples": 600, "num_users": 10},
    "synthetic_images": {"num_samples": 300},
    "drift": {"num_samples": 400},
    "separable": {"num_samples": 300},
}


def dataset_options(name: str) -> list[str]:
    """The options a loader declares (its keyword parameters after ``seed, test_fraction``)."""
    params = list(inspect.signature(DATASETS.get(name)).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_dataset(data, num_classes, input_shape):
    assert data.input_shape == input_shape and data.num_classes == num_classes
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), *input_shape)
        assert np.all(np.isfinite(x)) and np.all((y >= 0) & (y < num_classes))


def test_every_registered_dataset_is_tested():
    assert set(DATASETS.names()) == set(SMALL) | {"npz"}


@pytest.mark.parametrize("statement", [
    "from fedsim.data.datasets import DATASETS; from fedsim.data.partitioners import PARTITIONERS",
    "from fedsim.data.federation import make_federation; from fedsim.data import DATASETS, PARTITIONERS",
])
def test_registries_are_complete_in_a_fresh_process(statement):
    """Whatever module a caller imports first, every built-in loader and partitioner is registered."""
    listing = subprocess.run([sys.executable, "-c", f"{statement}; print(DATASETS.names(), PARTITIONERS.names())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert listing == ("['digits', 'drift', 'npz', 'separable', 'synthetic', 'synthetic_images'] "
                       "['dirichlet', 'iid', 'natural', 'pathological', 'quantity', 'shard', 'tree']")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_generated_and_bundled_datasets_are_seeded(name):
    first = load_dataset(name, 3, 0.25, SMALL[name])
    again = load_dataset(name, 3, 0.25, SMALL[name])
    other = load_dataset(name, 4, 0.25, SMALL[name])
    assert np.array_equal(first.x_train, again.x_train) and np.array_equal(first.y_test, again.y_test)
    assert not np.array_equal(first.x_test, other.x_test)
    total = first.num_train + first.num_test
    # a stratified split is off by at most one per class; drift's test split is a cut in time (whole time
    # slices of random size), so it is off by a few slices
    tol = 0.03 * total if name == "drift" else len(np.unique(first.y_train)) + 1
    assert abs(first.num_test - 0.25 * total) <= tol


def test_digits():
    data = load_dataset("digits", 0, 0.2)
    check_dataset(data, 10, (1, 8, 8))
    assert data.num_train + data.num_test == 1797 and data.name == "digits"
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    train_share = np.bincount(data.y_train) / np.bincount(np.concatenate([data.y_train, data.y_test]))
    assert np.all(np.abs(train_share - 0.8) < 0.02), "split is stratified"


def test_digits_are_scikit_learns_arrays_bit_for_bit():
    # read from sklearn's bundled file without importing sklearn: the very arrays load_digits returns
    from sklearn.datasets import load_digits

    from fedsim.data.datasets import digits_arrays, split_train_test
    from fedsim.rng import numpy_rng

    data, target = digits_arrays()
    bunch = load_digits()
    assert data.dtype == bunch.data.dtype and np.array_equal(data, bunch.data)
    assert target.dtype == np.int64 and np.array_equal(target, bunch.target)
    # and the dataset built from them is the one built from load_digits
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    train, test = split_train_test(x, bunch.target, 0.2, numpy_rng(5, "dataset", "digits", "split"))
    got = load_dataset("digits", 5, 0.2)
    assert np.array_equal(got.x_train, x[train]) and np.array_equal(got.x_test, x[test])
    assert np.array_equal(got.y_train, bunch.target[train]) and np.array_equal(got.y_test, bunch.target[test])


def test_digits_without_scikit_learns_file_is_a_clear_error(monkeypatch):
    import importlib.util

    import fedsim.data.datasets as datasets

    monkeypatch.setattr(datasets, "DIGITS_FILE", ("datasets", "data", "no-such-digits.csv.gz"))
    with pytest.raises(DataError, match="no-such-digits.csv.gz.*not found") as err:
        load_dataset("digits", 0, 0.2)
    assert "install scikit-learn" in str(err.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="scikit-learn is not installed"):
        load_dataset("digits", 0, 0.2)


def test_synthetic_has_natural_users_and_options():
    data = load_dataset("synthetic", 0, 0.2, {"num_samples": 500, "num_users": 7, "dim": 12, "num_classes": 4})
    check_dataset(data, 4, (12,))
    assert data.num_train + data.num_test == 500
    assert set(data.natural_ids) == set(range(7)) and len(data.natural_ids) == data.num_train
    assert len(data.natural_ids_test) == data.num_test
    iid = load_dataset("synthetic", 0, 0.2, {"num_samples": 500, "iid": True})
    check_dataset(iid, 10, (60,))
    with pytest.raises(ConfigError, match="data.options.num_samples"):
        load_dataset("synthetic", 0, 0.2, {"num_samples": 10, "num_users": 30})
    with pytest.raises(ConfigError, match="data.options.alpha"):
        load_dataset("synthetic", 0, 0.2, {"alpha": -1.0})


def test_synthetic_images_shapes_and_balance():
    data = load_dataset("synthetic_images", 0, 0.2, {"num_samples": 400, "num_classes": 4, "noise": 0.0})
    check_dataset(data, 4, (1, 28, 28))
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert np.all(np.bincount(data.y_train) == 80)


def test_synthetic_images_are_learnable_by_a_simple_classifier():
    from sklearn.neighbors import NearestCentroid

    data = load_dataset("synthetic_images", 0, 0.25, {"num_samples": 2000})
    flat = NearestCentroid().fit(data.x_train.reshape(data.num_train, -1), data.y_train)
    assert flat.score(data.x_test.reshape(data.num_test, -1), data.y_test) > 0.6  # a CNN reaches > 0.9


def test_unknown_dataset_option_and_fraction_errors():
    with pytest.raises(UnknownNameError) as info:
        load_dataset("mnist", 0)
    assert info.value.key == "data.dataset"
    with pytest.raises(ConfigError) as info:
        load_dataset("synthetic", 0, 0.2, {"alpah": 1.0})
    assert info.value.key == "data.options.alpah"
    assert all(option in str(info.value) for option in dataset_options("synthetic"))
    with pytest.raises(ConfigError, match=r"data.options.path.*allowed: \(none\)"):
        load_dataset("digits", 0, 0.2, {"path": "x"})
    with pytest.raises(ConfigError, match="data.test_fraction"):
        load_dataset("digits", 0, 1.0)


# ---- npz -------------------------------------------------------------------------------------

def save(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_and_without_a_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3, 4)), np.arange(50) % 5
    data = load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=x, y_train=y)})
    check_dataset(data, 5, (3, 4))
    assert data.num_train == 40 and data.num_test == 10 and data.natural_ids is None
    path = save(tmp_path, x_train=x, y_train=y.astype(np.float64), x_test=x[:7], y_test=y[:7],
                natural_ids=np.arange(50) % 3)
    data = load_dataset("npz", 0, 0.2, {"path": path, "num_classes": 8})
    check_dataset(data, 8, (3, 4))
    assert data.num_train == 50 and data.num_test == 7 and len(data.natural_ids) == 50


X = np.zeros((10, 2))
Y = np.arange(10) % 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": X}, "no key 'y_train'"),
        ({"features": X, "y_train": Y}, "no key 'x_train'"),
        ({"x_train": X, "y_train": Y[:9]}, "'y_train'.*expected \\(10,\\)"),
        ({"x_train": X, "y_train": Y - 1}, "'y_train'.*negative"),
        ({"x_train": X, "y_train": Y + 0.5}, "'y_train'.*integer"),
        ({"x_train": np.zeros(10), "y_train": Y}, "'x_train'.*axis 0|'x_train'.*shape"),
        ({"x_train": np.full((10, 2), np.nan), "y_train": Y}, "'x_train'.*NaN"),
        ({"x_train": np.array([["a", "b"]] * 10), "y_train": Y}, "'x_train'.*dtype"),
        ({"x_train": X, "y_train": Y, "x_test": X}, "only one of 'x_test' and 'y_test'"),
        ({"x_train": X, "y_train": Y, "x_test": np.zeros((3, 5)), "y_test": Y[:3]}, "'x_test'.*sample shape"),
        ({"x_train": X, "y_train": Y, "natural_ids": Y[:4]}, "'natural_ids'"),
    ],
)
def test_npz_errors_name_the_key_and_the_fix(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message) as info:
        load_dataset("npz", 0, 0.2, {"path": save(tmp_path, **arrays)})
    assert info.value.hint


def test_npz_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.options.path"):
        load_dataset("npz", 0, 0.2)
    with pytest.raises(DataError, match="data.options.path: no file"):
        load_dataset("npz", 0, 0.2, {"path": str(tmp_path / "missing.npz")})
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset("npz", 0, 0.2, {"path": str(tmp_path / "junk.npz")})
    objects = np.empty(10, dtype=object)
    with pytest.raises(DataError, match="object arrays"):
        load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=objects, y_train=Y)})
    with pytest.raises(DataError, match="data.options.num_classes"):
        load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=X, y_train=Y * 3), "num_classes": 2})


# ---- issue 9: labels, classes and features a model could not be built for are refused -------------------

@pytest.mark.parametrize(("labels", "message"), [
    (np.r_[10**9, Y[1:]], r"'y_train'.* has label 1000000000.*samples"),                   # not a 64 GB layer
    (Y.astype(np.uint64) + np.uint64(2**64 - 4), "'y_train'.* has label 18446744073709551"),  # never wrapped
    (np.r_[1e300, Y[1:]], "'y_train'.* has label 1e\\+300"),
    (Y > 0, "'y_train'.* must hold integer labels"),
])
def test_npz_labels_beyond_the_data_are_refused_before_any_allocation(tmp_path, labels, message):
    with pytest.raises(DataError, match=message) as info:
        load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=X, y_train=labels)})
    assert "np.unique" in info.value.hint


@pytest.mark.parametrize(("x", "message"), [
    (np.full((10, 2), 1e300), "beyond float32"),
    (np.zeros((10, 0)), "at least one feature"),
    (np.zeros((10, 3, 0)), "at least one feature"),
])
def test_npz_features_a_model_cannot_take_are_refused(tmp_path, x, message):
    with pytest.raises(DataError, match=f"'x_train'.*{message}"):
        load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=x, y_train=Y)})


@pytest.mark.parametrize(("option", "error"), [(0, ConfigError), (11, ConfigError), (10**9, ConfigError),
                                               ("2", ConfigError), (1, DataError)])
def test_npz_num_classes_lies_between_the_labels_and_the_samples(tmp_path, option, error):
    with pytest.raises(error, match="data.options.num_classes"):
        load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=X, y_train=Y), "num_classes": option})
    data = load_dataset("npz", 0, 0.2, {"path": save(tmp_path, x_train=X, y_train=Y), "num_classes": 10})
    assert data.num_classes == 10


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-3, 2**40), min_size=10, max_size=10))
def test_npz_labels_are_accepted_iff_they_are_classes_of_the_data(labels):
    import tempfile
    from pathlib import Path

    labels = np.array(labels, dtype=np.int64)
    ok = labels.min() >= 0 and labels.max() < len(labels)  # at most one class per sample
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp), x_train=X, y_train=labels, x_test=X[:2], y_test=np.zeros(2, np.int64))
        try:
            data = load_dataset("npz", 0, 0.2, {"path": path})
            assert ok and data.num_classes == labels.max() + 1
        except DataError as err:
            assert not ok and "y_train" in str(err)


def test_an_empty_split_is_refused_naming_test_fraction():
    with pytest.raises(DataError, match="data.test_fraction.*test split empty"):
        load_dataset("digits", 0, 1e-9)
    with pytest.raises(DataError, match="data.test_fraction.*training split empty"):
        load_dataset("digits", 0, 0.99999)


def test_a_loader_asking_for_more_memory_than_exists_is_a_data_error():
    with pytest.raises(DataError, match="more memory"):  # W alone would be 30 × 60 × 10¹¹ float64
        load_dataset("synthetic", 0, 0.2, {"num_classes": 10**11})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 0}, "classes"),
    ({"num_classes": 10**6}, "classes"),
    ({"y_test": np.array([0, 5])}, "y_test.*label 5"),
    ({"x_train": np.array([[np.inf]] * 3, np.float32)}, "x_train.*NaN or infinite"),
    ({"x_test": np.zeros((0, 1)), "y_test": np.zeros(0)}, "test split is empty"),
])
def test_every_dataset_is_checked_whatever_its_loader(kwargs, message):
    from fedsim.data.datasets import Dataset

    base = {"x_train": np.zeros((3, 1)), "y_train": np.array([0, 1, 0]), "x_test": np.zeros((2, 1)),
            "y_test": np.array([1, 0]), "num_classes": 2, "input_shape": (1,), "name": "t"}
    with pytest.raises(DataError, match=message):
        Dataset(**{**base, **kwargs})
