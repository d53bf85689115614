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
#: how NumPy words a ValueError for an array larger than any address space
_TOO_BIG = ("array is too big", "Maximum allowed size exceeded", "maximum supported dimension")


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
        self._check_values()

    def _check_values(self) -> None:
        """Classes in ``1..MAX_CLASSES``, labels in ``0..num_classes-1``, finite features, both splits
        non-empty: what every model, partitioner and metric downstream relies on."""
        k = self.num_classes
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= _checks.MAX_CLASSES:
            raise DataError(f"dataset '{self.name}': {k!r} classes; a dataset needs 1..{_checks.MAX_CLASSES} "
                            "(fedsim.data._checks.MAX_CLASSES)", f"lower {OPTIONS_PREFIX}.num_classes")
        object.__setattr__(self, "num_classes", int(k))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(y) == 0:
                raise DataError(f"dataset '{self.name}': the {split} split is empty, so nothing could be "
                                f"{'trained on' if split == 'train' else 'evaluated'}",
                                f"change {TEST_FRACTION_KEY} or give the dataset more samples")
            _checks.labels_in_range(f"dataset '{self.name}': y_{split}", y, self.num_classes,
                                    "encode labels as 0..num_classes-1")
            if not np.isfinite(x).all():
                raise DataError(f"dataset '{self.name}': x_{split} contains NaN or infinite values",
                                "clean the features before loading them")

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
            try:
                return checked(seed, test_fraction, **options)
            except (MemoryError, ValueError) as err:  # NumPy refused an allocation: the options ask too much
                if not isinstance(err, MemoryError) and not str(err).startswith(_TOO_BIG):
                    raise
                raise DataError(f"dataset '{name}' with {OPTIONS_PREFIX} {options} needs more memory than "
                                f"this machine has ({err})", f"ask for less data in {OPTIONS_PREFIX}") from None

        load.__wrapped__ = loader  # inspect.signature shows the loader's options
        load.__name__ = loader.__name__
        load.__doc__ = loader.__doc__
        return DATASETS.register(name)(load)

    return deco


#: a `module:object` loader not registered by its module gets the same checks (fedsim.registry)
DATASETS.adopt = lambda name, loader: register_dataset(name)(loader)


def load_dataset(name: str, seed: int, test_fraction: float = 0.2, options: dict | None = None) -> Dataset:
    """Build the registered dataset ``name`` (``data.dataset``) with its ``data.options``."""
    loader = DATASETS.get(name, key=DATASET_KEY)
    return loader(seed, test_fraction, **(options or {}))


def split_train_test(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``, stratified by ``groups`` (default: by label ``y``).

    Raises :class:`DataError` naming ``data.test_fraction`` when either split would be empty (a test
    accuracy over no sample would be reported as if it had been measured).
    """
    train, test = stratified_fraction(y if groups is None else groups, test_fraction, rng)
    n = len(y)
    if len(test) == 0 or len(train) == 0:
        empty, fix = ("test", f"raise {TEST_FRACTION_KEY} to at least {1 / n:.3g}") if len(test) == 0 else (
            "training", f"lower {TEST_FRACTION_KEY}")
        raise DataError(f"{TEST_FRACTION_KEY}: {test_fraction} of {n} samples leaves the {empty} split empty",
                        f"{fix} or use more samples")
    return train, test


#: scikit-learn's bundled digits file, inside the installed ``sklearn`` package
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(data, target)`` exactly as ``sklearn.datasets.load_digits()`` returns them: ``float64`` pixels
    ``(1797, 64)`` in ``0..16`` and ``int64`` labels.

    ``load_digits`` parses scikit-learn's bundled ``digits.csv.gz`` (64 pixel columns and the label)
    with ``numpy.loadtxt``; so does this, reading the file from where ``sklearn`` is installed without
    importing it (that import, with SciPy's, takes seconds). A missing file is a :class:`DataError`.
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((p for p in (Path(r).joinpath(*DIGITS_FILE) for r in roots) if p.is_file()), None)
    if path is None:
        where = f"in {roots[0]}" if roots else "because scikit-learn is not installed"
        raise DataError(f"dataset 'digits': scikit-learn's bundled file {'/'.join(DIGITS_FILE)} was not found {where}",
                        "install scikit-learn (pip install 'scikit-learn>=1.4'), which ships the digits data, "
                        "or choose another data.dataset")
    with gzip.open(path, mode="rt", encoding="utf-8") as fh:
        data = np.loadtxt(fh, delimiter=",")
    if data.ndim != 2 or data.shape[1] != 65:
        raise DataError(f"dataset 'digits': {path} has shape {data.shape}, expected (samples, 64 pixels + label)",
                        "reinstall scikit-learn: its bundled digits file is damaged")
    return data[:, :-1], data[:, -1].astype(np.int64)


@register_dataset("digits")
def digits(seed: int, test_fraction: float) -> Dataset:
    """Scikit-learn's bundled handwritten digits: 1797 images of 8×8 pixels, 10 classes.

    Pixels are scaled from ``0..16`` to ``[0, 1]``; the test split is stratified by label and
    drawn from ``numpy_rng(seed, "dataset", "digits", "split")``. The arrays are those of
    ``sklearn.datasets.load_digits()``, read from its bundled file (:func:`digits_arrays`).
    """
    data, target = digits_arrays()
    x = (data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = target
    train, test = split_train_test(x, y, test_fraction, numpy_rng(seed, "dataset", "digits", "split"))
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10, input_shape=(1, 8, 8), name="digits")
