"""Where streamed captioned images come from: local COCO folders and tar shards, indexed into units
(shards or COCO chunks) that :class:`~fingerprint_lm.data.streaming.StreamingCaptions` splits
across DDP ranks and DataLoader workers.

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
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from fingerprint_lm.data.coco import CocoCaptions
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, DataError, check_int
from fingerprint_lm.pixels import to_uint8

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


def write_tiny_shards(
    directory: str | Path, n: int = 12, shard_size: int = 5, resolution: int = 24
) -> list[Path]:
    """Write ``n`` captioned samples into tar shards of ``shard_size`` under ``directory``.

    Shards are ``shard-000000.tar``, ...; sample ``i`` has key ``sample-{i:06d}``, a procedural
    image (JPEG or PNG, alternately landscape, portrait and square, about ``resolution`` pixels),
    its caption as ``.txt`` and a ``.json`` member that readers must ignore. Returns the shard
    paths in order.
    """
    for name, value in (("n", n), ("shard_size", shard_size), ("resolution", resolution)):
        check_int(name, value)
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
                array = to_uint8(sample["image"])
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
