"""A corpus of bad and unusual image files walked through task=attribute and task=trace.

Unusual but valid files (16-bit, CMYK, animated) are read; bad ones (corrupt, empty, 1x1, a
decompression bomb's header) are refused: named alone, with one error line and nothing written;
inside a folder, listed in the JSON's ``skipped`` with the reason while the rest are attributed;
a folder of nothing but bad files is an error.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fingerprint_lm.errors import DataError
from tests.conftest import registry_state, task


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (Pillow refuses it before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def write_corpus(folder: Path, good: Path) -> dict[str, str]:
    """Bad files -> the words their refusal must contain; unusual files are made readable."""
    folder.mkdir()
    bob = Image.open(good)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(folder / "one_pixel.png")
    _png_header_only(folder / "bomb.png", 20000, 20000)
    (folder / "truncated.png").write_bytes(good.read_bytes()[:60])
    wide = (np.asarray(bob.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(folder / "u_sixteen_bit.png")
    bob.convert("CMYK").save(folder / "u_cmyk.jpg", quality=95)
    bob.save(folder / "u_animated.gif", save_all=True, append_images=[bob.rotate(90)], duration=100)
    bob.save(folder / "v_bob.png")
    return {"corrupt.png": "cannot read image", "empty.png": "cannot read image",
            "one_pixel.png": "1x1: smaller than the extractor reads", "bomb.png": "decompression bomb",
            "truncated.png": "cannot read image"}


def test_folder_attribution_skips_bad_files_and_reads_the_rest(issued, checkpoint, tmp_path):
    corpus = tmp_path / "corpus"
    refusals = write_corpus(corpus, issued / "bob_images" / "img_0000.png")
    for name in ("attribute", "trace"):
        result = task(issued, checkpoint, name, f"images={corpus}")
        skipped = {Path(row["image"]).name: row["reason"] for row in result["skipped"]}
        assert skipped.keys() == refusals.keys()
        for file, words in refusals.items():
            assert words in skipped[file], (file, skipped[file])
        assert json.loads((issued / "run" / f"{name}.json").read_text())["skipped"] == result["skipped"]
    attributed = task(issued, checkpoint, "attribute", f"images={corpus}")
    read = {Path(row["image"]).name: row for row in attributed["images"]}
    assert set(read) == {"u_sixteen_bit.png", "u_cmyk.jpg", "u_animated.gif", "v_bob.png"}
    assert read["v_bob.png"]["user_id"] == "bob" and read["u_animated.gif"]["user_id"] == "bob"


def test_each_bad_file_alone_is_refused_and_changes_nothing(issued, checkpoint, tmp_path):
    corpus = tmp_path / "corpus"
    refusals = write_corpus(corpus, issued / "bob_images" / "img_0000.png")
    before = registry_state(issued)
    for file, words in refusals.items():
        with pytest.raises(DataError, match=words):
            task(issued, checkpoint, "attribute", f"images={corpus / file}")
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for file in refusals:
        (only_bad / file).write_bytes((corpus / file).read_bytes())
    with pytest.raises(DataError, match="no readable image: 5 skipped"):
        task(issued, checkpoint, "trace", f"images={only_bad}")
    assert registry_state(issued) == before
