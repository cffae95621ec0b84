"""fid_proxy: the Frechet distance on a small trained classifier's features, its cache, clean-fid gating."""

from __future__ import annotations

import sys

import pytest
import torch

from fingerprint_lm.attacks.image import gaussian_blur, gaussian_noise
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import DataError, FingerprintError
from fingerprint_lm.metrics import fid
from fingerprint_lm.metrics.fid import (
    PROXY_CONFIG_NAME,
    PROXY_WEIGHTS_NAME,
    ProxyFeatureNet,
    clean_fid,
    clean_fid_available,
    frechet_distance,
    frechet_distance_proxy,
    proxy_features,
    train_proxy_feature_net,
)

PROXY_ARGS = {"resolution": 32, "steps": 250, "seed": 0, "train_size": 2048}
SET_SIZE = 512



@pytest.fixture(scope="session")
def proxy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("proxy_cache")


@pytest.fixture(scope="session")
def proxy_net(proxy_cache) -> ProxyFeatureNet:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_proxy_feature_net(cache_dir=proxy_cache, **PROXY_ARGS)  # ~10 s on one thread
    finally:
        torch.set_num_threads(threads)


def image_set(seed: int, count: int = SET_SIZE) -> torch.Tensor:
    data = ProceduralImages(resolution=32, seed=seed, length=count)
    return torch.stack([data.sample(i)["image"] for i in range(count)])


@pytest.fixture(scope="module")
def clean_sets() -> tuple[torch.Tensor, torch.Tensor]:
    # Seeds 1 and 2: disjoint streams, and disjoint from the proxy's training pool (seed + 10_000).
    return image_set(1), image_set(2)


def test_clean_sets_are_disjoint(clean_sets):
    a, b = clean_sets
    distances = torch.cdist(a.flatten(1), b.flatten(1))
    assert distances.min().item() > 1.0


def test_fid_proxy_separates_clean_from_damaged(proxy_net, clean_sets, record_property):
    a, b = clean_sets
    generator = torch.Generator().manual_seed(0)
    shuffled = b[torch.randperm(SET_SIZE, generator=generator)]
    values = {
        "clean": frechet_distance_proxy(a, b, proxy_net),
        "blur_sigma2": frechet_distance_proxy(a, gaussian_blur(b, 2.0), proxy_net),
        "noise_0.2": frechet_distance_proxy(a, gaussian_noise(b, 0.2, generator), proxy_net),
        "mix_50_50": frechet_distance_proxy(a, 0.5 * b + 0.5 * shuffled, proxy_net),
    }
    record_property("fid_proxy", values)
    print("fid_proxy:", {k: round(v, 2) for k, v in values.items()})
    # Measured over proxy seeds 0/1/2: clean 1.4-2.5; blur 62-72, noise 470-870, mix 24-29
    # (smallest ratio 11). The assertion leaves a margin of 2 under that.
    for name in ("blur_sigma2", "noise_0.2", "mix_50_50"):
        assert values[name] >= 5 * values["clean"], (name, values)


def test_fid_proxy_grows_with_damage(proxy_net, clean_sets):
    a, b = clean_sets
    generator = torch.Generator().manual_seed(1)
    blur = [frechet_distance_proxy(a, gaussian_blur(b, sigma), proxy_net) for sigma in (0.5, 2.0)]
    noise = [frechet_distance_proxy(a, gaussian_noise(b, std, generator), proxy_net) for std in (0.05, 0.2)]
    assert blur[0] < blur[1]
    assert noise[0] < noise[1]


def test_fid_proxy_of_a_set_with_itself_is_zero(proxy_net, clean_sets):
    a, _ = clean_sets
    assert frechet_distance_proxy(a, a.clone(), proxy_net) < 1e-6


def test_proxy_classifier_learned_something(proxy_net):
    data = ProceduralImages(resolution=32, seed=3, length=256)
    samples = [data.sample(i) for i in range(256)]
    images = torch.stack([s["image"] for s in samples])
    with torch.no_grad():
        logits = proxy_net(images)
    # Chance: 1/13 for colour, 1/6 for texture (measured after 250 steps: ~0.6 and ~0.38).
    color = (logits["color"].argmax(1) == torch.tensor([s["color"] for s in samples])).float().mean()
    texture = (logits["texture"].argmax(1) == torch.tensor([s["texture"] for s in samples])).float().mean()
    assert color > 0.3 and texture > 0.25
    assert proxy_features(images[:5], proxy_net).shape == (5, proxy_net.feature_dim)


def test_proxy_is_cached_and_reloaded(proxy_net, proxy_cache, monkeypatch):
    entries = list((proxy_cache / "fid_proxy").iterdir())
    assert len(entries) == 1
    assert {p.name for p in entries[0].iterdir()} == {PROXY_WEIGHTS_NAME, PROXY_CONFIG_NAME}

    def no_training(*args, **kwargs):
        raise AssertionError("the cached net should have been loaded, not retrained")

    monkeypatch.setattr(fid, "_labelled_images", no_training)
    reloaded = train_proxy_feature_net(cache_dir=proxy_cache, **PROXY_ARGS)
    for key, value in proxy_net.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with pytest.raises(AssertionError, match="cached"):  # another config is another cache entry
        train_proxy_feature_net(cache_dir=proxy_cache, **{**PROXY_ARGS, "seed": 1})


def test_frechet_distance_closed_form():
    generator = torch.Generator().manual_seed(0)
    mu_a, mu_b = (torch.randn(6, generator=generator, dtype=torch.float64) for _ in range(2))
    var_a, var_b = (torch.rand(6, generator=generator, dtype=torch.float64) + 0.1 for _ in range(2))
    # Diagonal covariances: ||mu_a - mu_b||^2 + sum (sqrt(a) - sqrt(b))^2.
    expected = ((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    value = frechet_distance(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert value == pytest.approx(expected.item(), rel=1e-9)
    # Non-commuting covariances: against scipy's matrix square root.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m_a, m_b = (
        torch.randn(5, 5, generator=generator).double(),
        torch.randn(5, 5, generator=generator).double(),
    )
    s_a, s_b = m_a @ m_a.T, m_b @ m_b.T
    trace_root = scipy_linalg.sqrtm((s_a @ s_b).numpy()).real.trace()
    expected = (s_a.trace() + s_b.trace()).item() - 2 * trace_root
    assert frechet_distance(torch.zeros(5), s_a, torch.zeros(5), s_b) == pytest.approx(expected, rel=1e-8)


def test_fid_proxy_input_errors(proxy_net):
    with pytest.raises(DataError):
        frechet_distance_proxy(torch.zeros(1, 3, 32, 32), torch.zeros(4, 3, 32, 32), proxy_net)
    with pytest.raises(DataError):
        frechet_distance_proxy(torch.zeros(4, 1, 32, 32), torch.zeros(4, 3, 32, 32), proxy_net)


def test_clean_fid_gated_without_weights(tmp_path):
    assert clean_fid_available(weights_dir=tmp_path) is False  # no inception-2015-12-05.pt here
    with pytest.raises(FingerprintError, match="fid_proxy"):
        clean_fid(tmp_path, tmp_path, weights_dir=tmp_path)
    assert "torchvision" not in sys.modules  # checking availability must not import it
