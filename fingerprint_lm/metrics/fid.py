"""Frechet distances between image sets: ``fid_proxy`` offline, clean-fid where it is installed.

``fid_proxy`` is the embedded default's stand-in for FID: the Frechet distance between Gaussians
fitted to the penultimate features of :class:`ProxyFeatureNet`, a small CNN trained here on
procedural images to predict their shape, texture and colour. Its values are not comparable with
FID (another network, another feature space, other data) and must never be reported as FID; it
is there to rank conditions (clean vs. attacked vs. colluded) on this machine without downloads.
A randomly initialised network does not do: its distance could not tell colluded from clean
images at 512 samples (docs/design.md, "What throwaway prototypes measured"), hence the training.

Real FID (Inception features) goes through clean-fid, an optional extra (``[fid]``) that needs
torchvision and the Inception weights on disk; :func:`clean_fid_available` says whether both are
there. torchvision is never imported at module import time.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.data.synthetic import COLORS, SHAPES, TEXTURES, ProceduralImages
from fingerprint_lm.errors import CheckpointError, ConfigError, DataError, FingerprintError, check_int
from fingerprint_lm.models.batched import evaluating, in_batches
from fingerprint_lm.storage import atomic_directory, atomic_write_text, config_hash

PROXY_WEIGHTS_NAME = "model.safetensors"
PROXY_CONFIG_NAME = "config.json"
# Bump when the architecture or the training recipe changes: it is part of the cache key.
_PROXY_VERSION = 1
_HEADS = {"shape": len(SHAPES), "texture": len(TEXTURES), "color": len(COLORS)}

# clean-fid's file name for the Inception torchscript weights, and the folder it looks in.
INCEPTION_WEIGHTS_NAME = "inception-2015-12-05.pt"
INCEPTION_DIR_ENV = "FINGERPRINT_LM_INCEPTION_DIR"
_CLEANFID_DEFAULT_DIR = "/tmp"


class ProxyFeatureNet(nn.Module):
    """A small CNN classifier of procedural images; its penultimate layer is the fid_proxy space.

    Four 3x3 conv stages (the first three strided) with BatchNorm and SiLU, global average pooling
    and a linear layer to ``feature_dim`` features, then one linear head per label (shape, texture,
    colour). Resolution-agnostic, but meaningful at the resolution it was trained on. Cheap on
    purpose: 250 steps train in ~8 s on one CPU thread at 32x32. BatchNorm (not GroupNorm) because
    it trains several times faster here; in eval mode it is a fixed per-channel affine, so a
    sample's features do not depend on the rest of its batch.

    Parameters:
        feature_dim: width of the feature vector the Frechet distance is computed on.
        channels: widths of the four conv stages.
    """

    def __init__(self, feature_dim: int = 128, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        if len(channels) != 4:
            raise ConfigError(f"ProxyFeatureNet takes four conv widths, got {list(channels)}")
        layers: list[nn.Module] = []
        in_channels = 3
        for index, width in enumerate(channels):
            stride = 2 if index < 3 else 1
            layers += [
                nn.Conv2d(in_channels, width, 3, stride=stride, padding=1),
                nn.BatchNorm2d(width),
                nn.SiLU(),
            ]
            in_channels = width
        self.body = nn.Sequential(*layers)
        self.project = nn.Linear(in_channels, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, size) for name, size in _HEADS.items()})
        self.feature_dim = feature_dim
        self.channels = tuple(channels)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, feature_dim]`` features of ``[B, 3, H, W]`` images in ``[-1, 1]``."""
        pooled = self.body(images).mean(dim=(2, 3))
        return F.silu(self.project(pooled))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per label: ``{"shape": [B, 8], "texture": [B, 6], "color": [B, 13]}``."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}


def _proxy_config(
    resolution: int, steps: int, seed: int, feature_dim: int, train_size: int, batch_size: int, lr: float
) -> dict:
    return {
        "kind": "fid_proxy",
        "version": _PROXY_VERSION,
        "resolution": resolution,
        "steps": steps,
        "seed": seed,
        "feature_dim": feature_dim,
        "channels": [16, 32, 64, 128],
        "train_size": train_size,
        "batch_size": batch_size,
        "lr": lr,
    }


def _labelled_images(resolution: int, seed: int, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    data = ProceduralImages(resolution=resolution, seed=seed, length=count)
    samples = [data.sample(i) for i in range(count)]
    images = torch.stack([s["image"] for s in samples])
    labels = {name: torch.tensor([s[name] for s in samples]) for name in _HEADS}
    return images, labels


def train_proxy_feature_net(
    resolution: int = 32,
    steps: int = 1000,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    feature_dim: int = 128,
    train_size: int = 4096,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> ProxyFeatureNet:
    """Train (or load from the cache) the fid_proxy feature network.

    Training: Adam with a cosine schedule, the sum of the three heads' cross-entropies, on a fixed
    pool of ``train_size`` procedural images (data seed ``seed + 10_000``, so held-out evaluation
    streams with small seeds do not overlap it). Deterministic given ``seed``.

    With ``cache_dir``, the net is stored as safetensors under
    ``cache_dir/fid_proxy/<config_hash>/`` (written atomically) and loaded from there when present.

    Returns the net in eval mode with gradients off.
    """
    for name, value in (("resolution", resolution), ("train_size", train_size), ("batch_size", batch_size)):
        check_int(f"fid_proxy {name}", value)
    check_int("fid_proxy training steps", steps, 0)
    config = _proxy_config(resolution, steps, seed, feature_dim, train_size, batch_size, lr)
    target = Path(cache_dir) / "fid_proxy" / config_hash(config) if cache_dir is not None else None
    if target is not None and (target / PROXY_WEIGHTS_NAME).is_file():
        return _load_proxy(target, feature_dim)

    torch.manual_seed(seed)  # parameter initialisation
    net = ProxyFeatureNet(feature_dim)
    images, labels = _labelled_images(resolution, seed + 10_000, train_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    net.train()
    order = torch.randperm(train_size, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > train_size:
            order, cursor = torch.randperm(train_size, generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        logits = net(images[index])
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in _HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval().requires_grad_(False)

    if target is not None:
        with atomic_directory(target) as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / PROXY_WEIGHTS_NAME)
            atomic_write_text(tmp / PROXY_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return net


def _load_proxy(directory: Path, feature_dim: int) -> ProxyFeatureNet:
    net = ProxyFeatureNet(feature_dim)
    try:
        net.load_state_dict(load_file(directory / PROXY_WEIGHTS_NAME))
    except Exception as exc:  # safetensors raises several kinds for truncated/corrupt files
        raise CheckpointError(
            f"cannot load the fid_proxy net from {directory}: {exc}".splitlines()[0]
        ) from exc
    return net.eval().requires_grad_(False)


@torch.no_grad()
def proxy_features(images: torch.Tensor, net: ProxyFeatureNet, batch_size: int = 256) -> torch.Tensor:
    """``[N, feature_dim]`` float64 features of ``[N, 3, H, W]`` images in ``[-1, 1]``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"fid_proxy takes [N, 3, H, W] images, got shape {tuple(images.shape)}")
    parameter = next(net.parameters())
    with evaluating(net):
        # the project's one batched loop (float32 on the CPU back; the net stays where it was);
        # float64 only for the Gaussian statistics
        features = in_batches(net, lambda m, x: m.features(x.to(parameter.dtype)), images, parameter.device, batch_size)
    return features.double()


def _covariance(features: torch.Tensor) -> torch.Tensor:
    centred = features - features.mean(dim=0)
    return centred.T @ centred / (features.shape[0] - 1)


def frechet_distance(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two Gaussians (float64).

    ``Tr((S_a S_b)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum as ``S_a S_b``), with ``torch.linalg.eigh``:
    no complex round-off as with ``scipy.linalg.sqrtm``, and torch's thread setting is respected
    (NumPy's OpenBLAS spawning threads on a busy machine made ``sqrtm`` 100x slower here).
    """
    mu_a, sigma_a, mu_b, sigma_b = (
        torch.as_tensor(v, dtype=torch.float64) for v in (mu_a, sigma_a, mu_b, sigma_b)
    )
    eigenvalues, eigenvectors = torch.linalg.eigh((sigma_a + sigma_a.T) / 2)
    root_a = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    middle = root_a @ sigma_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu_a - mu_b
    value = diff @ diff + sigma_a.trace() + sigma_b.trace() - 2 * trace_root
    return float(value.clamp_min(0.0))


def frechet_distance_proxy(images_a: torch.Tensor, images_b: torch.Tensor, net: ProxyFeatureNet) -> float:
    """fid_proxy: the Frechet distance between the two sets' :class:`ProxyFeatureNet` features.

    Not FID. Like FID it is biased upwards at small sample sizes, so compare values computed with
    the same numbers of images; a few hundred per set at least (the covariance is
    ``feature_dim x feature_dim``).
    """
    features = [proxy_features(images, net) for images in (images_a, images_b)]
    for f in features:
        if f.shape[0] < 2:
            raise DataError("fid_proxy needs at least two images per set")
    stats = [(f.mean(dim=0), _covariance(f)) for f in features]
    return frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])


def inception_weights_dir() -> Path:
    """Where clean-fid's Inception weights are looked for: ``$FINGERPRINT_LM_INCEPTION_DIR``,
    else clean-fid's own default (``/tmp``)."""
    return Path(os.environ.get(INCEPTION_DIR_ENV, _CLEANFID_DEFAULT_DIR))


def clean_fid_available(weights_dir: str | Path | None = None) -> bool:
    """True if clean-fid and torchvision are installed and the Inception weights are on disk.

    Checks without importing either package (importing torchvision where it does not match the
    installed torch breaks other imports), so it is safe to call anywhere.
    """
    try:
        installed = all(importlib.util.find_spec(name) is not None for name in ("cleanfid", "torchvision"))
    except (ImportError, ValueError):
        return False
    directory = Path(weights_dir) if weights_dir is not None else inception_weights_dir()
    return installed and (directory / INCEPTION_WEIGHTS_NAME).is_file()


def clean_fid(
    dir_a: str | Path,
    dir_b: str | Path,
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
) -> float:
    """Real FID (clean-fid, "clean" mode) between two folders of images.

    The Inception weights are loaded from ``weights_dir`` (default :func:`inception_weights_dir`)
    and never downloaded. Raises FingerprintError if clean-fid, torchvision or the weights are
    missing: install the ``[fid]`` extra and place ``inception-2015-12-05.pt`` there.
    """
    directory = Path(weights_dir) if weights_dir is not None else inception_weights_dir()
    if not clean_fid_available(directory):
        raise FingerprintError(
            "clean-fid is not available: it needs `pip install fingerprint_lm[fid]` (clean-fid + torchvision) "
            f"and {INCEPTION_WEIGHTS_NAME} in {directory} (set ${INCEPTION_DIR_ENV}); "
            "use the offline fid_proxy instead"
        )
    for path in (dir_a, dir_b):
        if not Path(path).is_dir():
            raise DataError(f"clean_fid compares folders of images; {path} is not a directory")
    try:
        from cleanfid import fid as cleanfid_fid

        try:
            from cleanfid.inception_torchscript import InceptionV3W
        except ImportError:  # clean-fid < 0.1.30 kept it in features
            from cleanfid.features import InceptionV3W
    except Exception as exc:  # a torchvision that does not match torch fails in many ways
        raise FingerprintError(
            f"clean-fid is installed but cannot be imported: {exc}".splitlines()[0]
        ) from exc
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    # Built here from the local file, so clean-fid's own builder (which downloads) is never called.
    # "clean" mode resizes outside the model (clean-fid's own resizer), so resize_inside=False.
    try:
        model = InceptionV3W(str(directory), download=False, resize_inside=False)
    except TypeError:  # older clean-fid: no resize_inside argument
        model = InceptionV3W(str(directory), download=False)
    model = model.to(device).eval()

    def extract(x: torch.Tensor) -> torch.Tensor:  # x: resized images in [0, 255], as clean-fid passes them
        return model(x)

    return float(
        cleanfid_fid.compute_fid(
            str(dir_a),
            str(dir_b),
            mode="clean",
            custom_feat_extractor=extract,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            verbose=False,
        )
    )
