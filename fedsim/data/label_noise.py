"""Symmetric label noise (``data.label_noise``): a seeded fraction of training labels flipped to another class.

Each of ``round(fraction · N)`` training samples, drawn uniformly without replacement, gets a label drawn
uniformly from the *other* ``K − 1`` classes (symmetric noise, as in the label-noise experiments of Nakkiran
et al., "Deep Double Descent", ICLR 2020, and Zhang et al., "Understanding deep learning requires rethinking
generalization", ICLR 2017). The test split is never touched, so test error measures the clean task.
The noise is drawn from its own stream of the root seed, before the server split and the partition.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedsim.errors import ConfigError

__all__ = ["LABEL_NOISE_KEY", "flip_labels", "with_label_noise"]

LABEL_NOISE_KEY = "data.label_noise"


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy labels, sorted indices of the flipped samples)``; every flipped label differs from the original."""
    labels = np.asarray(labels, dtype=np.int64)
    count = int(round(fraction * len(labels)))
    if count and num_classes < 2:
        raise ConfigError(LABEL_NOISE_KEY, "needs at least two classes to flip a label to another",
                          f"set {LABEL_NOISE_KEY} = 0 for a one-class dataset")
    flipped = np.sort(rng.choice(len(labels), size=count, replace=False)) if count else np.zeros(0, np.int64)
    noisy = labels.copy()
    shift = rng.integers(1, max(num_classes, 2), size=count)  # 1..K-1: never the same class
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped.astype(np.int64)


def with_label_noise(data, fraction: float, rng: np.random.Generator):
    """``data`` (a :class:`~fedsim.data.datasets.Dataset`) with ``fraction`` of its training labels flipped."""
    if not fraction:
        return data
    noisy, _ = flip_labels(data.y_train, fraction, data.num_classes, rng)
    return dataclasses.replace(data, y_train=noisy)
