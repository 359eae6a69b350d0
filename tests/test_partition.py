import numpy as np
import pytest

from medfedpure.data import DataError, make_client_splits, partition_indices


def labels_of(n_per_class=100, classes=4):
    return np.repeat(np.arange(classes), n_per_class)


def test_iid_covers_everything_once_and_is_seeded():
    labels = labels_of()
    parts = partition_indices(labels, 7, "iid", seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    again = partition_indices(labels, 7, "iid", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 7, "iid", seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _skew(parts, labels):
    """Mean total-variation distance between each client's class mix and the global one."""
    glob = np.bincount(labels) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=len(glob)) / len(p) - glob).sum()
                    for p in parts])


def test_dirichlet_skews_labels_and_respects_min_size():
    labels = labels_of(250, 4)
    iid = partition_indices(labels, 5, "iid", seed=0)
    skewed = partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0, min_size=10)
    mild = partition_indices(labels, 5, "dirichlet", alpha=100.0, seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(len(labels)))
    assert min(len(p) for p in skewed) >= 10
    assert _skew(skewed, labels) > 0.3 > _skew(mild, labels)
    assert _skew(iid, labels) < 0.1


def test_client_splits_are_disjoint_stratified_and_seeded():
    labels = labels_of(50, 2)
    splits = make_client_splits(labels, 4, "iid", 0.5, 0.2, seed=3)
    for s in splits:
        assert not set(s.train_idx) & set(s.test_idx)
        assert set(np.unique(labels[s.test_idx])) == {0, 1}
        assert abs(s.n_test / (s.n_train + s.n_test) - 0.2) < 0.05
    again = make_client_splits(labels, 4, "iid", 0.5, 0.2, seed=3)
    assert all(np.array_equal(a.test_idx, b.test_idx) for a, b in zip(splits, again))
    assert sum(s.n_train + s.n_test for s in splits) == len(labels)


def test_fewer_images_than_clients_is_a_clear_error():
    with pytest.raises(DataError, match="3 images, fewer than the 5 clients"):
        partition_indices(np.array([0, 1, 0]), 5)


def test_validation_split_leaves_the_test_split_unchanged():
    labels = labels_of(50, 2)
    plain = make_client_splits(labels, 3, "iid", 0.5, 0.2, seed=1)
    with_val = make_client_splits(labels, 3, "iid", 0.5, 0.2, seed=1, val_fraction=0.1)
    for a, b in zip(plain, with_val):
        assert np.array_equal(a.test_idx, b.test_idx) and a.n_val == 0
        assert b.n_val > 0 and not set(b.val_idx) & (set(b.train_idx) | set(b.test_idx))
        assert set(b.val_idx) | set(b.train_idx) == set(a.train_idx)
