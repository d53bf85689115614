"""The built-in datasets and partitioners: importing this module registers every one of them.

Each loader and partitioner registers itself when its module is imported. This is the one
place that lists those modules; ``fedsim/data/__init__.py`` imports it, so any import from
``fedsim.data`` (``fedsim.data.datasets.DATASETS``, ``fedsim.data.federation.make_federation``, …)
sees complete ``DATASETS`` and ``PARTITIONERS`` registries.
"""

from __future__ import annotations

from fedsim.data import datasets, drift, label_skew, npz_file, partitioners, separable, synthetic, tree_partition

MODULES = (datasets, npz_file, synthetic, separable, drift, partitioners, label_skew, tree_partition)
