"""The LightningDataModule every stage trains and evaluates on: procedural images, local COCO
(map-style), or COCO folders / tar shards streamed across DDP ranks and workers."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from fingerprint_lm.config_schema import check_data_arguments
from fingerprint_lm.data.coco import CocoCaptions
from fingerprint_lm.data.sources import CocoFolder, TarShards, key_hash
from fingerprint_lm.data.streaming import EpochStreamLoader, StreamingCaptions
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, DataError, check_int

log = logging.getLogger(__name__)

STREAMING_SOURCES = ("coco_stream", "shards")

# Held-out synthetic sets use seeds far from any training seed a sweep would pick.
VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
# The COCO train/val/test split ignores the run seed: every run is evaluated on the same images.
COCO_SPLIT_SEED = 20170


def check_resolution(resolution: int, factor: int) -> None:
    """Raise ``ConfigError`` unless ``resolution`` is a positive multiple of the VAE's ``factor``."""
    check_int("VAE downscale factor", factor)
    check_int("image size", resolution)
    if resolution % factor:
        lower = resolution - resolution % factor
        suggestion = f"{lower} or {lower + factor}" if lower > 0 else f"{factor}"
        raise ConfigError(
            f"image size {resolution} is not divisible by the VAE's downscale factor {factor} "
            f"(use a multiple of {factor}, e.g. {suggestion})"
        )


def held_out_sizes(n: int, val_size: int, test_size: int) -> tuple[int, int]:
    """Validation and test sizes for ``n`` images.

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
    return n_val, n_test


def split_indices(n: int, val_size: int, test_size: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic train/val/test partition of ``range(n)`` (sizes as in ``held_out_sizes``)."""
    n_val, n_test = held_out_sizes(n, val_size, test_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def split_keys_by_hash(keys: list[str], val_size: int, test_size: int) -> tuple[set[str], set[str], set[str]]:
    """Deterministic train/val/test partition of sample keys for streamed sources.

    Keys are ranked by SHA-1: validation takes the first ``val_size``, test the next
    ``test_size`` (sizes as in ``held_out_sizes``). The split depends on the keys alone, not on
    shard order, seed, world size or worker count, and a COCO folder and shards made from it
    (same keys) hold out the same images.
    """
    n_val, n_test = held_out_sizes(len(keys), val_size, test_size)
    ranked = sorted(keys, key=lambda key: (key_hash(key), key))
    return set(ranked[n_val + n_test :]), set(ranked[:n_val]), set(ranked[n_val : n_val + n_test])


class ImageDataModule(L.LightningDataModule):
    """Captioned images for every stage: a procedural stream (default), a local COCO folder, or
    COCO / tar shards streamed.

    Parameters:
        source: ``"synthetic"`` (procedural, no files), ``"coco"`` (local COCO-captions folder,
            map-style), ``"coco_stream"`` (the same folder streamed) or ``"shards"`` (tar shards
            of ``<key>.jpg|png`` + ``<key>.txt``).
        resolution: side of the square images in pixels.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the synthetic training stream and of the COCO training shuffle.
        val_size: images in the validation set.
        test_size: images in the test set.
        coco_root: COCO folder (``annotations/`` + ``{coco_split}/``); required for ``"coco"``
            and ``"coco_stream"``.
        coco_split: COCO split whose images are divided into train/val/test.
        shards: tar shard path, glob pattern or list of them; required for ``"shards"``.
        shuffle_buffer: samples each streaming reader mixes in memory (still encoded).

    Synthetic: training is an infinite stream seeded by ``seed`` (one endless epoch: bound the
    run with ``max_steps``); validation and test are fixed sets of ``val_size`` / ``test_size``
    samples with seeds of their own. COCO: the folder is split deterministically (independent of
    ``seed``), training batches are shuffled. Streaming (``fingerprint_lm.data.streaming``):
    validation and test are the first ``val_size`` / ``test_size`` keys ranked by hash
    (``split_keys_by_hash``), read in a fixed order and not split across ranks (every rank sees
    the whole held-out set, as with synthetic data); training is the rest, reshuffled each epoch
    by ``seed``, split across ranks and workers with every rank getting the same number of
    samples (the epoch's last ``N % world_size`` are dropped).
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
        shards: str | list[str] | None = None,
        shuffle_buffer: int = 256,
    ) -> None:
        super().__init__()
        check_data_arguments(source, resolution, batch_size, num_workers, seed, val_size, test_size,
                             shuffle_buffer, coco_root, shards)
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_size = val_size
        self.test_size = test_size
        self.coco_root = coco_root
        self.coco_split = coco_split
        # Hydra hands lists over as ListConfig: keep plain values so workers pickle them cheaply.
        self.shards = shards if shards is None or isinstance(shards, str) else [str(s) for s in shards]
        self.shuffle_buffer = shuffle_buffer
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build all three sets (synthetic sets are lazy, COCO reads one JSON file, shards have their
        headers indexed once)."""
        if self.train_set is not None:
            return
        if self.source == "synthetic":
            self.train_set = ProceduralImages(self.resolution, seed=self.seed)
            self.val_set = ProceduralImages(self.resolution, self.seed + VAL_SEED_OFFSET, self.val_size)
            self.test_set = ProceduralImages(self.resolution, self.seed + TEST_SEED_OFFSET, self.test_size)
            return
        if self.source in STREAMING_SOURCES:
            self._setup_streaming()
            return
        coco = CocoCaptions(self.coco_root, split=self.coco_split, resolution=self.resolution)
        train, val, test = split_indices(len(coco), self.val_size, self.test_size, COCO_SPLIT_SEED)
        self.train_set, self.val_set, self.test_set = (
            Subset(coco, train),
            Subset(coco, val),
            Subset(coco, test),
        )

    def _setup_streaming(self) -> None:
        if self.source == "shards":
            sources = [TarShards(self.shards)]
        else:
            sources = [CocoFolder(self.coco_root, split=self.coco_split)]
        everything = StreamingCaptions(sources, self.resolution, shuffle=False)
        train, val, test = split_keys_by_hash(everything.keys(), self.val_size, self.test_size)
        # The sources are shared: shards are indexed once for all three sets.
        self.train_set = StreamingCaptions(
            sources,
            self.resolution,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            even_split=True,
            keys=train,
        )
        self.val_set = StreamingCaptions(
            sources, self.resolution, shuffle=False, keys=val, rank=0, world_size=1
        )
        self.test_set = StreamingCaptions(
            sources, self.resolution, shuffle=False, keys=test, rank=0, world_size=1
        )

    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        if isinstance(dataset, StreamingCaptions):
            # Shuffling happens inside the stream; the loader sets each pass's epoch.
            return EpochStreamLoader(
                dataset,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                epoch_fn=self._trainer_epoch,
            )
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
