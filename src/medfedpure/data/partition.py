"""Split a dataset across clients (IID or Dirichlet label skew), then per client into train/test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfedpure.data.datasets import DataError


@dataclass
class ClientSplit:
    client_id: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    val_idx: np.ndarray  # clean scans held out to calibrate the detector (may be empty)

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def n_test(self) -> int:
        return len(self.test_idx)

    @property
    def n_val(self) -> int:
        return len(self.val_idx)


def partition_indices(labels: np.ndarray, num_clients: int, scheme: str = "iid",
                      alpha: float = 0.5, seed: int = 0, min_size: int = 10,
                      max_tries: int = 1000) -> list[np.ndarray]:
    """Indices of each client's data. `dirichlet` draws class shares per client from Dir(alpha)."""
    n = len(labels)
    if n < num_clients:
        raise DataError(f"the dataset has {n} images, fewer than the {num_clients} clients asked for")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme '{scheme}' (iid or dirichlet)")
    min_size = min(min_size, n // num_clients)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(f"could not draw a Dirichlet(alpha={alpha}) partition giving every one of "
                    f"{num_clients} clients at least {min_size} images; raise alpha or lower the client count")


def train_test_split(indices: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int,
                     val_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (train, val, test) split of one client's indices.

    Every class with >= 2 images lands in train and test; the test part does not depend on
    `val_fraction`, which is carved out of what would otherwise be training data.
    """
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for c in np.unique(labels[indices]):
        idx = rng.permutation(indices[labels[indices] == c])
        k = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        m = min(int(round(len(idx) * val_fraction)), max(len(idx) - k - 1, 0))
        test.append(idx[:k])
        val.append(idx[k:k + m])
        train.append(idx[k + m:])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test))


def make_client_splits(labels: np.ndarray, num_clients: int, scheme: str, alpha: float,
                       test_fraction: float, seed: int, min_size: int = 10,
                       val_fraction: float = 0.0) -> list[ClientSplit]:
    parts = partition_indices(labels, num_clients, scheme, alpha, seed, min_size)
    splits = [hospital_split(p, labels, i, test_fraction, seed, val_fraction) for i, p in enumerate(parts)]
    check_splits(splits, num_clients, val_fraction)
    return splits


def hospital_split(indices: np.ndarray, labels: np.ndarray, client: int, test_fraction: float, seed: int,
                   val_fraction: float = 0.0) -> ClientSplit:
    """One client's stratified split of its own scans (`indices`), seeded by the run seed and the
    client: the same whether the scans were cut from a pooled set or are the hospital's own."""
    train, val, test = train_test_split(indices, labels, test_fraction, seed * 7919 + client, val_fraction)
    return ClientSplit(client, train, test, val)


def check_splits(splits: list[ClientSplit], num_clients: int, val_fraction: float) -> None:
    short = [s for s in splits if s.n_train < 2 or s.n_test < 1 or (val_fraction > 0 and s.n_val < 1)]
    if short:  # a figure computed on nothing would read as 0%, a training set of one scan as a model
        sizes = ", ".join(f"client {s.client_id}: {s.n_train} train / {s.n_val} validation / {s.n_test} test"
                          for s in short[:5])
        raise DataError(f"{len(short)} of {num_clients} clients would get too few scans ({sizes}); every client "
                        "needs at least 2 training scans, 1 test scan (and 1 validation scan when "
                        "data.val_fraction > 0): use fewer clients or more data")


def describe_splits(splits: list[ClientSplit], labels: np.ndarray, num_classes: int) -> list[dict]:
    """n_i and class counts per client, for the log and the results folder."""
    return [{"client": s.client_id, "n_train": s.n_train, "n_val": s.n_val, "n_test": s.n_test,
             "train_class_counts": np.bincount(labels[s.train_idx], minlength=num_classes).tolist(),
             "test_class_counts": np.bincount(labels[s.test_idx], minlength=num_classes).tolist()}
            for s in splits]
