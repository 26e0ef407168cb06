"""EuroSAT data: the npz loader (decode on demand, once) and the flwr-datasets partitions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from atlas_flwr.common.errors import DataError
from atlas_flwr.eurosat.data import TEST_FOLD, client_indices, default_npz, load_eurosat


@pytest.fixture(scope="module")
def eurosat_npz() -> str:
    """The EuroSAT npz: $ATLAS_EUROSAT_DATA or ../shared/data/eurosat beside the repo."""
    path = Path(os.environ.get("ATLAS_EUROSAT_DATA") or default_npz())
    if not path.is_file():
        pytest.fail(f"EuroSAT npz not found at {path}: set ATLAS_EUROSAT_DATA")
    return str(path)


def test_npz_loads_labels_folds_and_decodes_images_once(eurosat_npz: str) -> None:
    data = load_eurosat(eurosat_npz)
    assert len(data) == 27_000 and data.labels.max() == 9
    assert np.bincount(data.labels).tolist() == [3000, 3000, 3000, 2500, 2500, 2000, 2500, 3000, 2500, 3000]
    assert len(data.test_indices()) == 5_400 and len(data.train_indices()) == 21_600
    idx = np.array([0, 13_000, 26_999])
    images = data.images(idx)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0
    assert data._decoded[idx].all() and data._decoded.sum() >= 3
    assert np.array_equal(data.images(idx), images)  # served from the cache
    sub = data.test_indices(100, seed=1)
    assert len(sub) == 100 and (data.folds[sub] == TEST_FOLD).all()
    assert np.array_equal(sub, data.test_indices(100, seed=1))


def test_missing_npz_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_eurosat(str(tmp_path / "none.npz"))
    assert "\n" not in str(info.value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, labels=np.zeros(3))
    with pytest.raises(DataError, match="lacks arrays"):
        load_eurosat(str(bad))


def test_iid_partitions_cover_the_train_folds_disjointly(eurosat_npz: str) -> None:
    data = load_eurosat(eurosat_npz)
    parts = [client_indices(data, i, 10, partitioner="iid", alpha=0.5, seed=7) for i in range(10)]
    joined = np.concatenate(parts)
    assert len(joined) == 21_600 and len(np.unique(joined)) == 21_600
    assert (data.folds[joined] != TEST_FOLD).all()
    assert {len(p) for p in parts} == {2160}
    # IID after the seeded shuffle: every client sees every class in roughly the global share.
    shares = np.stack([np.bincount(data.labels[p], minlength=10) / len(p) for p in parts])
    assert np.abs(shares - shares.mean(0)).max() < 0.05
    again = client_indices(data, 3, 10, partitioner="iid", alpha=0.5, seed=7)
    assert np.array_equal(again, parts[3])
    assert len(client_indices(data, 3, 10, partitioner="iid", alpha=0.5, seed=7, max_samples=50)) == 50


def test_dirichlet_partitions_are_disjoint_and_skewed(eurosat_npz: str) -> None:
    data = load_eurosat(eurosat_npz)
    parts = [client_indices(data, i, 5, partitioner="dirichlet", alpha=0.1, seed=0) for i in range(5)]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == 21_600
    top_share = [np.bincount(data.labels[p], minlength=10).max() / len(p) for p in parts]
    assert max(top_share) > 0.3  # IID would give about 0.14
    with pytest.raises(DataError, match="out of range"):
        client_indices(data, 5, 5, partitioner="iid", alpha=0.5, seed=0)
