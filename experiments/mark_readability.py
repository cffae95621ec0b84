"""What limits method=pnm's bit accuracy: the image content that masks the mark, or the mark itself?
(issue 11)

The distributor holds the base VAE, so it can take most of the content out of a suspect image
before reading it: the residual ``y - D0(E(y))`` (``D0``, ``E``: the reference VAE, the decoder as
it was before training). This script measures, on a shipped pnm checkpoint's marked held-out
images ``y = D_u(E(x))`` (one fresh code per image):

- the fidelities: ``x`` against ``D0(E(x))``, the mark ``y - D0(E(x))``, and what re-encoding
  leaves of an unmarked decoder output and of a marked one (the residual's content floor);
- how well bits can be read from three inputs: the marked image, its residual, and the decoder's
  change ``y - D0(E(x))`` (no content; no real reader has it; with a trained shared decoder part
  of it is common to every code), each by
  - the checkpoint's own reader (its band filters) re-whitened on that input and fine-tuned
    ``--steps`` steps on it (BCE on its logits, the recipe's gain);
  - a ridge-regression linear readout of the pixels (not shift-invariant: a bound on what one
    fixed linear map can read, at ``--ridge`` penalties);
  - with ``--pooled-steps N``, a pooled convolutional reader trained from scratch on the residual;
- whether that reader-only tuning on marked images would help under attack: the shipped reader and
  the one tuned on images, each on the held-out images under every case of the robustness suite
  (``attacks/cases.py: ROBUSTNESS_SUITE``);
- whether reading *against a reference* helps: the shipped reader's logits of ``y`` minus its
  logits of the re-encoding ``D0(E(y))`` (what the distributor can compute), of the shared
  decoder's re-encoding (the trained decoder without a code), and of the exact unmarked
  counterpart ``D0(E(x))`` (an oracle: no content left but the mark's own effect). Its whitening
  is affine, so the difference cancels the content's own logits.

The marks are fixed (the checkpoint's mapping network and decoder); only readers are trained.

    python experiments/mark_readability.py

Prints markdown tables; rows are appended to ``results/mark_readability.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, image_case
from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.lit.stages import encode_latents
from fingerprint_lm.metrics.bits import bit_accuracy
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.pooled_extractor import PooledExtractor
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "mark_readability.jsonl"
INPUTS = ("image", "residual", "mark")


def images(seed: int, n: int, resolution: int) -> torch.Tensor:
    source = ProceduralImages(resolution, seed=seed, length=n)
    return torch.stack([source.sample(i)["image"] for i in range(n)])


@torch.no_grad()
def marked_set(model, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Per image: a fresh code, the marked image, its residual, the exact mark, and the unmarked
    decoder output's residual (what re-encoding alone leaves)."""
    reference, generator = model.reference_vae, torch.Generator().manual_seed(seed)
    decode = lambda z: reference.decode(z).sample  # noqa: E731
    parts: dict[str, list] = {k: [] for k in ("bits", "image", "residual", "mark", "unmarked_residual", "base", "x")}
    for batch in x.split(256):
        latents = encode_latents(reference, batch)
        base = decode(latents)
        bits = torch.randint(0, 2, (len(batch), model.fingerprint_bits), generator=generator)
        marked = model.pnm(latents, bits)
        for key, value in (("bits", bits), ("image", marked), ("mark", marked - base), ("base", base), ("x", batch),
                           ("residual", marked - decode(encode_latents(reference, marked))),
                           ("unmarked_residual", base - decode(encode_latents(reference, base)))):
            parts[key].append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


def accuracy(logits: torch.Tensor, bits: torch.Tensor) -> float:
    """The bit accuracy of the hard decisions ``logits > 0``."""
    return float(bit_accuracy((logits > 0).detach().cpu().numpy(), bits.numpy()))


def tuned_reader(reader, train: dict, test: dict, key: str, steps: int, batch: int = 64, seed: int = 3):
    """Train ``reader`` on ``train[key]`` (whitened first on those inputs: balanced random codes
    centre them); returns its held-out bit accuracy on ``test[key]`` and the reader."""
    reader = reader.train().requires_grad_(True)
    reader.whiten_mean.requires_grad_(False)
    reader.whiten_matrix.requires_grad_(False)
    reader.fit_whitening(train[key][:2048])
    optimizer = torch.optim.Adam([p for p in reader.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(train[key]), (batch,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(reader(train[key][index]), train["bits"][index].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        reader.eval().fit_whitening(train[key][:2048])
        return accuracy(reader(test[key]), test["bits"]), reader.requires_grad_(False)


@torch.no_grad()
def under_attack(readers: dict, test: dict, seed: int = 4) -> dict[str, float]:
    """``<reader>/<case>``: each reader's bit accuracy on the attacked held-out marked images (the
    same attacked batch for every reader)."""
    out = {}
    for case in ROBUSTNESS_SUITE:
        attacked = image_case(case)(test["image"], torch.Generator().manual_seed(seed))
        for name, reader in readers.items():
            out[f"{name}/{case}"] = accuracy(reader(attacked), test["bits"])
    return out


def ridge_accuracy(train: dict, test: dict, key: str, penalty: float) -> float:
    """A linear map of the pixels to the bits (as +-1), least squares with a ridge penalty."""
    features, targets = train[key].flatten(1).double(), train["bits"].double() * 2 - 1
    gram = features.T @ features + penalty * len(features) * torch.eye(features.shape[1], dtype=features.dtype)
    weights = torch.linalg.solve(gram, features.T @ targets)
    return accuracy(test[key].flatten(1).double() @ weights, test["bits"])


@torch.no_grad()
def differential_accuracy(model, test: dict) -> dict[str, float]:
    """The shipped reader on ``y`` minus the same reader on a reference image (see the docstring)."""
    reader, reference = model.extractor.eval(), model.reference_vae
    out = {}
    for name, images in (("reencoded", lambda z: reference.decode(z).sample),
                         ("shared_decoder", lambda z: model.pnm(z, None))):
        logits = torch.cat([reader(y) - reader(images(encode_latents(reference, y))) for y in test["image"].split(256)])
        out[f"differential_{name}"] = accuracy(logits, test["bits"])
    out["differential_oracle"] = accuracy(reader(test["image"]) - reader(test["base"]), test["bits"])
    unmarked = reader(test["base"])
    out["unmarked_logit_std"] = unmarked.std().item()
    out["unmarked_differential_logit_std"] = (unmarked - reader(test["base"] - test["unmarked_residual"])).std().item()
    return out


def fidelities(test: dict) -> dict[str, float]:
    return {
        "x_vs_base_db": psnr(test["base"], test["x"]).mean().item(),
        "mark_db": psnr(test["image"], test["base"]).mean().item(),
        "reencode_unmarked_db": psnr(test["base"] - test["unmarked_residual"], test["base"]).mean().item(),
        "reencode_marked_db": psnr(test["image"] - test["residual"], test["image"]).mean().item(),
        "mark_energy_kept_in_residual": (test["residual"].pow(2).mean() / test["mark"].pow(2).mean()).item(),
        "cos_residual_mark": F.cosine_similarity(test["residual"].flatten(1), test["mark"].flatten(1)).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm", help="a shipped checkpoint name or a folder")
    parser.add_argument("--train-images", type=int, default=8192)
    parser.add_argument("--test-images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ridge", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--pooled-steps", type=int, default=0)
    args = parser.parse_args()
    for name in ("train_images", "test_images", "steps"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name))
    check_int("--pooled-steps", args.pooled_steps, 0)
    if any(not p > 0 for p in args.ridge):
        raise ConfigError(f"every --ridge must be > 0, got {args.ridge}")
    folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else shipped_checkpoint(args.checkpoint)
    torch.manual_seed(0)
    started = time.time()
    model = load_fingerprint_model(folder)
    if model.reference_vae is None:
        raise ConfigError(f"{folder} has no reference_vae/: this probe needs a method=pnm checkpoint")
    model.pnm.eval()
    resolution = int(model.meta.get("resolution", 32))  # the size the checkpoint was trained at
    if args.train_images < 3 * resolution**2:
        raise ConfigError(f"--train-images must be >= {3 * resolution**2} (one per pixel value at {resolution} px)")
    train = marked_set(model, images(0, args.train_images, resolution), seed=2)
    test = marked_set(model, images(TEST_SEED_OFFSET, args.test_images, resolution), seed=1)
    row = {"checkpoint": str(args.checkpoint), **fidelities(test)}
    with torch.no_grad():
        row["shipped_reader_image"] = accuracy(model.extractor(test["image"]), test["bits"])
    tuned = {}
    for key in INPUTS:
        row[f"tuned_band_{key}"], tuned[key] = tuned_reader(copy.deepcopy(model.extractor), train, test, key,
                                                            args.steps)
        for penalty in args.ridge:
            row[f"ridge_{penalty:g}_{key}"] = ridge_accuracy(train, test, key, penalty)
    if args.pooled_steps:
        reader = PooledExtractor(model.fingerprint_bits)
        row["pooled_residual"] = tuned_reader(reader, train, test, "residual", args.pooled_steps)[0]
    row.update(differential_accuracy(model, test))
    row["attacked"] = under_attack({"shipped": model.extractor.eval(), "tuned": tuned["image"]}, test)
    row.update(train_images=args.train_images, test_images=args.test_images, steps=args.steps,
               pooled_steps=args.pooled_steps, seconds=round(time.time() - started, 1),
               threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"))
    print_tables(row, args.ridge)
    append_jsonl(RESULTS, row)


def print_tables(row: dict, penalties) -> None:
    print("| x vs D0(E(x)) | mark (y vs D0(E(x))) | re-encoding error, unmarked | same, marked | "
          "residual energy / mark energy | cos(residual, mark) |")
    print("|---|---|---|---|---|---|")
    print(f"| {row['x_vs_base_db']:.1f} dB | {row['mark_db']:.1f} dB | {row['reencode_unmarked_db']:.1f} dB | "
          f"{row['reencode_marked_db']:.1f} dB | {row['mark_energy_kept_in_residual']:.2f} | "
          f"{row['cos_residual_mark']:.2f} |")
    print()
    readers = ["band filters, tuned", *(f"ridge {p:g}" for p in penalties)]
    keys = ["tuned_band", *(f"ridge_{p:g}" for p in penalties)]
    print("| reader | " + " | ".join(INPUTS) + " |")
    print("|---|" + "---|" * len(INPUTS))
    print(f"| the checkpoint's reader as shipped | {row['shipped_reader_image']:.3f} | | |")
    for label, key in zip(readers, keys):
        print(f"| {label} | " + " | ".join(f"{row[f'{key}_{i}']:.3f}" for i in INPUTS) + " |")
    if "pooled_residual" in row:
        print(f"| pooled reader from scratch | | {row['pooled_residual']:.3f} | |")
    print("\n| the shipped reader on y minus the same on: | D0(E(y)) | shared decoder(E(y)) | D0(E(x)), oracle | "
          "unmarked logits' std, plain / minus D0(E(y)) |")
    print("|---|---|---|---|---|")
    print(f"| bit accuracy | {row['differential_reencoded']:.3f} | {row['differential_shared_decoder']:.3f} | "
          f"{row['differential_oracle']:.3f} | {row['unmarked_logit_std']:.2f} / "
          f"{row['unmarked_differential_logit_std']:.2f} |")
    print("\n| reader on attacked images | " + " | ".join(ROBUSTNESS_SUITE) + " |")
    print("|---|" + "---|" * len(ROBUSTNESS_SUITE))
    for name in ("shipped", "tuned"):
        print(f"| {name} | " + " | ".join(f"{row['attacked'][f'{name}/{c}']:.3f}" for c in ROBUSTNESS_SUITE) + " |")
    print(f"\n{row['seconds']} s, {row['threads']} threads")


if __name__ == "__main__":
    exit_on_user_error(main)
