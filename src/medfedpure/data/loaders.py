"""Torch datasets over an `ImageSet`: scale to [0,1] and augment training scans."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from medfedpure.data.datasets import ImageSet


def train_augmentation(kind: str = "mri", size: tuple[int, int] | None = None) -> v2.Transform:
    """Per scan: `mri`, a small rotation, a horizontal flip and a brightness change; `cifar`, a
    horizontal flip and a translation of up to 2 pixels with reflected borders (the fast-CIFAR
    recipe: Page's ResNet-9, Jordan's airbench), for scans of `size` (height, width)."""
    if kind == "cifar":
        if size is None:
            raise ValueError("the cifar augmentation needs the scans' size")
        return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=2, padding_mode="reflect")])
    if kind != "mri":
        raise ValueError(f"unknown augmentation '{kind}' (mri or cifar)")
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.1),
    ])


class ImageTensorDataset(Dataset):
    def __init__(self, data: ImageSet, indices: np.ndarray | None = None, augment: str | None = None):
        idx = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.images = torch.from_numpy(np.ascontiguousarray(data.images[idx]))
        self.labels = torch.from_numpy(np.ascontiguousarray(data.labels[idx]))
        # the kind (data.augmentation)
        self.transform = train_augmentation(augment, tuple(self.images.shape[-2:])) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x).clamp_(0.0, 1.0)
        return x, self.labels[i]


def make_loader(data: ImageSet, indices: np.ndarray | None, batch_size: int, train: bool,
                seed: int = 0, augment: str | None = "mri") -> DataLoader:
    """Batches of (scans in [0, 1], labels); training batches shuffled and augmented (`augment`: the
    kind, data.augmentation, or None)."""
    gen = torch.Generator().manual_seed(seed)
    ds = ImageTensorDataset(data, indices, augment=augment if train else None)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, generator=gen,
                      drop_last=train and drops_lone_sample(len(ds), batch_size), num_workers=0)


def drops_lone_sample(n: int, batch_size: int) -> bool:
    """Training drops a last batch of one scan: BatchNorm cannot train on a single sample whose
    feature map is 1x1 (ResNet-18 / MobileNetV2 at 32 px). Other last batches are kept."""
    return n > 1 and n % batch_size == 1
