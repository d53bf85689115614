"""Generated datasets: LEAF's Synthetic(α, β) and learnable synthetic images.

Both are fully determined by the seed, so every client process rebuilds the same data.
"""

from __future__ import annotations

import numpy as np

from fedsim.data import _checks
from fedsim.data.datasets import OPTIONS_PREFIX, Dataset, register_dataset, split_train_test
from fedsim.errors import ConfigError
from fedsim.rng import numpy_rng


def _key(option: str) -> str:
    return f"{OPTIONS_PREFIX}.{option}"


def _user_sizes(num_samples: int, num_users: int, rng: np.random.Generator) -> np.ndarray:
    """LEAF's power-law user sizes (log-normal(4, 2) weights on top of a floor), summing to ``num_samples``."""
    floor = max(1, min(50, num_samples // (2 * num_users)))
    weights = rng.lognormal(4.0, 2.0, num_users)
    share = (num_samples - floor * num_users) * weights / weights.sum()
    sizes = floor + np.floor(share).astype(np.int64)
    leftover = num_samples - int(sizes.sum())
    sizes[np.argsort(-(share - np.floor(share)), kind="stable")[:leftover]] += 1
    return sizes


@register_dataset("synthetic")
def synthetic(seed: int, test_fraction: float, alpha: float = 1.0, beta: float = 1.0,
              num_samples: int = 6000, num_users: int = 30, dim: int = 60, num_classes: int = 10,
              iid: bool = False, lazy: bool = False, test_users: int = 0) -> Dataset:
    """LEAF-style Synthetic(α, β) with a natural split by user (Li et al., 2020).

    For user ``k``: ``u_k ~ N(0, α)``, ``B_k ~ N(0, β)``; ``W_k ~ N(u_k, 1)`` (``dim × num_classes``),
    ``b_k ~ N(u_k, 1)``; ``v_k ~ N(B_k, 1)``; features ``x ~ N(v_k, Σ)`` with
    ``Σ = diag(j^-1.2)``; label ``y = argmax(x W_k + b_k)``. α controls how much the users'
    models differ, β how much their features differ; as in the reference generator, α and β are
    used as standard deviations. ``iid=True`` gives every user the same ``W, b ~ N(0, 1)`` and
    ``v = 0``. User sizes follow LEAF's log-normal power law. The test split takes about
    ``test_fraction`` of every user's samples, and ``natural_ids`` holds the user of each sample.

    ``lazy=True`` (for very large federations) generates each user's samples only when a client
    asks for them, from the user's own seeded stream (:class:`LazySynthetic`): the same model of
    the data and the same user sizes, but other random numbers than the eager form. It is split
    with the ``natural`` partitioner only; ``test_users > 0`` builds the test set from that many
    users drawn at random (default: every user's held-out samples).

    References
    ----------
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
    Networks" (FedProx), MLSys 2020; Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
    """
    alpha = _checks.real(_key("alpha"), alpha, low=0.0)
    beta = _checks.real(_key("beta"), beta, low=0.0)
    num_users = _checks.positive_int(_key("num_users"), num_users)
    num_samples = _checks.positive_int(_key("num_samples"), num_samples)
    dim = _checks.positive_int(_key("dim"), dim)
    num_classes = _checks.int_at_least(_key("num_classes"), num_classes, 2)
    iid = _checks.boolean(_key("iid"), iid)
    if num_samples < 2 * num_users:
        raise ConfigError(_key("num_samples"), f"{num_samples} samples cannot give {num_users} users "
                          "two samples each", f"raise {_key('num_samples')} to at least {2 * num_users} "
                          f"or lower {_key('num_users')}")
    lazy = _checks.boolean(_key("lazy"), lazy)
    test_users = _checks.int_at_least(_key("test_users"), test_users, 0)
    if test_users and not lazy:
        raise ConfigError(_key("test_users"), "only applies to the lazy form (the eager form holds out "
                          "part of every user)", f"remove {_key('test_users')} or set {_key('lazy')} = true")
    rng = numpy_rng(seed, "dataset", "synthetic")
    sizes = _user_sizes(num_samples, num_users, rng)
    if lazy:
        from fedsim.data.synthetic_lazy import LazySynthetic

        return LazySynthetic.build(seed, test_fraction, sizes, alpha=alpha, beta=beta, dim=dim,
                                   num_classes=num_classes, iid=iid, test_users=test_users)
    user_of_sample = np.repeat(np.arange(num_users), sizes)
    if iid:
        weights = np.broadcast_to(rng.normal(0, 1, (dim, num_classes)), (num_users, dim, num_classes))
        biases = np.broadcast_to(rng.normal(0, 1, num_classes), (num_users, num_classes))
        centres = np.zeros((num_users, dim))
    else:
        model_shift = rng.normal(0, alpha, num_users)
        feature_shift = rng.normal(0, beta, num_users)
        weights = rng.normal(model_shift[:, None, None], 1, (num_users, dim, num_classes))
        biases = rng.normal(model_shift[:, None], 1, (num_users, num_classes))
        centres = rng.normal(feature_shift[:, None], 1, (num_users, dim))
    feature_std = np.arange(1, dim + 1) ** -0.6  # Σ_jj = j^-1.2
    x = centres[user_of_sample] + rng.normal(size=(num_samples, dim)) * feature_std
    # user by user (samples are grouped by user): the same einsum on the same rows, without one
    # (num_samples, dim, num_classes) copy of the users' weights (≈0.3 GB and a second for 60 000 samples)
    logits = np.empty((num_samples, num_classes))
    ends = np.cumsum(sizes)
    for k, (start, stop) in enumerate(zip(ends - sizes, ends)):
        logits[start:stop] = np.einsum("nd,ndc->nc", x[start:stop], weights[np.full(stop - start, k)])
    logits += biases[user_of_sample]
    y = np.argmax(logits, axis=1)
    train, test = split_train_test(x, y, test_fraction, numpy_rng(seed, "dataset", "synthetic", "split"),
                                   groups=user_of_sample)
    return Dataset(x[train], y[train], x[test], y[test], num_classes=num_classes, input_shape=(dim,),
                   name="synthetic", natural_ids=user_of_sample[train], natural_ids_test=user_of_sample[test])


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise over the last two axes, rescaled to unit standard deviation."""
    from scipy import ndimage  # about a second to import: only for the image dataset

    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0,) * (len(shape) - 2) + (sigma, sigma),
                                    mode="wrap")
    return field / field.std()


def _bilinear(images: np.ndarray, which: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample ``images[which]`` at fractional ``(rows, cols)``, clamping at the border."""
    side = images.shape[-1]
    rows, cols = np.clip(rows, 0, side - 1), np.clip(cols, 0, side - 1)
    top, left = np.minimum(rows.astype(np.int64), side - 2), np.minimum(cols.astype(np.int64), side - 2)
    down, right = rows - top, cols - left
    image = which[:, None, None]

    def at(r, c):
        return images[image, r, c]

    upper = at(top, left) * (1 - right) + at(top, left + 1) * right
    lower = at(top + 1, left) * (1 - right) + at(top + 1, left + 1) * right
    return upper * (1 - down) + lower * down


def _render(prototypes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, max_shift: float,
            deformation: float, noise: float) -> np.ndarray:
    """Warp each sample's class prototype by a random shift and smooth displacement, then add noise."""
    n, side = len(labels), prototypes.shape[-1]
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    shift = rng.uniform(-max_shift, max_shift, (n, 2, 1, 1))
    warp = deformation * _smooth_fields(rng, (n, 2, side, side), sigma=side / 6) + shift
    images = _bilinear(prototypes, labels, rows + warp[:, 0], cols + warp[:, 1])
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1))
    return np.clip(images * contrast + rng.normal(0, noise, images.shape), 0.0, 1.0)


@register_dataset("synthetic_images")
def synthetic_images(seed: int, test_fraction: float, num_samples: int = 12000, num_classes: int = 10,
                     noise: float = 0.3, max_shift: float = 5.0, deformation: float = 2.5,
                     image_size: int = 28) -> Dataset:
    """Learnable 1×28×28 images: one smooth random pattern per class, warped and noisy per sample.

    Each class has a prototype (Gaussian-smoothed white noise squashed into ``[0, 1]``). A sample
    is its class prototype shifted by up to ``max_shift`` pixels, warped by a smooth random
    displacement field of about ``deformation`` pixels, scaled in contrast by ``U(0.8, 1.2)``, with
    Gaussian pixel ``noise`` added and clipped to ``[0, 1]``. Classes are balanced; a small CNN
    reaches well over 80% test accuracy with the defaults. Raising ``noise``, ``max_shift`` or
    ``deformation`` makes it harder.
    """
    num_samples = _checks.positive_int(_key("num_samples"), num_samples)
    num_classes = _checks.int_at_least(_key("num_classes"), num_classes, 2)
    noise = _checks.real(_key("noise"), noise, low=0.0)
    max_shift = _checks.real(_key("max_shift"), max_shift, low=0.0)
    deformation = _checks.real(_key("deformation"), deformation, low=0.0)
    side = _checks.int_at_least(_key("image_size"), image_size, 8)
    rng = numpy_rng(seed, "dataset", "synthetic_images")
    prototypes = 1.0 / (1.0 + np.exp(-2.0 * _smooth_fields(rng, (num_classes, side, side), sigma=side / 10)))
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    chunks = [_render(prototypes, labels[i:i + 2048], rng, max_shift, deformation, noise)
              for i in range(0, num_samples, 2048)]
    x = np.concatenate(chunks).astype(np.float32)[:, None]
    train, test = split_train_test(x, labels, test_fraction, numpy_rng(seed, "dataset", "synthetic_images", "split"))
    return Dataset(x[train], labels[train], x[test], labels[test], num_classes=num_classes,
                   input_shape=(1, side, side), name="synthetic_images")
