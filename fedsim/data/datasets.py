"""Datasets held in memory as NumPy arrays, and the registry of their loaders.

A loader is ``loader(seed: int, test_fraction: float, **options) -> Dataset``. Nothing here
downloads anything: data is bundled with a library (scikit-learn's digits), generated from the
seed (``synthetic``, ``synthetic_images``) or read from a local file (``npz``). Those loaders live
in their own modules; :mod:`fedsim.data.builtin` imports them all, so ``DATASETS`` is complete
once ``fedsim.data`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedsim.data import _checks
from fedsim.data.splits import stratified_fraction
from fedsim.errors import DataError
from fedsim.registry import Registry
from fedsim.rng import numpy_rng

Loader = Callable[..., "Dataset"]
DATASETS: Registry[Loader] = Registry("dataset")

DATASET_KEY = "data.dataset"
OPTIONS_PREFIX = "data.options"
TEST_FRACTION_KEY = "data.test_fraction"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset split into train and test arrays.

    Attributes
    ----------
    x_train, x_test
        ``float32`` features, shape ``(N, *input_shape)``.
    y_train, y_test
        ``int64`` labels in ``[0, num_classes)``.
    num_classes
        Number of classes (some may be absent from a small sample).
    input_shape
        Shape of one example, e.g. ``(1, 28, 28)`` or ``(60,)``.
    name
        Registered name of the loader that built it.
    natural_ids, natural_ids_test
        Optional ``int64`` id of the natural owner of each sample (a user, a writer, a device),
        used by the ``natural`` partitioner; ``None`` when the data has no natural split.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    natural_ids: np.ndarray | None = None
    natural_ids_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        for field, dtype in (("x_train", np.float32), ("x_test", np.float32),
                             ("y_train", np.int64), ("y_test", np.int64)):
            object.__setattr__(self, field, np.ascontiguousarray(getattr(self, field), dtype=dtype))
        for field in ("natural_ids", "natural_ids_test"):
            if getattr(self, field) is not None:
                object.__setattr__(self, field, np.asarray(getattr(self, field), dtype=np.int64))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape != (len(y), *self.input_shape):
                raise DataError(f"dataset '{self.name}': x_{split} has shape {x.shape}, expected "
                                f"({len(y)}, *{self.input_shape})", "this is a bug in the loader")
        if self.natural_ids is not None and len(self.natural_ids) != len(self.y_train):
            raise DataError(f"dataset '{self.name}': natural_ids has {len(self.natural_ids)} entries "
                            f"for {len(self.y_train)} training samples", "give one id per training sample")

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register ``loader(seed, test_fraction, **options)`` under ``name``.

    The registered function rejects unknown options with a
    :class:`~fedsim.errors.ConfigError` naming ``data.options.<key>`` and the allowed options,
    and validates ``test_fraction``.
    """

    def deco(loader: Loader) -> Loader:
        checked = _checks.with_checked_keywords(OPTIONS_PREFIX, skip=2)(loader)

        def load(seed: int, test_fraction: float = 0.2, **options) -> Dataset:
            _checks.real(TEST_FRACTION_KEY, test_fraction, low=0.0, high=1.0, high_inclusive=False)
            return checked(seed, test_fraction, **options)

        load.__wrapped__ = loader  # inspect.signature shows the loader's options
        load.__name__ = loader.__name__
        load.__doc__ = loader.__doc__
        return DATASETS.register(name)(load)

    return deco


def load_dataset(name: str, seed: int, test_fraction: float = 0.2, options: dict | None = None) -> Dataset:
    """Build the registered dataset ``name`` (``data.dataset``) with its ``data.options``."""
    loader = DATASETS.get(name, key=DATASET_KEY)
    return loader(seed, test_fraction, **(options or {}))


def split_train_test(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``, stratified by ``groups`` (default: by label ``y``)."""
    return stratified_fraction(y if groups is None else groups, test_fraction, rng)


@register_dataset("digits")
def digits(seed: int, test_fraction: float) -> Dataset:
    """Scikit-learn's bundled handwritten digits: 1797 images of 8×8 pixels, 10 classes.

    Pixels are scaled from ``0..16`` to ``[0, 1]``; the test split is stratified by label and
    drawn from ``numpy_rng(seed, "dataset", "digits", "split")``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train, test = split_train_test(x, y, test_fraction, numpy_rng(seed, "dataset", "digits", "split"))
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10, input_shape=(1, 8, 8), name="digits")
