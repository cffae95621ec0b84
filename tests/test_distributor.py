"""Distributor workflow: issuing copies, loading them, attribution, tracing, bad input.

One tiny model is trained for the whole module (session fixture); three users are issued once
and shared by the read-only tests. Tests that write use their own registry under ``tmp_path``.

Statistics at this size: the tiny model has 32-bit codes and a registry of 3 users. Attribution
then reaches the default FPR 1e-6 (best corrected p-value 3 * 2**-32 = 7e-10; >= 30 of 32 bits
must match). Pooled tracing cannot: its score is at most sqrt(32) = 5.66 and its threshold at 1e-6
(half the budget) is sqrt(2 ln(6e6)) = 5.59, so the tracing test uses fpr 1e-3 (threshold 4.17).
16-bit codes would not do for attribution at 1e-6 either (best p-value 3 * 2**-16 = 5e-5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from fingerprint_lm.distributor.attribution import attribute_images
from fingerprint_lm.distributor.copies import (
    BIAS_MAP_NAME,
    WEIGHTS_NAME,
    BiasMapGroupNorm,
    copy_sha256,
    load_copy,
    personal_tensors,
    write_copy,
)
from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.models.act import derive_act_seed
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.tasks import TASKS
from tests.conftest import SECRET, TINY_BITS, TRACE_FPR, USERS, compose_config, task

BITS = TINY_BITS

# -- config -----------------------------------------------------------------------------------------
def test_config_groups_and_defaults(tmp_path):
    cfg = compose_config(tmp_path)
    assert cfg.act.type == "all" and cfg.act.scale_min == 0.25 and cfg.act.scale_max == 4.0
    assert cfg.distributor.registry == f"{tmp_path}/registry/registry.sqlite"
    assert cfg.distributor.copies_dir == f"{tmp_path}/copies"
    assert cfg.distributor.checkpoint is None and cfg.distributor.secret_file is None
    assert cfg.distributor.secret_env == "FINGERPRINT_LM_SECRET"
    assert cfg.distributor.fpr == 1e-6 and cfg.distributor.min_distance == 8
    for act_type in ("none", "permute", "scale", "sign", "all"):
        assert compose_config(tmp_path, [f"act={act_type}"]).act.type == act_type
    assert set(TASKS) >= {"issue", "users", "attribute", "trace", "generate", "verify"}


# -- issuing ----------------------------------------------------------------------------------------
def test_end_to_end_issue_generate_attribute(issued, checkpoint):
    users = task(issued, checkpoint, "users")
    assert [u["user_id"] for u in users["users"]] == list(USERS)
    for row in users["users"]:
        assert row["act_type"] == "all"
        assert row["copy_sha256"] == copy_sha256(issued / "copies" / row["user_id"])
    assert json.loads((issued / "run" / "users.json").read_text())["n_users"] == 3

    # images from bob's copy (decoded through load_copy) are attributed to bob at the default FPR
    result = task(issued, checkpoint, "attribute", f"images={issued / 'bob_images'}")
    assert len(result["images"]) == 16 and result["match_threshold"] is not None
    for row in result["images"]:
        assert row["user_id"] == "bob" and row["accused"], row
        assert row["p_value"] <= 1e-6
        assert row["matching_bits"] >= result["match_threshold"]
        assert len(row["bits"]) == BITS and set(row["bits"]) <= {"0", "1"}
    saved = json.loads((issued / "run" / "attribute.json").read_text())
    assert saved["images"][0].keys() >= {"image", "bits", "user_id", "matching_bits", "p_value", "accused", "score"}
    assert saved["decoding"] == "soft"
    # hard decoding (matching bits only) names bob too
    hard = task(issued, checkpoint, "attribute", f"images={issued / 'bob_images'}", "distributor.decoding=hard")
    assert hard["decoding"] == "hard" and all(row["user_id"] == "bob" for row in hard["images"])
    assert "score" not in hard["images"][0]
    # ... and so does the soft test on the reader's whitened logits (fitted when the model was trained)
    whitened = task(issued, checkpoint, "attribute", f"images={issued / 'bob_images'}",
                    "distributor.decoding=soft_whitened")
    assert whitened["decoding"] == "soft_whitened" and all(row["user_id"] == "bob" for row in whitened["images"])
    # ... and the soft test with each accused code also tested against its own unmarked law
    checked = task(issued, checkpoint, "attribute", f"images={issued / 'bob_images'}",
                   "distributor.decoding=soft_code_null")
    assert checked["decoding"] == "soft_code_null" and all(row["user_id"] == "bob" for row in checked["images"])
    assert all(c["p_value"] >= s["p_value"] for c, s in zip(checked["images"], result["images"], strict=True))

    # no image from the base decoder is accused
    base = task(issued, checkpoint, "attribute", f"images={issued / 'base_images'}")
    assert not any(row["accused"] for row in base["images"])
    assert all(row["user_id"] is None for row in base["images"])


def test_trace_ranks_the_source_first_and_accuses_nobody_for_base_images(issued, checkpoint):
    result = task(issued, checkpoint, "trace", f"images={issued / 'bob_images'}", f"distributor.fpr={TRACE_FPR}")
    suspects = result["suspects"]
    assert [s["user_id"] for s in suspects][:1] == ["bob"] and suspects[0]["accused"]
    assert not any(s["accused"] for s in suspects[1:])
    assert suspects[0]["score"] >= result["threshold"] > suspects[1]["score"]
    # bob's own images: each names him on its own, and the pooled score does too
    assert suspects[0]["evidence"] == "both" and suspects[0]["n_images"] == result["n_images"] == 16
    assert suspects[0]["p_value_bound"] <= float(TRACE_FPR) < suspects[1]["p_value_bound"]
    base = task(issued, checkpoint, "trace", f"images={issued / 'base_images'}", f"distributor.fpr={TRACE_FPR}")
    assert not any(s["accused"] for s in base["suspects"])
    # the symmetric Tardos score of the images' majority bits: bob alone, above its threshold
    tardos = task(issued, checkpoint, "trace", f"images={issued / 'bob_images'}", f"distributor.fpr={TRACE_FPR}",
                  "distributor.tracing=tardos")
    assert tardos["scoring"] == "tardos" and [s["user_id"] for s in tardos["suspects"] if s["accused"]] == ["bob"]
    assert tardos["suspects"][0]["score"] >= tardos["threshold"] > tardos["suspects"][1]["score"]
    # the fields every trace reports; bob's own images name him one by one too
    assert {key for s in tardos["suspects"] for key in s} == {
        "user_id", "n_images", "score", "p_value_bound", "evidence", "accused"}
    assert tardos["suspects"][0]["evidence"] == "pooled" and tardos["suspects"][1]["evidence"] is None
    assert tardos["suspects"][0]["n_images"] > 0 == tardos["suspects"][1]["n_images"]
    assert tardos["per_image_fpr"] == pytest.approx(float(TRACE_FPR) / 16)


def test_copy_holds_no_private_tensors_and_no_secret(issued, checkpoint):
    model = load_fingerprint_model(checkpoint)
    stock_keys = set(AutoencoderKL.from_config(model.vae.config).state_dict())
    private = ("mapping", "affine_heads", "carrier", "extractor", "linear_gain", "cnn")
    for user in USERS:
        folder = issued / "copies" / user
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS_NAME, BIAS_MAP_NAME]
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
            keys = set(handle.keys())
        assert keys == stock_keys
        assert not any(word in key for key in keys for word in private)
        with safe_open(str(folder / BIAS_MAP_NAME), "pt") as handle:
            assert list(handle.keys()) == ["decoder.conv_norm_out.bias_map"]
    # the secret appears in no file the distributor wrote (registry, copies, JSON outputs)
    for path in issued.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_load_copy_reproduces_the_pnm_decoder(issued, checkpoint):
    """load_copy == pnm(latents, code) (float32, <= 1e-5): exactly for ACT none/permute/sign at the
    stock GroupNorm eps; ACT scale/all are exact only up to eps (GN(s x) normalises by
    sqrt(var + eps / s^2)), so they are compared at eps 0 and bounded at the stock eps."""
    model = load_fingerprint_model(checkpoint)
    with torch.no_grad():
        latents = model.vae.encode(held_out_images(16, 4, seed=1)).latent_dist.mode()
    with Registry(issued / "registry" / "registry.sqlite", BITS) as reg:
        code = reg.get("bob")["code"]
    bits = torch.as_tensor(code).long()[None]
    seed = derive_act_seed(SECRET.encode(), "bob")

    def set_eps(module, eps):
        for norm in module.modules():
            if isinstance(norm, torch.nn.GroupNorm):
                norm.eps = eps

    with torch.no_grad():
        reference = model.pnm(latents, bits)  # post_quant_conv included, as in AutoencoderKL.decode
        for act_type in ("none", "permute", "sign", "scale", "all"):
            state, bias_map, site = personal_tensors(model, code, act_type, seed)
            folder = issued / "scratch" / act_type
            write_copy(folder, model.vae.config, state, bias_map, site)
            vae = load_copy(folder)
            assert isinstance(vae.decoder.conv_norm_out, BiasMapGroupNorm)
            assert set(vae.state_dict()) == set(AutoencoderKL.from_pretrained(folder).state_dict())
            diff = (vae.decode(latents).sample - reference).abs().max().item()
            assert diff <= (1e-5 if act_type in ("none", "permute", "sign") else 1e-3), (act_type, diff)

        # the session's copy of bob (ACT all, written by task=issue) at eps 0: exact to rounding
        set_eps(model.vae, 0.0)
        exact_reference = model.pnm(latents, bits)
        vae = load_copy(issued / "copies" / "bob")
        set_eps(vae, 0.0)
        assert (vae.decode(latents).sample - exact_reference).abs().max().item() <= 1e-5

        # stock from_pretrained reproduces the main path: the PNM decoder without the bias map
        stock = AutoencoderKL.from_pretrained(issued / "copies" / "bob").eval()
        set_eps(stock, 0.0)
        main_path = model.pnm(latents, bits, carriers=False)
        assert (stock.decode(latents).sample - main_path).abs().max().item() <= 1e-5
        assert (stock.decode(latents).sample - exact_reference).abs().max().item() > 1e-2  # the map matters


def test_act_type_is_recorded_and_the_secret_sets_the_copy(tmp_path, checkpoint, monkeypatch):
    # no secret needed without ACT
    monkeypatch.delenv("FINGERPRINT_LM_SECRET", raising=False)
    task(tmp_path / "a", checkpoint, "issue", "user_id=dora", "act=none")
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", SECRET)
    task(tmp_path / "a", checkpoint, "issue", "user_id=erin", "act=permute")
    with Registry(tmp_path / "a" / "registry" / "registry.sqlite", BITS) as reg:
        assert reg.get("dora")["act_type"] == "none" and reg.get("erin")["act_type"] == "permute"

    # same code seed and secret (from the environment or a file): the same copy; another secret: not
    monkeypatch.delenv("FINGERPRINT_LM_SECRET")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET + "\n")
    shas = []
    for name, secret_value in (("b", SECRET), ("c", None), ("d", "another-secret")):
        if secret_value is None:
            extra = [f"distributor.secret_file={secret_file}"]
        else:
            monkeypatch.setenv("FINGERPRINT_LM_SECRET", secret_value)
            extra = []
        shas.append(task(tmp_path / name, checkpoint, "issue", "user_id=dora", "distributor.code_seed=7",
                         *extra)["copy_sha256"])
        monkeypatch.delenv("FINGERPRINT_LM_SECRET", raising=False)
    assert shas[0] == shas[1] != shas[2]


class _OneWayReader(torch.nn.Module):
    """A reader that reads ``code`` from an image whose left column is brighter than its right one
    (as a copy's output), and nothing from its mirror: how pnm's reader meets a mirrored image."""

    fingerprint_bits = 48

    def __init__(self, code: np.ndarray):
        super().__init__()
        self.register_buffer("signs", torch.as_tensor(2.0 * code - 1.0, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        one_way = (images[:, :, :, 0].mean(dim=(1, 2)) > images[:, :, :, -1].mean(dim=(1, 2))).float()
        # a little noise that depends on the image but not on its orientation
        noise = 0.3 * torch.sin(torch.arange(48) * (1 + 7 * images.mean(dim=(1, 2, 3)))[:, None])
        return 3.0 * one_way[:, None] * self.signs + noise


def test_read_mirrored_attributes_mirrored_images_at_the_same_false_accusation_bound():
    """distributor.read_mirrored: each image is read as found and mirrored at fpr/2; the kept read's
    p-value is doubled, so a mirrored image is attributed, its row says so, and unmarked images
    (both reads noise) are accused no more than before."""
    codes = np.random.default_rng(0).integers(0, 2, (200, 48), dtype=np.uint8)
    index = CodeIndex.from_bits([f"u{i}" for i in range(200)], codes)
    reader = _OneWayReader(codes[7])
    ramp = torch.linspace(1, -1, 16).expand(3, 16, 16)  # brighter on the left
    found = [(f"img{i}", ramp + 0.01 * i) for i in range(6)]
    mirrored = [(name, image.flip(-1)) for name, image in found]
    unmarked = [(f"flat{i}", torch.full((3, 16, 16), 0.1 * i)) for i in range(6)]

    def attribute(images, **kwargs):
        return attribute_images(reader, index, images, fpr=1e-3, **kwargs)

    once, either = attribute(found), attribute(found, read_mirrored=True)
    assert all(r["user_id"] == "u7" for r in once["images"] + either["images"])
    assert not any(r["accused"] for r in attribute(mirrored)["images"])  # one read: a mirror erases it
    as_mirrored = attribute(mirrored, read_mirrored=True)
    assert as_mirrored["fpr"] == 1e-3 and as_mirrored["read_mirrored"]
    assert [(r["user_id"], r["orientation"]) for r in as_mirrored["images"]] == [("u7", "mirrored")] * 6
    assert [r["orientation"] for r in either["images"]] == ["as found"] * 6
    # the kept read was made at fpr/2; its p-value is reported doubled (union bound over the two reads)
    half = attribute_images(reader, index, [(n, i.flip(-1)) for n, i in mirrored], fpr=5e-4)
    kept = [r["p_value"] for r in as_mirrored["images"]]
    assert 0 < min(kept) and kept == pytest.approx([min(1, 2 * r["p_value"]) for r in half["images"]])
    assert not any(r["accused"] for r in attribute(unmarked, read_mirrored=True)["images"])
