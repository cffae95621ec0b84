"""The baselines behind the method interface (issue 14): method=stable_signature trains each copy
(and nothing shared); method=wouaf is tested with method=pnm in test_methods.py (stock copies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from fingerprint_lm.distributor.copies import CONFIG_NAME, WEIGHTS_NAME, write_copy
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.methods import personal_tensors, stable_signature
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.train import method_from_config
from tests.conftest import compose_config

BITS = 16


def test_stable_signature_copies_are_trained_per_user_and_read_as_their_own(tmp_path):
    """debug=tiny: the "training" run trains nothing shared (only the reader's whitening); each
    copy is the base decoder fine-tuned for its code, a stock folder, the same every time it is
    issued, and read as its own code clearly more often than as another user's."""
    # 32 evaluation images: two users' copies, each a 100-step fine-tune (64 would be four)
    metrics = run(compose_config(tmp_path, ["method=stable_signature", f"fingerprint_bits={BITS}",
                                            "eval.max_images=32"]))
    assert metrics["steps"] == 0
    assert metrics["bit_acc"] > 0.6, metrics["bit_acc"]  # evaluated through copies trained per user
    model = load_fingerprint_model(metrics["checkpoint"])
    assert not [key for key in model.meta if key.startswith("_")]  # no private state in the saved record
    assert model.method == "stable_signature" and model.pnm.pnm_parameters() == list(model.pnm.mapping.parameters())
    rng = np.random.default_rng(0)
    own, other = rng.integers(0, 2, (2, BITS), dtype=np.uint8)
    state, bias_map, _ = personal_tensors(model, own)
    assert bias_map is None
    again, _, _ = personal_tensors(model, own, "all", act_seed=3)  # memoised fine-tune, then ACT
    base = model.vae.state_dict()
    changed = [k for k in state if k.startswith("decoder.") and not torch.equal(state[k], base[k])]
    assert len(changed) > 10  # the whole decoder was tuned, not a few values
    assert not torch.equal(again["decoder.conv_in.weight"], state["decoder.conv_in.weight"])  # ACT applied
    write_copy(tmp_path / "copy", model.vae.config, state)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    stock = AutoencoderKL.from_pretrained(tmp_path / "copy").eval()
    images = held_out_images(16, 128, seed=77)
    with torch.no_grad():
        bits = (model.extractor(decode_with(model.vae, stock, images)) > 0).numpy()
    own_acc, other_acc = (bits == own).mean(), (bits == other).mean()
    assert own_acc >= other_acc + 0.1, (own_acc, other_acc)
    # issuing the same user again gives the same weights (the code seeds the fine-tune): trained
    # anew, not read back from the memo that serves a sweep's repeated colluder codes
    stable_signature._MEMO.clear()
    state2, _, _ = personal_tensors(model, own)
    assert all(torch.equal(state[k], state2[k]) for k in state)


@pytest.mark.parametrize("override", ["method.copy_finetune.lr=0", "method.copy_finetune.steps=0",
                                      "+method.copy_finetune.momentum=0.9"])
def test_bad_copy_finetune_values_are_config_errors(tmp_path, override):
    with pytest.raises(ConfigError):
        method_from_config(compose_config(tmp_path, ["method=stable_signature", override]))
