"""Captioned images streamed from local COCO folders and tar shards, split across DDP ranks and
DataLoader workers so that every item of an epoch is read by exactly one (rank, worker).

Sources (``CocoFolder``, ``TarShards``) are in :mod:`fingerprint_lm.data.sources`.

How an epoch is read (``StreamingCaptions.__iter__``):

1. The global order: units (shards / COCO chunks) in a permutation seeded by ``(seed, epoch)``;
   inside a COCO chunk the items are permuted too (random access), inside a tar shard they keep
   their order (streamed). Every rank and worker computes the same order independently.
2. The order is cut into ``world_size`` contiguous slices (rank), each slice into
   ``num_workers`` contiguous slices (DataLoader worker). Contiguous slices mean a tar shard is
   read by at most a few readers, each from the byte offset of its first sample (recorded when
   the shard was indexed), in ``tarfile`` stream mode: nothing is extracted to disk.
3. Each reader passes its records through a shuffle buffer of ``shuffle_buffer`` (still-encoded)
   samples, seeded by ``(seed, epoch, rank, worker)``, and only then decodes, resizes the shorter
   side to ``resolution`` and centre-crops.

Uneven counts: DDP needs the same number of batches on every rank. With ``even_split=True``
each rank gets ``N // world_size`` items and the last ``N % world_size`` items of the epoch's
order are dropped (fewer than ``world_size`` per epoch; a different few each epoch when
shuffling, always the same few when not). Padding by repetition was rejected: it puts duplicates
into an epoch. With ``even_split=False`` the slices differ by at most one item and their union
is exactly the data set. Inside a rank the worker slices follow the same formula on every rank,
so equal rank counts give equal batch counts.

Bad data raises ``DataError`` instead of being skipped: a skipped sample would give one rank
fewer batches than the others and hang DDP, and it hides broken data. Shards are indexed when
the data set is built (headers only), so a missing caption or image, a sample whose files are
not adjacent, a truncated tar or a duplicate key fail before training starts; a corrupt image
fails when it is decoded, naming shard and member.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fingerprint_lm.data.coco import NO_LABEL, load_rgb, resize_center_crop, to_tensor
from fingerprint_lm.data.sources import CocoFolder, EncodedSample, TarShards
from fingerprint_lm.errors import ConfigError, DataError, check_int


def _slice(n: int, parts: int, part: int) -> tuple[int, int]:
    """Bounds of slice ``part`` of ``range(n)`` cut into ``parts`` near-equal contiguous slices."""
    return part * n // parts, (part + 1) * n // parts


def _shuffle_buffer(
    records: Iterable[EncodedSample], size: int, rng: np.random.Generator
) -> Iterator[EncodedSample]:
    """Yield ``records`` in an order mixed within a window of ``size`` records."""
    buffer: list[EncodedSample] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = record
    rng.shuffle(buffer)
    yield from buffer


class StreamingCaptions(IterableDataset):
    """Captioned images from COCO folders and tar shards, each read by one (rank, worker).

    Parameters:
        sources: ``CocoFolder`` / ``TarShards`` objects; their units are concatenated. Keys must
            be unique across all of them.
        resolution: side of the square output images (shorter side resized, centre cropped).
        seed: seeds the per-epoch order; must be the same on every rank.
        shuffle: permute units and COCO images per epoch and use the shuffle buffer; ``False``
            reads in index order (held-out sets).
        shuffle_buffer: encoded samples each reader mixes (0 or 1: none).
        even_split: give every rank ``N // world_size`` items, dropping the epoch's last
            ``N % world_size`` (DDP training); ``False`` covers every item exactly once.
        keys: read only the samples with these keys (e.g. a held-out set); ``None`` reads all.
        rank, world_size: override the DDP rank and world size (tests, or splitting by hand);
            by default they come from ``torch.distributed`` when it is initialised.

    Samples are ``{"image": FloatTensor[3, R, R] in [-1, 1], "caption": str, "shape": -1,
    "texture": -1, "color": -1, "key": str}``: the procedural/COCO format plus the sample's key.

    ``set_epoch(epoch)`` must be called in the main process before each pass when shuffling
    (``EpochStreamLoader`` does it). It writes to shared memory, so persistent DataLoader workers
    see it, and records the DDP rank there too, so workers started with ``spawn`` (where
    ``torch.distributed`` is not initialised) still know their rank.
    """

    def __init__(
        self,
        sources: Sequence[TarShards | CocoFolder],
        resolution: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        even_split: bool = False,
        keys: Collection[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        check_int("image resolution", resolution, 1)
        check_int("stream seed", seed, 0)
        check_int("shuffle buffer", shuffle_buffer, 0)
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither")
        if world_size is not None:
            check_int("world size", world_size, 1)
            check_int("rank", rank, 0)
            if rank >= world_size:
                raise ConfigError(f"rank {rank} is out of range for world size {world_size}")
        self.sources = list(sources)
        if not self.sources:
            raise ConfigError("a streaming data set needs at least one source")
        self.resolution = resolution
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.even_split = even_split
        self.rank = rank
        self.world_size = world_size
        self.units = [unit for source in self.sources for unit in source.units()]
        owner: dict[str, str] = {}
        for unit in self.units:
            for key in unit.keys:
                if key in owner:
                    raise DataError(f"sample key {key!r} occurs twice: in {owner[key]} and in {unit.name}")
                owner[key] = unit.name
        if keys is None:
            self._positions = [np.arange(len(unit.keys), dtype=np.int64) for unit in self.units]
        else:
            keys = set(keys)
            unknown = keys - owner.keys()
            if unknown:
                raise DataError(
                    f"{len(unknown)} requested keys are in no source, e.g. {sorted(unknown)[0]!r}"
                )
            self._positions = [
                np.array([p for p, key in enumerate(unit.keys) if key in keys], dtype=np.int64)
                for unit in self.units
            ]
        self.num_items = sum(len(positions) for positions in self._positions)
        if self.num_items == 0:
            raise DataError(
                f"no captioned images in {', '.join(unit.name for unit in self.units) or 'the sources'}"
            )
        # [epoch, rank, world size]; -1 = rank not recorded. Shared so persistent workers see updates.
        self._shared = torch.tensor([0, -1, -1], dtype=torch.int64).share_memory_()

    def keys(self) -> list[str]:
        """Keys of the samples this data set reads, in index order."""
        return [self.units[u].keys[p] for u, positions in enumerate(self._positions) for p in positions]

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (same on every rank) and record this process's DDP rank."""
        check_int("epoch", epoch, 0)
        self._shared[0] = epoch
        if (
            self.world_size is None
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            self._shared[1] = torch.distributed.get_rank()
            self._shared[2] = torch.distributed.get_world_size()

    def distributed(self) -> tuple[int, int]:
        """(rank, world size): explicit arguments, else recorded by ``set_epoch``, else live."""
        if self.world_size is not None:
            return self.rank, self.world_size
        if int(self._shared[2]) > 0:
            return int(self._shared[1]), int(self._shared[2])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def items_per_rank(self, world_size: int | None = None) -> list[int]:
        """How many samples each rank reads per epoch."""
        world = self.distributed()[1] if world_size is None else world_size
        if self.even_split:
            return [self.num_items // world] * world
        return [stop - start for start, stop in (_slice(self.num_items, world, r) for r in range(world))]

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global order as parallel arrays (unit index, position in unit)."""
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        unit_ids, positions = [], []
        for u in order:
            selected = self._positions[u]
            if self.shuffle and self.units[u].random_access:
                selected = np.random.default_rng([self.seed, epoch, int(u)]).permutation(selected)
            unit_ids.append(np.full(len(selected), u, dtype=np.int64))
            positions.append(selected)
        return np.concatenate(unit_ids), np.concatenate(positions)

    def reader_bounds(
        self, epoch_items: int, rank: int, world: int, worker: int, workers: int
    ) -> tuple[int, int]:
        """Slice ``[start, stop)`` of the epoch's order read by ``(rank, worker)``."""
        if self.even_split:
            per_rank = epoch_items // world
            start, stop = rank * per_rank, (rank + 1) * per_rank
        else:
            start, stop = _slice(epoch_items, world, rank)
        first, last = _slice(stop - start, workers, worker)
        return start + first, start + last

    def _encoded_stream(self, unit_ids: np.ndarray, positions: np.ndarray) -> Iterator[EncodedSample]:
        start = 0
        while start < len(unit_ids):
            stop = start + 1
            while stop < len(unit_ids) and unit_ids[stop] == unit_ids[start]:
                stop += 1
            unit = self.units[int(unit_ids[start])]
            yield from unit.source.read(unit, positions[start:stop].tolist())
            start = stop

    def decode(self, record: EncodedSample) -> dict:
        """Encoded sample -> the sample dict (decode, resize the shorter side, centre crop)."""
        source = io.BytesIO(record.image) if isinstance(record.image, bytes) else record.image
        image: Image.Image = resize_center_crop(load_rgb(source, name=record.image_name), self.resolution)
        return {
            "image": to_tensor(image),
            "caption": record.caption,
            "shape": NO_LABEL,
            "texture": NO_LABEL,
            "color": NO_LABEL,
            "key": record.key,
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.distributed()
        epoch = self.epoch
        unit_ids, positions = self.epoch_order(epoch)
        start, stop = self.reader_bounds(len(unit_ids), rank, world, worker, workers)
        records = self._encoded_stream(unit_ids[start:stop], positions[start:stop])
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, epoch, rank, worker])
            records = _shuffle_buffer(records, self.shuffle_buffer, rng)
        for record in records:
            yield self.decode(record)


class EpochStreamLoader(DataLoader):
    """A DataLoader over a ``StreamingCaptions`` that calls ``dataset.set_epoch`` before each pass.

    Lightning calls ``set_epoch`` only on a loader's sampler, which an iterable data set does not
    have; this loader does it itself. The epoch is ``epoch_fn()`` (e.g. the trainer's current
    epoch, right after a resume too) or, when that is missing or returns ``None``, the number of
    passes this loader has started.
    """

    def __init__(
        self, dataset: StreamingCaptions, *args, epoch_fn: Callable[[], int | None] | None = None, **kwargs
    ):
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.passes = 0

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.dataset.set_epoch(self.passes if epoch is None else epoch)
        self.passes += 1
        return super().__iter__()
