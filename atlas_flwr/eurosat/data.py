"""EuroSAT RGB: the npz of original JPEGs (or the hub), decoded once per process, and client partitions.

The npz (``../shared/data/eurosat/eurosat_rgb_jpeg.npz``, see its README) holds the 27,000 JPEG files
with labels and a stratified 5-fold assignment; fold 0 is the held-out test fold, folds 1-4 are
split among the clients.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from atlas_flwr.common.errors import DataError
from atlas_flwr.data.glue import make_partitioner

NPZ_NAME = "eurosat_rgb_jpeg.npz"
HUB_DATASET = "tanganke/eurosat"
NUM_CLASSES = 10
IMAGE_SIZE = 64
TEST_FOLD = 0
#: Per-channel mean and std of RGB/255 over all pixels (data README).
MEAN = (0.3444, 0.3803, 0.4078)
STD = (0.2027, 0.1369, 0.1156)
_NPZ_KEYS = ("jpeg_bytes", "offsets", "labels", "fold")


def default_npz() -> Path:
    """``../shared/data/eurosat/eurosat_rgb_jpeg.npz`` beside this checkout (may not exist)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "eurosat" / NPZ_NAME


class EuroSat:
    """Every EuroSAT image with its label and fold; images are decoded on first use and kept.

    Parameters
    ----------
    labels, folds : np.ndarray
        Class index and fold of each image.
    jpeg, offsets : np.ndarray, optional
        Concatenated JPEG bytes; image *i* is ``jpeg[offsets[i]:offsets[i + 1]]``.
    images : np.ndarray, optional
        Already decoded images (N, 64, 64, 3) uint8, instead of ``jpeg``/``offsets``.
    """

    def __init__(
        self,
        labels: np.ndarray,
        folds: np.ndarray,
        *,
        jpeg: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
        images: np.ndarray | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.folds = np.asarray(folds, dtype=np.int64)
        self._jpeg, self._offsets = jpeg, offsets
        n = len(self.labels)
        if images is not None:
            self._images, self._decoded = np.asarray(images, dtype=np.uint8), np.ones(n, dtype=bool)
        else:
            self._images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            self._decoded = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` as (n, 64, 64, 3) uint8; each JPEG is decoded once per process."""
        indices = np.asarray(indices, dtype=np.int64)
        for i in indices[~self._decoded[indices]]:
            raw = self._jpeg[self._offsets[i] : self._offsets[i + 1]].tobytes()
            img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
            if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
                raise DataError(f"EuroSAT image {i} has shape {img.shape}: expected (64, 64, 3)")
            self._images[i], self._decoded[i] = img, True
        return self._images[indices]

    def train_indices(self) -> np.ndarray:
        """Indices of the images the clients share (every fold but the test fold)."""
        return np.flatnonzero(self.folds != TEST_FOLD)

    def test_indices(self, max_samples: int = 0, seed: int = 0) -> np.ndarray:
        """Indices of the held-out test fold; a fixed random subset of ``max_samples`` if > 0."""
        idx = np.flatnonzero(self.folds == TEST_FOLD)
        if max_samples and len(idx) > max_samples:
            idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_samples, replace=False))
        return idx


def _from_npz(path: Path) -> EuroSat:
    if not path.is_file():
        raise DataError(f"EuroSAT file {str(path)!r} not found: expected the npz of {NPZ_NAME} (see the data README)")
    with np.load(path, allow_pickle=False) as d:
        missing = [k for k in _NPZ_KEYS if k not in d.files]
        if missing:
            raise DataError(f"EuroSAT file {str(path)!r} lacks arrays {missing}: expected {list(_NPZ_KEYS)}")
        jpeg, offsets, labels, folds = (d[k] for k in _NPZ_KEYS)
    if len(offsets) != len(labels) + 1 or len(folds) != len(labels):
        raise DataError(f"EuroSAT file {str(path)!r}: {len(labels)} labels, {len(offsets)} offsets, {len(folds)} folds")
    return EuroSat(labels, folds, jpeg=jpeg, offsets=offsets)


def _from_hub() -> EuroSat:
    import datasets

    try:
        splits = datasets.load_dataset(HUB_DATASET)
    except Exception as err:  # the hub raises many types; the user needs one line
        raise DataError(
            f"cannot load {HUB_DATASET} from the hub ({type(err).__name__}); set eurosat-data or "
            f"$ATLAS_EUROSAT_DATA to the local {NPZ_NAME}"
        ) from err
    images, labels, folds = [], [], []
    # The hub's test split is the held-out fold; every other split is client data.
    for name, split in splits.items():
        for row in split:
            img = row["image"].convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            images.append(np.asarray(img))
            labels.append(int(row["label"]))
            folds.append(TEST_FOLD if name == "test" else TEST_FOLD + 1)
    return EuroSat(np.array(labels), np.array(folds), images=np.stack(images))


@lru_cache(maxsize=2)
def load_eurosat(path: str) -> EuroSat:
    """EuroSAT from the npz at ``path``, or from the hub (``tanganke/eurosat``) when ``path`` is ''.

    Cached per process, so the images a process has decoded stay decoded.
    """
    return _from_npz(Path(path).expanduser()) if path else _from_hub()


def client_indices(
    data: EuroSat,
    client_id: int,
    num_clients: int,
    *,
    partitioner: str,
    alpha: float,
    seed: int,
    max_samples: int = 0,
) -> np.ndarray:
    """Image indices of one client: its flwr-datasets partition of the train folds.

    The train images are shuffled once with ``seed`` first, because the IID partitioner takes
    contiguous shards and the npz is ordered by class. ``max_samples`` = 0 keeps the whole partition.
    """
    import datasets

    if not 0 <= client_id < num_clients:
        raise DataError(f"partition {client_id} out of range: expected 0..{num_clients - 1}")
    train = data.train_indices()
    order = train[np.random.default_rng(seed).permutation(len(train))]
    part = make_partitioner(partitioner, num_clients, alpha, seed)
    part.dataset = datasets.Dataset.from_dict({"index": order, "label": data.labels[order]})
    # A slice gives whole numpy columns (indexing by column name iterates row by row in datasets 4).
    rows = np.asarray(part.load_partition(client_id).with_format("numpy")[:]["index"], dtype=np.int64)
    return rows[:max_samples] if max_samples else rows
