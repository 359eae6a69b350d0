"""Data layer: loading, caching, partitioning and torch loaders."""

from medfedpure.data.datasets import (BR35H_CLASSES, CIFAR10_CLASSES, DataError, ImageSet, load_cifar10,
                                      load_class_folders, load_dataset, load_hospital_folder, make_synthetic)
from medfedpure.data.loaders import ImageTensorDataset, make_loader
from medfedpure.data.partition import (ClientSplit, check_splits, describe_splits, hospital_split,
                                       make_client_splits, partition_indices)

__all__ = ["BR35H_CLASSES", "CIFAR10_CLASSES", "ClientSplit", "DataError", "ImageSet", "ImageTensorDataset",
           "check_splits", "describe_splits", "hospital_split", "load_cifar10", "load_class_folders",
           "load_dataset", "load_hospital_folder", "make_client_splits", "make_loader", "make_synthetic",
           "partition_indices"]
