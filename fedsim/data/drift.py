"""A temporally drifting dataset: class-conditional Gaussians whose means rotate with time.

For the ``gi_loss`` plugin (Nasery et al., "Training for the Future: A Simple Gradient Interpolation
Loss to Generalize Along Time", NeurIPS 2021) and any study of clients whose data move with time.
Fully determined by the seed, like the other generated datasets.
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.data import _checks
from fedsim.data.datasets import OPTIONS_PREFIX, Dataset, register_dataset
from fedsim.rng import numpy_rng


def _key(option: str) -> str:
    return f"{OPTIONS_PREFIX}.{option}"


def class_means(t: np.ndarray, labels: np.ndarray, num_classes: int, rotation: float, radius: float) -> np.ndarray:
    """Mean of each sample's class at its time: on a circle of ``radius``, class ``c`` at angle
    ``2πc/C + rotation·t`` (shape ``(N, 2)``)."""
    angle = 2 * math.pi * labels / num_classes + rotation * t
    return radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)


@register_dataset("drift")
def drift(seed: int, test_fraction: float, num_samples: int = 4000, num_classes: int = 4, dim: int = 2,
          rotation: float = 1.5707963267948966, radius: float = 2.0, noise: float = 0.6,
          num_slices: int = 100) -> Dataset:
    """Class-conditional Gaussians whose means rotate with a time index ``t ∈ [0, 1]``.

    Each sample draws ``t ~ U(0, 1)`` and a balanced label ``c``; its first two features are the
    class mean at that time (:func:`class_means`: angle ``2πc/C + rotation·t`` on a circle of
    ``radius``) plus ``N(0, noise²)`` noise, the other ``dim − 2`` features are pure noise, and the
    **last feature is ``t`` itself**, so any model sees the time (input shape ``(dim + 1,)``).

    The split is *by time*: the test set is the future, ``t > 1 − test_fraction``; training data
    have ``t ≤ 1 − test_fraction``. ``natural_ids`` cut the training period into ``num_slices``
    consecutive time slices, so ``data.partitioner = "natural"`` gives each client consecutive
    slices (the last clients hold the most recent data).

    ``rotation`` is the total angle the means turn over ``[0, 1]`` (``π/2`` by default: at ``t = 1``
    each class sits where its neighbour was at ``t = 0``); ``rotation = 0`` gives no drift.
    """
    num_samples = _checks.int_at_least(_key("num_samples"), num_samples, 4)
    num_classes = _checks.int_at_least(_key("num_classes"), num_classes, 2)
    dim = _checks.int_at_least(_key("dim"), dim, 2)
    rotation = _checks.real(_key("rotation"), rotation)
    radius = _checks.real(_key("radius"), radius, low=0.0)
    noise = _checks.real(_key("noise"), noise, low=0.0)
    num_slices = _checks.positive_int(_key("num_slices"), num_slices)
    rng = numpy_rng(seed, "dataset", "drift")
    t = np.sort(rng.uniform(0.0, 1.0, num_samples))
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    x = rng.normal(0.0, noise, (num_samples, dim))
    x[:, :2] += class_means(t, labels, num_classes, rotation, radius)
    features = np.concatenate([x, t[:, None]], axis=1)
    horizon = 1.0 - test_fraction
    test = t > horizon
    if test.all() or not test.any():
        from fedsim.errors import DataError

        raise DataError(f"data.test_fraction: {test_fraction} leaves no {'training' if test.all() else 'test'} "
                        f"period among {num_samples} samples", "use a test_fraction within (0, 1) or more samples")
    train = ~test
    slices = np.minimum((t[train] / horizon * num_slices).astype(np.int64), num_slices - 1)
    return Dataset(features[train], labels[train], features[test], labels[test], num_classes=num_classes,
                   input_shape=(dim + 1,), name="drift", natural_ids=slices)
