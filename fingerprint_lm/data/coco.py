"""COCO captions read from a local folder, behind the same sample interface as the procedural set.

Layout (as distributed by cocodataset.org)::

    root/annotations/captions_{split}.json
    root/{split}/<file_name>

Nothing here downloads; ``write_tiny_coco`` writes a small folder in this layout for tests.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fingerprint_lm.data.synthetic import SHAPES, ProceduralImages
from fingerprint_lm.errors import DataError, check_int
from fingerprint_lm.pixels import from_uint8, to_uint8

# Labels exist only for procedural images; -1 marks "unknown" so batches keep one schema.
NO_LABEL = -1


def load_rgb(path: Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open any image file as 8-bit RGB; transparency is composited over white.

    ``path`` may also be an open binary file (e.g. a member streamed out of a tar shard); then
    ``name`` says what to call it in error messages. Raises ``DataError`` naming the file when it
    is missing, truncated or not an image.
    """
    name = str(path) if name is None else name
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so a truncated file fails here rather than later
            image = opened
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale (e.g. PNG): scale to 8 bits instead of clipping at 255.
                values = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
                image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8), "L")
            if image.mode == "P" or image.mode == "LA" or "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode == "RGBA":
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image)
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image file missing: {name}") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {name}: {exc}".splitlines()[0]) from exc


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution`` and crop the centre square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> FloatTensor[3, H, W] in [-1, 1] (:func:`fingerprint_lm.pixels.from_uint8`)."""
    return from_uint8(np.asarray(image))


class CocoCaptions(Dataset):
    """One sample per captioned image of a local COCO-captions folder.

    Parameters:
        root: folder holding ``annotations/`` and the image folder ``{split}/``.
        split: COCO split name, e.g. ``"val2017"`` or ``"train2017"``.
        resolution: side of the square output images (shorter side resized, centre cropped).
        annotation_file: captions JSON to use instead of ``annotations/captions_{split}.json``;
            a relative path is looked up under ``root`` first, then the working directory.

    Samples are ``{"image": FloatTensor[3, R, R] in [-1, 1], "caption": str, "shape": -1,
    "texture": -1, "color": -1}``; the caption is the image's first one (``captions_for``
    returns them all). Images are ordered by COCO id, so indices are stable across runs.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val2017",
        resolution: int = 32,
        annotation_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        check_int("image resolution", resolution)
        self.root = Path(root).expanduser()
        self.split = split
        self.resolution = resolution
        if not self.root.is_dir():
            raise DataError(f"COCO folder not found: {self.root}")
        self.image_dir = self.root / split
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder not found: {self.image_dir}")
        self.annotation_file = self._find_annotation_file(annotation_file)
        self._file_names, self._captions = self._read_annotations(self.annotation_file)
        # Only captioned images: a caption-less sample would silently train the text path on "".
        self.image_ids = sorted(i for i in self._file_names if self._captions.get(i))
        if not self.image_ids:
            raise DataError(f"no captioned images listed in {self.annotation_file}")

    def _find_annotation_file(self, annotation_file: str | Path | None) -> Path:
        if annotation_file is None:
            path = self.root / "annotations" / f"captions_{self.split}.json"
        else:
            path = Path(annotation_file).expanduser()
            if not path.is_absolute() and (self.root / path).is_file():
                path = self.root / path
        if not path.is_file():
            raise DataError(f"COCO annotation file not found: {path}")
        return path

    @staticmethod
    def _read_annotations(path: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            file_names = {int(entry["id"]): str(entry["file_name"]) for entry in data["images"]}
            captions: dict[int, list[str]] = defaultdict(list)
            # COCO lists captions in annotation-id order; keep it so "first caption" is stable.
            for entry in sorted(data.get("annotations", []), key=lambda a: a.get("id", 0)):
                captions[int(entry["image_id"])].append(str(entry["caption"]).strip())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read COCO annotation file {path}: {exc}".splitlines()[0]) from exc
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed COCO annotation file {path}: bad or missing field {exc}") from exc
        return file_names, dict(captions)

    def __len__(self) -> int:
        return len(self.image_ids)

    def captions_for(self, image_id: int) -> list[str]:
        """All captions of the image with COCO id ``image_id``."""
        if image_id not in self._file_names:
            raise KeyError(f"no image with id {image_id} in {self.annotation_file}")
        return list(self._captions.get(image_id, []))

    def image_path(self, index: int) -> Path:
        """Path of the image file behind sample ``index``."""
        return self.image_dir / self._file_names[self.image_ids[index]]

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        image = resize_center_crop(load_rgb(self.image_path(index)), self.resolution)
        return {
            "image": to_tensor(image),
            "caption": self._captions[image_id][0],
            "shape": NO_LABEL,
            "texture": NO_LABEL,
            "color": NO_LABEL,
        }


def write_tiny_coco(
    root: str | Path, n_images: int = 6, resolution: int = 40, split: str = "val2017"
) -> Path:
    """Write a small valid COCO-captions folder under ``root`` and return ``root``.

    Images are procedural (so captions describe them), about ``resolution`` pixels on a side,
    some non-square, in a rotating mix of formats: RGB JPEG, greyscale PNG, RGBA PNG, CMYK
    JPEG, palette PNG, RGB PNG. Each image has two captions.

    Parameters:
        root: folder to write into (created if needed).
        n_images: number of images (at least 1).
        resolution: nominal image side in pixels.
        split: split name used for the image folder and the annotation file.
    """
    check_int("n_images", n_images)
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    # (PIL mode, file suffix); every mode here needs a different conversion path in load_rgb.
    formats = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("P", "png"), ("RGB", "png")]
    # Alternate landscape / portrait / square so the reader's resize + crop is exercised.
    aspect_sizes = [(resolution * 3 // 2, resolution), (resolution, resolution * 3 // 2), (resolution, resolution)]
    source = ProceduralImages(resolution=resolution * 3 // 2, seed=12345, length=n_images)

    images, annotations = [], []
    for index in range(n_images):
        sample = source.sample(index)
        array = to_uint8(sample["image"])
        width, height = aspect_sizes[index % len(aspect_sizes)]
        image = Image.fromarray(np.ascontiguousarray(array[:height, :width]), "RGB")
        mode, suffix = formats[index % len(formats)]
        if mode == "RGBA":
            alpha = Image.linear_gradient("L").resize(image.size)
            image = image.convert("RGBA")
            image.putalpha(alpha)
        elif mode == "P":
            image = image.quantize(colors=16)
        elif mode != "RGB":
            image = image.convert(mode)
        image_id = 1000 + index * 7  # sparse ids, as in real COCO
        file_name = f"{image_id:012d}.{suffix}"
        image.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        shape_name = SHAPES[sample["shape"]]
        for caption in (sample["caption"], f"a picture of a {shape_name}"):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})

    payload = {
        "info": {"description": "tiny COCO-format captions written by fingerprint_lm for tests"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(payload, indent=1))
    return root
