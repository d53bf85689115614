"""Datasets, partitioners and federations (``plot_label_distribution`` lives in ``fedsim.data.plot``)."""

from fedsim.data.datasets import DATASETS, Dataset, dataset_options, load_dataset, register_dataset
from fedsim.data.federation import Federation, clear_federation_cache, label_counts, make_federation
from fedsim.data.partitioners import PARTITIONERS, partition, partitioner_params, register_partitioner

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "Federation",
    "clear_federation_cache",
    "dataset_options",
    "label_counts",
    "load_dataset",
    "make_federation",
    "partition",
    "partitioner_params",
    "register_dataset",
    "register_partitioner",
]
