"""Data: procedural stream, COCO-format reader, datamodule."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from fingerprint_lm.data.coco import CocoCaptions, write_tiny_coco
from fingerprint_lm.data.datamodule import ImageDataModule, check_resolution, split_indices
from fingerprint_lm.data.synthetic import COLORS, SHAPES, TEXTURES, ProceduralImages, make_caption
from fingerprint_lm.errors import ConfigError, DataError


def _fingerprint(sample: dict) -> tuple[str, str]:
    """Identity of one sample: caption plus a hash of the exact pixel values."""
    return sample["caption"], hashlib.sha1(sample["image"].numpy().tobytes()).hexdigest()


# --- procedural images -------------------------------------------------------------------


def test_same_seed_same_samples_other_seed_other_samples():
    first = list(ProceduralImages(resolution=32, seed=7, length=6))
    again = list(ProceduralImages(resolution=32, seed=7, length=6))
    other = list(ProceduralImages(resolution=32, seed=8, length=6))
    assert [_fingerprint(s) for s in first] == [_fingerprint(s) for s in again]
    assert not {_fingerprint(s) for s in first} & {_fingerprint(s) for s in other}
    # Within one stream, samples differ from each other.
    assert len({_fingerprint(s) for s in first}) == 6


@pytest.mark.parametrize("resolution", [32, 64])
def test_sample_shape_dtype_range_and_labels(resolution):
    samples = list(ProceduralImages(resolution=resolution, seed=1, length=40))
    assert len(samples) == 40
    for sample in samples:
        image = sample["image"]
        assert image.shape == (3, resolution, resolution)
        assert image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert 0 <= sample["shape"] < len(SHAPES)
        assert 0 <= sample["texture"] < len(TEXTURES)
        assert 0 <= sample["color"] < len(COLORS)
    # Images use the range: not all mid-grey, not all saturated.
    stacked = torch.stack([s["image"] for s in samples])
    assert stacked.min() < -0.5 and stacked.max() > 0.5
    assert stacked.std() > 0.2


def test_caption_names_shape_color_and_labels_vary():
    samples = list(ProceduralImages(resolution=32, seed=2, length=300))
    for sample in samples:
        caption = sample["caption"]
        assert SHAPES[sample["shape"]] in caption.split()
        assert COLORS[sample["color"]] in caption.split()
    # Every class of every label occurs: the labels can train a classifier.
    assert {s["shape"] for s in samples} == set(range(len(SHAPES)))
    assert {s["texture"] for s in samples} == set(range(len(TEXTURES)))
    assert {s["color"] for s in samples} == set(range(len(COLORS)))


def test_make_caption_wording_and_validation():
    caption = make_caption("circle", "stripes", "red", "blue", "white", size="large")
    assert caption == "a large red circle with stripes on a blue and white gradient background"
    assert make_caption("square", "plain", "orange", "gray") == "an orange square on a gray background"
    with pytest.raises(ValueError, match="hexagon"):
        make_caption("hexagon", "plain", "red", "blue")
    with pytest.raises(ValueError, match="teal"):
        make_caption("circle", "plain", "red", "blue", background_to="teal")


def test_content_scales_with_resolution():
    """Sample i is the same picture at every resolution: 64 px average-pooled matches 32 px."""
    low = ProceduralImages(resolution=32, seed=3, length=20)
    high = ProceduralImages(resolution=64, seed=3, length=20)
    for index in range(20):
        a, b = low.sample(index), high.sample(index)
        assert a["caption"] == b["caption"]
        pooled = F.avg_pool2d(b["image"][None], 2)[0]
        assert (pooled - a["image"]).abs().mean() < 0.05


def test_worker_split_gives_the_same_finite_set():
    dataset = ProceduralImages(resolution=16, seed=5, length=11)  # odd: workers get uneven shares
    single = [_fingerprint(s) for s in DataLoader(dataset, batch_size=None, num_workers=0)]
    double = [_fingerprint(s) for s in DataLoader(dataset, batch_size=None, num_workers=2)]
    assert len(single) == 11 and len(set(single)) == 11
    assert len(double) == 11  # no duplicates, no gaps
    assert sorted(single) == sorted(double)
    assert single == [_fingerprint(dataset.sample(i)) for i in range(11)]


def test_infinite_stream_matches_indexed_samples():
    dataset = ProceduralImages(resolution=16, seed=9)
    stream = iter(dataset)
    taken = [next(stream) for _ in range(25)]
    assert [_fingerprint(s) for s in taken] == [_fingerprint(dataset.sample(i)) for i in range(25)]


@pytest.mark.parametrize("kwargs", [{"resolution": 0}, {"resolution": True}, {"seed": -1}, {"length": -2}])
def test_procedural_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        ProceduralImages(**kwargs)


def test_sample_index_out_of_range():
    with pytest.raises(IndexError):
        ProceduralImages(resolution=16, length=3).sample(3)


# --- COCO reader ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"), n_images=6, resolution=40)


@pytest.mark.parametrize("resolution", [32, 64])
def test_coco_reader_samples(tiny_coco, resolution):
    dataset = CocoCaptions(tiny_coco, split="val2017", resolution=resolution)
    assert len(dataset) == 6
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["image"].shape == (3, resolution, resolution)
        assert sample["image"].dtype == torch.float32
        assert sample["image"].min() >= -1.0 and sample["image"].max() <= 1.0
        assert (sample["shape"], sample["texture"], sample["color"]) == (-1, -1, -1)
        captions = dataset.captions_for(dataset.image_ids[index])
        assert len(captions) == 2
        assert sample["caption"] == captions[0]
        assert sample["caption"] != ""


def test_coco_reader_handles_grayscale_and_rgba(tiny_coco):
    dataset = CocoCaptions(tiny_coco, resolution=32)
    modes = {}
    for index in range(len(dataset)):
        with Image.open(dataset.image_path(index)) as image:
            modes[image.mode] = index
    assert {"L", "RGBA", "CMYK", "P"} <= set(modes)

    gray = dataset[modes["L"]]["image"]
    assert gray.shape == (3, 32, 32)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert gray.std() > 0.05  # content survived, not a flat fill

    # The RGBA file fades from transparent (top) to opaque (bottom): composited over white.
    rgba = dataset[modes["RGBA"]]["image"]
    assert rgba.shape == (3, 32, 32)
    assert rgba[:, 0].min() > 0.8
    assert (rgba[:, -1] - 1.0).abs().max() > 0.2


def test_coco_annotation_file_override(tiny_coco, tmp_path):
    data = json.loads((tiny_coco / "annotations" / "captions_val2017.json").read_text())
    data["images"] = data["images"][:2]
    override = tmp_path / "two.json"
    override.write_text(json.dumps(data))
    assert len(CocoCaptions(tiny_coco, resolution=16, annotation_file=str(override))) == 2


def test_coco_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        CocoCaptions(missing)


def test_coco_missing_annotation_file(tmp_path):
    root = write_tiny_coco(tmp_path, n_images=2, resolution=16)
    (root / "annotations" / "captions_val2017.json").unlink()
    with pytest.raises(DataError, match="captions_val2017.json"):
        CocoCaptions(root)


def test_coco_no_images(tmp_path):
    root = write_tiny_coco(tmp_path, n_images=2, resolution=16)
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="no captioned images"):
        CocoCaptions(root)


def test_coco_malformed_annotation_file(tmp_path):
    root = write_tiny_coco(tmp_path, n_images=2, resolution=16)
    (root / "annotations" / "captions_val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="captions_val2017.json"):
        CocoCaptions(root)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_coco_corrupt_image_names_the_file(tmp_path, damage):
    root = write_tiny_coco(tmp_path, n_images=1, resolution=48)  # image 0 is a JPEG
    dataset = CocoCaptions(root, resolution=16)
    path = dataset.image_path(0)
    if damage == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    with pytest.raises(DataError, match=path.name) as info:
        dataset[0]
    assert "\n" not in str(info.value)


# --- datamodule ----------------------------------------------------------------------------


def test_datamodule_synthetic_batches():
    module = ImageDataModule(resolution=32, batch_size=4, val_size=10, test_size=6, seed=0)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert all(isinstance(c, str) for c in batch["caption"])
    assert batch["shape"].shape == (4,) and batch["shape"].dtype == torch.int64

    val_batches = list(module.val_dataloader())
    assert [b["image"].shape[0] for b in val_batches] == [4, 4, 2]
    again = list(module.val_dataloader())
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(val_batches, again))
    test_images = torch.cat([b["image"] for b in module.test_dataloader()])
    assert test_images.shape[0] == 6
    # Held-out sets are not the training stream's first images.
    assert not torch.equal(val_batches[0]["image"], batch["image"])
    assert not torch.equal(test_images[:4], batch["image"])


def test_datamodule_seed_changes_training_stream():
    a = next(iter(ImageDataModule(resolution=16, batch_size=2, seed=0).train_dataloader()))
    b = next(iter(ImageDataModule(resolution=16, batch_size=2, seed=1).train_dataloader()))
    assert not torch.equal(a["image"], b["image"])


def test_datamodule_coco_split_and_batches(tiny_coco):
    module = ImageDataModule(source="coco", coco_root=str(tiny_coco), resolution=32, batch_size=2)
    module.setup("fit")
    sizes = (len(module.train_set), len(module.val_set), len(module.test_set))
    assert sizes == (4, 1, 1)
    indices = module.train_set.indices + module.val_set.indices + module.test_set.indices
    assert sorted(indices) == list(range(6))
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert len(batch["caption"]) == 2
    assert batch["shape"].tolist() == [-1, -1]
    # The split is fixed: another module (another seed) holds out the same images.
    other = ImageDataModule(source="coco", coco_root=str(tiny_coco), resolution=32, seed=5)
    other.setup()
    assert other.val_set.indices == module.val_set.indices


def test_split_indices_respects_requested_sizes():
    train, val, test = split_indices(100, 10, 20, seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == list(range(100))
    with pytest.raises(DataError):
        split_indices(2, 1, 1, seed=0)


def test_datamodule_coco_missing_folder_fails_at_setup(tmp_path):
    module = ImageDataModule(source="coco", coco_root=str(tmp_path / "absent"))
    with pytest.raises(DataError, match="absent"):
        module.setup("fit")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "imagenet"}, "imagenet"),
        ({"source": "coco"}, "coco_root"),
        ({"resolution": 0}, "resolution"),
        ({"resolution": -32}, "resolution"),
        ({"resolution": 32.0}, "resolution"),
        ({"resolution": True}, "resolution"),
        ({"batch_size": 0}, "batch size"),
        ({"num_workers": -1}, "workers"),
    ],
)
def test_datamodule_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ImageDataModule(**kwargs)


def test_check_resolution():
    check_resolution(32, 4)
    check_resolution(512, 8)
    with pytest.raises(ConfigError, match="image size 30 is not divisible by the VAE's downscale factor 4"):
        check_resolution(30, 4)
    with pytest.raises(ConfigError, match="28 or 32"):
        check_resolution(30, 4)
    with pytest.raises(ConfigError):
        check_resolution(0, 4)
