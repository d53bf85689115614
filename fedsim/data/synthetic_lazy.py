"""LEAF's Synthetic(α, β) generated per user on demand, for federations of 10⁵–10⁶ clients.

``data.options.lazy = true`` on the ``synthetic`` dataset. The eager form draws every sample of
every user from one stream, which needs the whole dataset in memory (100 000 users × 50 samples ×
60 features is 2.4 GB of float64 before any copy). Here user ``k`` has its own stream
``numpy_rng(seed, "dataset", "synthetic", "user", k)``: its model ``(W_k, b_k)``, its feature
centre, its samples and its train/test split are drawn from it when a client first needs them, and
a bounded cache keeps the most recent users only. User sizes are the eager form's (same seed, same
LEAF power law), so the partition of a federation is known before any sample exists.

References
----------
Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous Networks"
(FedProx), MLSys 2020; Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from fedsim.data import _checks
from fedsim.data.datasets import OPTIONS_PREFIX, TEST_FRACTION_KEY, Dataset
from fedsim.errors import DataError
from fedsim.rng import numpy_rng

#: users whose generated samples stay in memory (the clients of a few rounds)
CACHED_USERS = 512


class SyntheticUsers:
    """Per-user generator of Synthetic(α, β): ``user(k)`` gives ``(x_train, y_train, x_test, y_test)``.

    Parameters
    ----------
    seed
        Root seed of the run.
    sizes
        Samples per user (``int64``, each ``>= 1``).
    test_fraction
        Share of each user's samples held out (at least one stays for training).
    alpha, beta, dim, num_classes, iid
        As for the eager ``synthetic`` dataset.
    """

    def __init__(self, seed: int, sizes: np.ndarray, test_fraction: float, alpha: float, beta: float,
                 dim: int, num_classes: int, iid: bool) -> None:
        self.seed, self.alpha, self.beta, self.dim, self.num_classes, self.iid = seed, alpha, beta, dim, num_classes, iid
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.test_sizes = np.clip(np.floor(test_fraction * self.sizes + 0.5).astype(np.int64), 0, self.sizes - 1)
        self.train_sizes = self.sizes - self.test_sizes
        self.train_starts = np.concatenate([[0], np.cumsum(self.train_sizes)]).astype(np.int64)
        self.feature_std = np.arange(1, dim + 1) ** -0.6  # Σ_jj = j^-1.2
        shared = numpy_rng(seed, "dataset", "synthetic", "lazy-shared")
        self.shared = (shared.normal(0, 1, (dim, num_classes)), shared.normal(0, 1, num_classes)) if iid else None
        self._cache: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()

    @property
    def num_users(self) -> int:
        return len(self.sizes)

    @property
    def num_train(self) -> int:
        return int(self.train_starts[-1])

    def user(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """User ``k``'s ``(x_train, y_train, x_test, y_test)`` (``float32`` / ``int64``), from the cache."""
        k = int(k)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        data = self._generate(k)
        self._cache[k] = data
        if len(self._cache) > CACHED_USERS:
            self._cache.popitem(last=False)
        return data

    def _generate(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = numpy_rng(self.seed, "dataset", "synthetic", "user", k)
        n, dim, classes = int(self.sizes[k]), self.dim, self.num_classes
        if self.shared is not None:
            weights, bias = self.shared
            centre = np.zeros(dim)
        else:
            model_shift, feature_shift = rng.normal(0, self.alpha), rng.normal(0, self.beta)
            weights = rng.normal(model_shift, 1, (dim, classes))
            bias = rng.normal(model_shift, 1, classes)
            centre = rng.normal(feature_shift, 1, dim)
        x = centre + rng.normal(size=(n, dim)) * self.feature_std
        y = np.argmax(x @ weights + bias, axis=1).astype(np.int64)
        test = np.zeros(n, dtype=bool)
        test[rng.choice(n, size=int(self.test_sizes[k]), replace=False)] = True
        x = x.astype(np.float32)
        parts = (x[~test], y[~test], x[test], y[test])
        for part in parts:
            part.setflags(write=False)
        return parts

    def train_rows(self, index, column: int) -> np.ndarray:
        """Rows ``index`` of the virtual training set (users' training samples laid end to end)."""
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.num_train))
        scalar = np.ndim(index) == 0
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if index.size and (index.min() < -self.num_train or index.max() >= self.num_train):
            raise IndexError(f"index out of range for {self.num_train} training samples")
        index = np.where(index < 0, index + self.num_train, index)
        owner = np.searchsorted(self.train_starts, index, side="right") - 1
        shape = (len(index), self.dim) if column == 0 else (len(index),)
        out = np.empty(shape, dtype=np.float32 if column == 0 else np.int64)
        for k in np.unique(owner):
            mask = owner == k
            out[mask] = self.user(k)[column][index[mask] - self.train_starts[k]]
        return out[0] if scalar else out


class LazyRows:
    """Read-only array-like over the training features (``column=0``) or labels (``column=1``):
    indexing generates only the users that own the requested rows."""

    def __init__(self, users: SyntheticUsers, column: int) -> None:
        self.users, self.column = users, column
        self.dtype = np.dtype(np.float32 if column == 0 else np.int64)
        self.shape = (users.num_train, users.dim) if column == 0 else (users.num_train,)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        return self.users.train_rows(index, self.column)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # the whole set: generates every user
        whole = self.users.train_rows(slice(None), self.column)
        return whole if dtype is None else whole.astype(dtype)


class LazySynthetic(Dataset):
    """A :class:`~fedsim.data.datasets.Dataset` whose training split is generated per user on demand.

    ``x_train``/``y_train`` are :class:`LazyRows`; ``users`` is the :class:`SyntheticUsers`
    generator, whose ``train_starts`` give each user's contiguous range of training rows. The test
    split is generated when the dataset is built (from every user, or from ``test_users`` of them).
    """

    users: SyntheticUsers

    @classmethod
    def build(cls, seed: int, test_fraction: float, sizes: np.ndarray, *, alpha: float, beta: float, dim: int,
              num_classes: int, iid: bool, test_users: int) -> "LazySynthetic":
        users = SyntheticUsers(seed, sizes, test_fraction, alpha, beta, dim, num_classes, iid)
        if 0 < test_users < users.num_users:
            chosen = np.sort(numpy_rng(seed, "dataset", "synthetic", "lazy-test-users").choice(
                users.num_users, size=test_users, replace=False))
        else:
            chosen = np.arange(users.num_users)
        chosen = chosen[users.test_sizes[chosen] > 0]
        if len(chosen) == 0:
            raise DataError(f"{TEST_FRACTION_KEY}: {test_fraction} leaves no test sample in the users drawn for "
                            "the test set", f"raise {TEST_FRACTION_KEY} or {OPTIONS_PREFIX}.test_users")
        tests = [users._generate(int(k))[2:] for k in chosen]
        dataset = cls(x_train=LazyRows(users, 0), y_train=LazyRows(users, 1),
                      x_test=np.concatenate([t[0] for t in tests]), y_test=np.concatenate([t[1] for t in tests]),
                      num_classes=num_classes, input_shape=(dim,), name="synthetic")
        object.__setattr__(dataset, "users", users)
        return dataset

    def __post_init__(self) -> None:
        """Check the (materialised) test split; the training rows are valid by construction."""
        for field, dtype in (("x_test", np.float32), ("y_test", np.int64)):
            object.__setattr__(self, field, np.ascontiguousarray(getattr(self, field), dtype=dtype))
            getattr(self, field).setflags(write=False)
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.x_test.shape != (len(self.y_test), *self.input_shape):
            raise DataError(f"dataset '{self.name}': x_test has shape {self.x_test.shape}", "this is a bug in the loader")
        _checks.labels_in_range(f"dataset '{self.name}': y_test", self.y_test, self.num_classes,
                                "encode labels as 0..num_classes-1")
