"""The LightningDataModule every stage trains and evaluates on: procedural images or local COCO."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fingerprint_lm.data.coco import CocoCaptions
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "coco")

# Held-out synthetic sets use seeds far from any training seed a sweep would pick.
VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
# The COCO train/val/test split ignores the run seed: every run is evaluated on the same images.
COCO_SPLIT_SEED = 20170


def check_resolution(resolution: int, factor: int) -> None:
    """Raise ``ConfigError`` unless ``resolution`` is a positive multiple of the VAE's ``factor``."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"VAE downscale factor must be a positive integer, got {factor!r}")
    _check_positive_int("image size", resolution)
    if resolution % factor:
        lower = resolution - resolution % factor
        suggestion = f"{lower} or {lower + factor}" if lower > 0 else f"{factor}"
        raise ConfigError(
            f"image size {resolution} is not divisible by the VAE's downscale factor {factor} "
            f"(use a multiple of {factor}, e.g. {suggestion})"
        )


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    # bool is an int subclass: `resolution: true` in a YAML file must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def split_indices(n: int, val_size: int, test_size: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic train/val/test partition of ``range(n)``.

    Held-out sets shrink to a fifth of ``n`` each (at least one image) when the folder is too
    small for the requested sizes, so the training set is never empty.
    """
    n_val, n_test = val_size, test_size
    if n_val + n_test >= n:
        if n < 3:
            raise DataError(f"need at least 3 images to split into train/val/test, found {n}")
        n_val = n_test = max(1, n // 5)
        log.warning(
            "only %d images: holding out %d for validation and %d for test (asked for %d and %d)",
            n,
            n_val,
            n_test,
            val_size,
            test_size,
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


class ImageDataModule(L.LightningDataModule):
    """Captioned images for every stage: a procedural stream (default) or a local COCO folder.

    Parameters:
        source: ``"synthetic"`` (procedural, no files) or ``"coco"`` (local COCO-captions folder).
        resolution: side of the square images in pixels.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the synthetic training stream and of the COCO training shuffle.
        val_size: images in the validation set.
        test_size: images in the test set.
        coco_root: COCO folder (``annotations/`` + ``{coco_split}/``); required for ``"coco"``.
        coco_split: COCO split whose images are divided into train/val/test.

    Synthetic: training is an infinite stream seeded by ``seed`` (one endless epoch: bound the
    run with ``max_steps``); validation and test are fixed sets of ``val_size`` / ``test_size``
    samples with seeds of their own. COCO: the folder is split deterministically (independent of
    ``seed``), training batches are shuffled.
    """

    def __init__(
        self,
        source: str = "synthetic",
        resolution: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_size: int = 256,
        test_size: int = 256,
        coco_root: str | None = None,
        coco_split: str = "val2017",
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ConfigError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}")
        _check_positive_int("image resolution", resolution)
        _check_positive_int("batch size", batch_size)
        _check_positive_int("number of data workers", num_workers, minimum=0)
        _check_positive_int("data seed", seed, minimum=0)
        _check_positive_int("validation set size", val_size)
        _check_positive_int("test set size", test_size)
        if source == "coco" and not coco_root:
            raise ConfigError("data source 'coco' needs coco_root (the folder holding annotations/ and images)")
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_size = val_size
        self.test_size = test_size
        self.coco_root = coco_root
        self.coco_split = coco_split
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build all three sets (cheap: synthetic sets are lazy, COCO reads one JSON file)."""
        if self.train_set is not None:
            return
        if self.source == "synthetic":
            self.train_set = ProceduralImages(self.resolution, seed=self.seed)
            self.val_set = ProceduralImages(self.resolution, self.seed + VAL_SEED_OFFSET, self.val_size)
            self.test_set = ProceduralImages(self.resolution, self.seed + TEST_SEED_OFFSET, self.test_size)
            return
        coco = CocoCaptions(self.coco_root, split=self.coco_split, resolution=self.resolution)
        train, val, test = split_indices(len(coco), self.val_size, self.test_size, COCO_SPLIT_SEED)
        self.train_set, self.val_set, self.test_set = Subset(coco, train), Subset(coco, val), Subset(coco, test)

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    # Each loader calls setup() itself so stages can use the module without a Trainer.
    def train_dataloader(self) -> DataLoader:
        self.setup()
        # The synthetic stream is an IterableDataset: DataLoader refuses shuffle=True for it.
        return self._loader(self.train_set, shuffle=self.source == "coco")

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set)
