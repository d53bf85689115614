"""Datasets, partitioners and federations (``plot_label_distribution`` lives in ``fedsim.data.plot``).

Importing the package imports :mod:`fedsim.data.builtin`, so the ``DATASETS`` and
``PARTITIONERS`` registries hold every built-in loader and partitioner.
"""

from fedsim.data import builtin  # noqa: F401  (registers the built-in datasets and partitioners)
from fedsim.data.datasets import DATASETS, Dataset, load_dataset, register_dataset
from fedsim.data.federation import Federation, clear_federation_cache, federation_of, label_counts, make_federation
from fedsim.data.partitioners import PARTITIONERS, partition, register_partitioner
from fedsim.data.splits import largest_remainder

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "Federation",
    "clear_federation_cache",
    "federation_of",
    "label_counts",
    "largest_remainder",
    "load_dataset",
    "make_federation",
    "partition",
    "register_dataset",
    "register_partitioner",
]
