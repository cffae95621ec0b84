"""Streaming data: COCO folders and tar shards split across (rank, worker), epochs, bad shards."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fingerprint_lm.data.coco import write_tiny_coco
from fingerprint_lm.data.datamodule import ImageDataModule, split_keys_by_hash
from fingerprint_lm.data.sources import CocoFolder, TarShards, split_member_name, write_tiny_shards
from fingerprint_lm.data.streaming import EpochStreamLoader, StreamingCaptions
from fingerprint_lm.errors import ConfigError, DataError
from tests.conftest import compose_config


class _KeysWithWorker(IterableDataset):
    """Yields (worker id, sample key): shows which worker read what, through a real DataLoader."""

    def __init__(self, inner: StreamingCaptions) -> None:
        self.inner = inner

    def __iter__(self):
        worker = get_worker_info().id
        for sample in self.inner:
            yield worker, sample["key"]


def _png(width: int, height: int, color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    # 13 samples in shards of 4, 4, 4, 1: uneven shards and an odd total.
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), n=13, shard_size=4, resolution=20)


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"), n_images=7, resolution=20)


def _sources(kind, tiny_shards, tiny_coco):
    if kind == "shards":
        return [TarShards(str(tiny_shards[0].parent / "*.tar"))]
    if kind == "coco":
        return [CocoFolder(tiny_coco, split="val2017", chunk_size=3)]
    return [CocoFolder(tiny_coco, split="val2017", chunk_size=3), TarShards(tiny_shards)]


# --- (a) every item read by exactly one (rank, worker) --------------------------------------


@pytest.mark.parametrize("kind", ["shards", "coco", "both"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_cover_every_key_once(kind, shuffle, tiny_shards, tiny_coco):
    sources = _sources(kind, tiny_shards, tiny_coco)
    all_keys = StreamingCaptions(sources, resolution=16, shuffle=False).keys()
    readers: dict[tuple[int, int], list[str]] = {}
    for rank in range(2):
        dataset = StreamingCaptions(
            sources, resolution=16, seed=3, shuffle=shuffle, shuffle_buffer=3, rank=rank, world_size=2
        )
        dataset.set_epoch(5)
        for worker, key in DataLoader(_KeysWithWorker(dataset), batch_size=None, num_workers=2):
            readers.setdefault((rank, worker), []).append(key)
    assert set(readers) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # every reader got a share
    read = [key for keys in readers.values() for key in keys]
    assert len(read) == len(set(read)), "a key was read twice"
    assert sorted(read) == sorted(all_keys), "a key was never read"
    counts = [len(readers[0, 0]) + len(readers[0, 1]), len(readers[1, 0]) + len(readers[1, 1])]
    assert abs(counts[0] - counts[1]) <= 1


def test_even_split_gives_equal_batches_and_drops_fewer_than_world_size(tiny_shards):
    sources = [TarShards(tiny_shards)]  # 13 samples
    dropped = []
    for epoch in (0, 1, 2):
        per_rank, batches = [], []
        for rank in range(2):
            dataset = StreamingCaptions(sources, resolution=16, even_split=True, rank=rank, world_size=2)
            dataset.set_epoch(epoch)
            loaded = list(DataLoader(dataset, batch_size=4, num_workers=2))
            batches.append(len(loaded))
            per_rank.append([key for batch in loaded for key in batch["key"]])
        assert [len(keys) for keys in per_rank] == [6, 6] == dataset.items_per_rank()
        assert batches[0] == batches[1]
        read = per_rank[0] + per_rank[1]
        assert len(set(read)) == 12
        dropped.append(set(dataset.keys()) - set(read))
    assert all(len(d) == 1 for d in dropped)
    assert len(set().union(*dropped)) > 1, "the dropped sample should change with the epoch's shuffle"


def test_rank_recorded_by_set_epoch_reaches_spawned_workers(tiny_shards, monkeypatch):
    """Workers started with spawn have no process group: the rank must travel in shared memory."""
    expected = StreamingCaptions([TarShards(tiny_shards)], resolution=16, shuffle=False, rank=1, world_size=2)
    dataset = StreamingCaptions([TarShards(tiny_shards)], resolution=16, shuffle=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    loader = EpochStreamLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    keys = [sample["key"] for sample in loader]
    assert keys == [sample["key"] for sample in expected]
    assert keys == [f"sample-{i:06d}" for i in range(6, 13)]  # the second half of 13


# --- (b) resize + centre crop -------------------------------------------------------------


def test_resize_center_crop_of_non_square_images(tmp_path, tiny_shards):
    # 48x16 landscape in thirds red | green | blue and 16x48 portrait in thirds: the centre crop of
    # either (shorter side already 16 -> 16x16) is the green third only.
    thirds = np.zeros((16, 48, 3), dtype=np.uint8)
    thirds[:, :16] = (255, 0, 0)
    thirds[:, 16:32] = (0, 255, 0)
    thirds[:, 32:] = (0, 0, 255)
    members = []
    for key, array in (("wide", thirds), ("tall", thirds.transpose(1, 0, 2))):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
        members += [(f"{key}.png", buffer.getvalue()), (f"{key}.txt", f"a {key} image".encode())]
    shard = _write_tar(tmp_path / "thirds.tar", members)
    for resolution in (16, 8):
        samples = list(StreamingCaptions([TarShards(shard)], resolution=resolution, shuffle=False))
        assert [s["key"] for s in samples] == ["wide", "tall"]
        for sample in samples:
            image = sample["image"]
            assert image.shape == (3, resolution, resolution)
            # Green channel at +1, red and blue at -1; downscaling blends the outermost pixels.
            inner = image if resolution == 16 else image[:, 1:-1, 1:-1]
            assert inner[1].min() > 0.9 and inner[0].max() < -0.9 and inner[2].max() < -0.9
            assert image[1].mean() > 0.9
    # The tiny shards mix landscape, portrait and square JPEG/PNG images.
    for sample in StreamingCaptions([TarShards(tiny_shards)], resolution=12):
        assert sample["image"].shape == (3, 12, 12)
        assert sample["image"].dtype == torch.float32
        assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0
        assert sample["caption"] and (sample["shape"], sample["texture"], sample["color"]) == (-1, -1, -1)


# --- (c) epochs ---------------------------------------------------------------------------


def test_set_epoch_changes_order_not_set(tiny_shards, tiny_coco):
    dataset = StreamingCaptions(_sources("both", tiny_shards, tiny_coco), resolution=8, shuffle_buffer=4)

    def keys_of(epoch):
        dataset.set_epoch(epoch)
        return [sample["key"] for sample in dataset]

    first, again, second = keys_of(0), keys_of(0), keys_of(1)
    assert first == again  # an epoch's order is reproducible
    assert first != second
    assert sorted(first) == sorted(second) == sorted(dataset.keys())


def test_epoch_loader_reaches_persistent_workers(tiny_shards):
    dataset = StreamingCaptions([TarShards(tiny_shards)], resolution=8, shuffle_buffer=4)
    loader = EpochStreamLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    passes = [[sample["key"] for sample in loader] for _ in range(2)]
    assert loader.passes == 2 and dataset.epoch == 1
    assert passes[0] != passes[1] and sorted(passes[0]) == sorted(passes[1])
    # Pass 2 of the persistent workers is epoch 1, exactly as fresh workers would read it.
    fresh = StreamingCaptions([TarShards(tiny_shards)], resolution=8, shuffle_buffer=4)
    fresh.set_epoch(1)
    assert passes[1] == [sample["key"] for sample in DataLoader(fresh, batch_size=None, num_workers=2)]
    # An epoch function (the trainer's epoch) takes precedence over the pass count.
    pinned = EpochStreamLoader(fresh, batch_size=None, epoch_fn=lambda: 7)
    list(pinned)
    assert fresh.epoch == 7


# --- (d) bad shards -----------------------------------------------------------------------


def test_truncated_tar_is_one_line_data_error(tmp_path, tiny_shards):
    data = tiny_shards[0].read_bytes()
    cut_mid_member = _write_bytes(tmp_path / "mid.tar", data[: len(data) // 2])
    # Cut exactly after the last member: tarfile alone reads this as a complete (shorter) archive.
    with tarfile.open(tiny_shards[0]) as tar:
        end = tar.getmembers()[-1].offset_data + 512 * ((tar.getmembers()[-1].size + 511) // 512)
    cut_at_boundary = _write_bytes(tmp_path / "boundary.tar", data[:end])
    for shard in (cut_mid_member, cut_at_boundary):
        with pytest.raises(DataError, match=shard.name) as info:
            StreamingCaptions([TarShards(shard)])
        assert "\n" not in str(info.value) and "truncated" in str(info.value)


def test_tar_truncated_after_indexing_fails_while_streaming(tmp_path, tiny_shards):
    shard = _write_bytes(tmp_path / "later.tar", tiny_shards[0].read_bytes())
    dataset = StreamingCaptions([TarShards(shard)], shuffle=False)
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(DataError, match="later.tar") as info:
        list(dataset)
    assert "\n" not in str(info.value)


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "members, match",
    [
        ([("a.png", _png(8, 8))], "'a' has no caption"),
        ([("a.txt", b"a caption")], "'a' has a caption but no image"),
        ([("a.png", _png(8, 8)), ("b.png", _png(8, 8)), ("b.txt", b"x"), ("a.txt", b"y")], "not adjacent"),
        ([("a.png", _png(8, 8)), ("a.jpg", _png(8, 8)), ("a.txt", b"y")], "2 images"),
    ],
)
def test_bad_pairs_fail_at_index_time(tmp_path, members, match):
    shard = _write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(DataError, match=match):
        StreamingCaptions([TarShards(shard)])


@pytest.mark.parametrize(
    "members, match",
    [
        ([("a.png", b"not a png at all"), ("a.txt", b"caption")], r"bad\.tar:a\.png"),
        ([("a.png", _png(8, 8)), ("a.txt", b"   ")], "a.txt is empty"),
        ([("a.png", _png(8, 8)), ("a.txt", b"\xff\xfe\xfa")], "not UTF-8"),
    ],
)
def test_bad_content_fails_when_read(tmp_path, members, match):
    dataset = StreamingCaptions([TarShards(_write_tar(tmp_path / "bad.tar", members))], resolution=8)
    with pytest.raises(DataError, match=match):
        list(dataset)


def test_source_errors(tmp_path, tiny_shards, tiny_coco):
    with pytest.raises(DataError, match="no tar shards match"):
        TarShards(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match="not found"):
        TarShards(tmp_path / "missing.tar")
    with pytest.raises(DataError, match="cannot read tar shard"):
        StreamingCaptions([TarShards(_write_bytes(tmp_path / "junk.tar", b"junk" * 300))])
    with pytest.raises(DataError, match="occurs twice"):
        StreamingCaptions([TarShards(tiny_shards), TarShards(tiny_shards[1])])
    with pytest.raises(DataError, match="COCO folder not found"):
        CocoFolder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="rank 2"):
        StreamingCaptions([TarShards(tiny_shards)], rank=2, world_size=2)
    with pytest.raises(ConfigError, match="shuffle buffer"):
        StreamingCaptions([TarShards(tiny_shards)], shuffle_buffer=-1)


def test_member_names_and_ignored_members(tiny_shards):
    assert split_member_name("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_member_name("a.b.PNG") == ("a.b", "png")
    assert split_member_name("noext") == ("noext", "")
    assert split_member_name("dir.v2/noext") == ("dir.v2/noext", "")
    with tarfile.open(tiny_shards[0]) as tar:
        assert any(name.endswith(".json") for name in tar.getnames())  # present, and ignored:
    assert len(StreamingCaptions([TarShards(tiny_shards)]).keys()) == 13


# --- (e) datamodule and Hydra config ------------------------------------------------------


def test_hash_split_is_fixed_and_disjoint():
    keys = [f"k{i}" for i in range(50)]
    train, val, test = split_keys_by_hash(keys, 5, 7)
    assert (len(train), len(val), len(test)) == (38, 5, 7)
    assert train | val | test == set(keys) and not (train & val or train & test or val & test)
    # Independent of key order, and a held-out key stays held out when more keys arrive.
    assert split_keys_by_hash(list(reversed(keys)), 5, 7) == (train, val, test)
    _, val_more, _ = split_keys_by_hash(keys + [f"new{i}" for i in range(5)], 5, 7)
    assert len(val_more & val) >= 1


def test_hydra_shards_config_builds_datamodule(tmp_path):
    keys = {f"sample-{i:06d}" for i in range(60)}
    write_tiny_shards(tmp_path / "data" / "shards", n=60, shard_size=10, resolution=20)
    cfg = compose_config(tmp_path, ["data=shards", "data.num_workers=2"])
    assert cfg.data.shards == str(tmp_path / "data" / "shards" / "*.tar")
    module = instantiate(cfg.data)
    assert isinstance(module, ImageDataModule) and module.source == "shards"
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (cfg.data.batch_size, 3, 16, 16) == (16, 3, 16, 16)
    assert len(batch["caption"]) == 16 and all(isinstance(c, str) and c for c in batch["caption"])
    # 60 keys cannot hold out 32 + 64: each held-out set shrinks to 60 // 5.
    val = [k for b in module.val_dataloader() for k in b["key"]]
    test = [k for b in module.test_dataloader() for k in b["key"]]
    train = [k for b in module.train_dataloader() for k in b["key"]]
    assert (len(val), len(test), len(train)) == (12, 12, 36)
    assert Counter(val + test + train) == Counter(keys)
    assert val == [k for b in module.val_dataloader() for k in b["key"]]  # fixed order


def test_datamodule_coco_stream_matches_shard_split(tmp_path, tiny_coco):
    cfg = compose_config(
        tmp_path,
        ["data=coco_stream", f"data.coco_root={tiny_coco}", "data.coco_split=val2017", "data.num_workers=0"],
    )
    module = instantiate(cfg.data)
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16)
    module.setup()
    val_keys = module.val_set.keys()
    coco_keys = [p.stem for p in sorted((tiny_coco / "val2017").iterdir())]
    assert val_keys == sorted(split_keys_by_hash(coco_keys, 32, 64)[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "shards"}, "needs shards"),
        ({"source": "coco_stream"}, "coco_root"),
        ({"shuffle_buffer": -1}, "buffer"),
    ],
)
def test_datamodule_streaming_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageDataModule(**kwargs)


def test_datamodule_missing_shards_fail_at_setup(tmp_path):
    module = ImageDataModule(source="shards", shards=str(tmp_path / "none" / "*.tar"))
    with pytest.raises(DataError, match="no tar shards match"):
        module.setup("fit")
