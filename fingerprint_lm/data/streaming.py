"""Captioned images streamed from local COCO folders and tar shards, split across DDP ranks and
DataLoader workers so that every item of an epoch is read by exactly one (rank, worker).

Sources:

- ``CocoFolder``: a COCO-captions folder (``annotations/captions_{split}.json`` + ``{split}/``),
  parsed by ``coco.CocoCaptions``; its images (sorted by COCO id) are cut into chunks of
  ``chunk_size`` that play the role of shards. Key of an image: its file name without extension
  (``000000139.jpg`` -> ``"000000139"``), as in shards converted from COCO, so the key-hash
  held-out split is the same for a folder and for shards made from it.
- ``TarShards``: uncompressed ``.tar`` files (a glob, a path, or a list of them) holding one
  ``<key>.jpg|jpeg|png|webp|bmp`` and one ``<key>.txt`` (UTF-8 caption) per sample, the files of
  a sample adjacent (the webdataset layout). Other members (``.json``, ``.cls``, ...) are ignored.
  The extension is the text after the last dot of a member's name; the key is everything before
  it, folders inside the tar included.

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

import glob
import hashlib
import io
import tarfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fingerprint_lm.data.checks import check_int
from fingerprint_lm.data.coco import NO_LABEL, CocoCaptions, load_rgb, resize_center_crop, to_tensor
from fingerprint_lm.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTENSION = "txt"


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.jpg"`` -> ``("dir/000123", "jpg")``; a name without extension -> ``(name, "")``."""
    head, dot, extension = name.rpartition(".")
    if not dot or "/" in extension or not head or head.endswith("/"):
        return name, ""
    return head, extension.lower()


def key_hash(key: str) -> str:
    """A stable pseudo-random rank of ``key`` (same on every machine and Python version)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


@dataclass
class StreamUnit:
    """A run of samples read together: one tar shard or one chunk of a COCO folder.

    ``locators[i]`` says where sample ``keys[i]`` is: the byte offset of its first tar header,
    or its index in the folder's ``CocoCaptions``.
    """

    source: TarShards | CocoFolder
    name: str
    keys: list[str]
    locators: list[int]
    random_access: bool


class EncodedSample(NamedTuple):
    """A sample before decoding: what the shuffle buffer holds (a few KB, not a float tensor)."""

    key: str
    image: Path | bytes
    image_name: str
    caption: str


class TarShards:
    """Tar shards of ``<key>.<image extension>`` + ``<key>.txt`` pairs.

    Parameters:
        shards: a path, a glob pattern (``data/shards/*.tar``), or a list of them. Matches of a
            pattern are taken in sorted order; a pattern matching nothing is a ``DataError``.

    Shards are indexed on the first call to ``units()`` by reading their headers only (one seek
    per member), which also validates the pairing and detects truncated archives.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path]) -> None:
        patterns = [shards] if isinstance(shards, (str, Path)) else list(shards)
        if not patterns:
            raise ConfigError("no tar shards given (expected a path, a glob pattern or a list of them)")
        paths: list[Path] = []
        for pattern in patterns:
            pattern = str(Path(str(pattern)).expanduser())
            if any(char in pattern for char in "*?["):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise DataError(f"no tar shards match {pattern}")
                paths.extend(Path(match) for match in matches)
            elif Path(pattern).is_file():
                paths.append(Path(pattern))
            else:
                raise DataError(f"tar shard not found: {pattern}")
        self.paths = list(dict.fromkeys(paths))  # a shard named twice is read once
        self._units: list[StreamUnit] | None = None

    def units(self) -> list[StreamUnit]:
        """One unit per shard, in the order of ``paths`` (indexed once, then cached)."""
        if self._units is None:
            self._units = [self._index_shard(path) for path in self.paths]
        return self._units

    def _index_shard(self, path: Path) -> StreamUnit:
        keys: list[str] = []
        offsets: list[int] = []
        extensions: list[list[str]] = []
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = split_member_name(member.name)
                    if extension not in IMAGE_EXTENSIONS and extension != CAPTION_EXTENSION:
                        continue
                    if not keys or member_key != keys[-1]:
                        keys.append(member_key)
                        offsets.append(member.offset)
                        extensions.append([])
                    extensions[-1].append(extension)
                end = tar.offset
            # tarfile stops quietly at a missing or partial header; a complete archive ends with a
            # zero block, so its absence means the file was cut at a member boundary.
            with open(path, "rb") as handle:
                handle.seek(end)
                block = handle.read(tarfile.BLOCKSIZE)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(
                f"cannot read tar shard {path}: {exc} (truncated or not an uncompressed tar?)"
            ) from exc
        if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
            raise DataError(
                f"tar shard {path} is truncated: no end-of-archive marker after {len(keys)} samples"
            )
        if len(set(keys)) != len(keys):
            repeated = next(key for key, count in Counter(keys).items() if count > 1)
            raise DataError(
                f"tar shard {path}: the files of sample {repeated!r} are not adjacent "
                "(write each sample's image and caption one after the other)"
            )
        for key, found in zip(keys, extensions):
            images = [ext for ext in found if ext in IMAGE_EXTENSIONS]
            if not images:
                raise DataError(f"tar shard {path}: sample {key!r} has a caption but no image")
            if len(images) > 1:
                raise DataError(
                    f"tar shard {path}: sample {key!r} has {len(images)} images ({', '.join(images)})"
                )
            if CAPTION_EXTENSION not in found:
                raise DataError(f"tar shard {path}: sample {key!r} has no caption ({key}.txt)")
        return StreamUnit(self, str(path), keys, offsets, random_access=False)

    def read(self, unit: StreamUnit, positions: Sequence[int]) -> Iterator[EncodedSample]:
        """Stream the samples at ``positions`` (ascending) of ``unit`` from its first one's offset."""
        wanted = {unit.keys[p] for p in positions}
        remaining = len(wanted)
        path = unit.name
        try:
            with open(path, "rb") as handle:
                handle.seek(unit.locators[positions[0]])
                with tarfile.open(fileobj=handle, mode="r|") as tar:
                    key: str | None = None
                    files: dict[str, bytes] = {}
                    for member in tar:
                        if not member.isfile():
                            continue
                        member_key, extension = split_member_name(member.name)
                        if member_key != key:
                            if key in wanted:
                                yield self._encoded(path, key, files)
                                remaining -= 1
                                if not remaining:
                                    return
                            key, files = member_key, {}
                        if key in wanted and (
                            extension in IMAGE_EXTENSIONS or extension == CAPTION_EXTENSION
                        ):
                            files[extension] = tar.extractfile(member).read()
                    if key in wanted:
                        yield self._encoded(path, key, files)
                        remaining -= 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cannot read tar shard {path}: {exc}".splitlines()[0]) from exc
        if remaining:
            raise DataError(
                f"tar shard {path} lacks {remaining} indexed samples: it changed after it was indexed"
            )

    @staticmethod
    def _encoded(path: str, key: str, files: dict[str, bytes]) -> EncodedSample:
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
        if extension is None or CAPTION_EXTENSION not in files:
            raise DataError(
                f"tar shard {path}: sample {key!r} lost its image or caption since it was indexed"
            )
        try:
            caption = files[CAPTION_EXTENSION].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"tar shard {path}: caption {key}.txt is not UTF-8 text") from exc
        if not caption:
            raise DataError(f"tar shard {path}: caption {key}.txt is empty")
        return EncodedSample(key, files[extension], f"{path}:{key}.{extension}", caption)


class CocoFolder:
    """A local COCO-captions folder as a streaming source (parsed by ``CocoCaptions``).

    Parameters:
        root: folder holding ``annotations/`` and ``{split}/``.
        split: COCO split, e.g. ``"train2017"``.
        annotation_file: captions JSON instead of ``annotations/captions_{split}.json``.
        chunk_size: images per unit; units are shuffled like shards, images inside one are
            permuted, so this only sets how images of several sources interleave.

    Each image's caption is its first one, as in ``CocoCaptions``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        annotation_file: str | Path | None = None,
        chunk_size: int = 1000,
    ) -> None:
        check_int("COCO chunk size", chunk_size, 1)
        self.coco = CocoCaptions(root, split=split, annotation_file=annotation_file)
        self.chunk_size = chunk_size
        self._units: list[StreamUnit] | None = None

    def units(self) -> list[StreamUnit]:
        """Chunks of ``chunk_size`` images in COCO-id order."""
        if self._units is None:
            keys = [self.coco.image_path(index).stem for index in range(len(self.coco))]
            self._units = []
            for start in range(0, len(keys), self.chunk_size):
                stop = min(start + self.chunk_size, len(keys))
                name = f"{self.coco.image_dir} images {start}..{stop - 1}"
                self._units.append(
                    StreamUnit(self, name, keys[start:stop], list(range(start, stop)), random_access=True)
                )
        return self._units

    def read(self, unit: StreamUnit, positions: Sequence[int]) -> Iterator[EncodedSample]:
        for position in positions:
            index = unit.locators[position]
            path = self.coco.image_path(index)
            caption = self.coco.captions_for(self.coco.image_ids[index])[0]
            yield EncodedSample(unit.keys[position], path, str(path), caption)


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


def write_tiny_shards(
    directory: str | Path, n: int = 12, shard_size: int = 5, resolution: int = 24
) -> list[Path]:
    """Write ``n`` captioned samples into tar shards of ``shard_size`` under ``directory``.

    Shards are ``shard-000000.tar``, ...; sample ``i`` has key ``sample-{i:06d}``, a procedural
    image (JPEG or PNG, alternately landscape, portrait and square, about ``resolution`` pixels),
    its caption as ``.txt`` and a ``.json`` member that readers must ignore. Returns the shard
    paths in order.
    """
    import json

    from fingerprint_lm.data.synthetic import ProceduralImages

    if n < 1 or shard_size < 1 or resolution < 1:
        raise ValueError(
            f"n, shard_size and resolution must be positive, got {n}, {shard_size}, {resolution}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = ProceduralImages(resolution=resolution * 3 // 2, seed=424242, length=n)
    sizes = [(resolution * 3 // 2, resolution), (resolution, resolution * 3 // 2), (resolution, resolution)]
    paths = []
    for shard_index, first in enumerate(range(0, n, shard_size)):
        path = directory / f"shard-{shard_index:06d}.tar"
        with tarfile.open(path, mode="w") as tar:
            for index in range(first, min(first + shard_size, n)):
                sample = source.sample(index)
                array = ((sample["image"].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
                width, height = sizes[index % len(sizes)]
                image = Image.fromarray(np.ascontiguousarray(array[:height, :width]), "RGB")
                encoded = io.BytesIO()
                suffix = "jpg" if index % 2 == 0 else "png"
                image.save(encoded, format="JPEG" if suffix == "jpg" else "PNG")
                key = f"sample-{index:06d}"
                meta = json.dumps({"key": key, "width": width, "height": height}).encode()
                for name, payload in (
                    (f"{key}.{suffix}", encoded.getvalue()),
                    (f"{key}.txt", sample["caption"].encode("utf-8")),
                    (f"{key}.json", meta),
                ):
                    member = tarfile.TarInfo(name)
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
        paths.append(path)
    return paths
