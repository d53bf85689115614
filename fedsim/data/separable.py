"""A linearly separable binary dataset with a guaranteed margin, generated from the seed.

The setting of Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient
Descent with Large Step Sizes", 2024 (arXiv 2412.08424): logistic regression on separable data, where
the loss keeps falling towards zero and step sizes can grow without bound. Used by
``scenarios/separable_logreg.toml`` with the ``normalized_gd`` gradient transform.
"""

from __future__ import annotations

import numpy as np

from fedsim.data import _checks
from fedsim.data.datasets import OPTIONS_PREFIX, Dataset, register_dataset, split_train_test
from fedsim.rng import numpy_rng


def _key(option: str) -> str:
    return f"{OPTIONS_PREFIX}.{option}"


@register_dataset("separable")
def separable(seed: int, test_fraction: float, num_samples: int = 2000, dim: int = 20,
              margin: float = 0.1) -> Dataset:
    """Points ``x ~ N(0, I_dim)`` labelled by a random unit vector ``w*`` through the origin,
    ``y = 1[⟨w*, x⟩ > 0]``, then pushed away from the separating hyperplane along ``w*`` so that
    every point has ``|⟨w*, x⟩| ≥ margin``: the classes are separable with margin ``margin`` (for
    ``w*``; the best margin can only be larger). Two classes, features ``float32`` of shape ``(dim,)``.
    """
    num_samples = _checks.int_at_least(_key("num_samples"), num_samples, 2)
    dim = _checks.positive_int(_key("dim"), dim)
    margin = _checks.real(_key("margin"), margin, low=0.0)
    rng = numpy_rng(seed, "dataset", "separable")
    w = rng.normal(size=dim)
    w /= np.linalg.norm(w)
    x = rng.normal(size=(num_samples, dim))
    score = x @ w
    side = np.where(score > 0, 1.0, -1.0)
    x += np.maximum(margin - np.abs(score), 0.0)[:, None] * side[:, None] * w[None, :]
    y = (side > 0).astype(np.int64)
    x = x.astype(np.float32)
    train, test = split_train_test(x, y, test_fraction, numpy_rng(seed, "dataset", "separable", "split"))
    return Dataset(x[train], y[train], x[test], y[test], num_classes=2, input_shape=(dim,), name="separable")
