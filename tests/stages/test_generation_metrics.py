"""FID and KID of ``evaluate-generation`` (torchmetrics, ``stages.evaluate.generation_metrics``)
against independent references: the implementations the stage had before torchmetrics
(scipy's matrix square root; numpy's unbiased polynomial-kernel MMD over random subsets),
kept here only. Also used by ``benchmarks.metrics_agreement`` on the diffusion benchmark."""

import numpy as np
import pytest
import torch

from stages.evaluate.generation_metrics import Given, fid, kid


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017, eq. 6, as pytorch-fid computes it."""
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular: regularise (as pytorch-fid does)
        eye = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eye) @ (s_b + eye))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def reference_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018, eq. 3: unbiased MMD^2, k(x, y) = (x.y / d + 1)^3."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def reference_kid(a: np.ndarray, b: np.ndarray, subsets: int, size: int, seed: int) -> float:
    """The mean MMD^2 over ``subsets`` random subsets (numpy's generator) of each set."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    return float(np.mean([reference_mmd(a[rng.choice(len(a), m, replace=False)],
                                        b[rng.choice(len(b), m, replace=False)])
                          for _ in range(subsets)]))


def feature_sets(seed: int, n: int = 600, d: int = 32, shift: float = 0.3, scale: float = 1.2):
    """A real-like set (correlated Gaussian, positive like ReLU features) and a generated
    set off by a shift and a scale."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    real = np.maximum(rng.normal(size=(n, d)) @ mix + 0.5, 0)
    fake = np.maximum((rng.normal(size=(n, d)) * scale + shift) @ mix + 0.5, 0)
    return real, fake


@pytest.mark.parametrize("seed,n,d,shift,scale", [
    (0, 600, 32, 0.3, 1.2), (1, 900, 64, 0.05, 1.0), (2, 400, 16, 1.0, 0.7),
    (3, 50, 64, 0.2, 1.1),  # fewer rows than features: singular covariances
])
def test_fid_agrees_with_the_reference_within_1_percent(seed, n, d, shift, scale):
    real, fake = feature_sets(seed, n, d, shift, scale)
    ours, ref = fid(real, fake), reference_fid(real, fake)
    assert ours == pytest.approx(ref, rel=0.01)
    assert fid(real, real) == pytest.approx(0, abs=1e-6 * ref)


@pytest.mark.parametrize("seed,shift,scale", [(0, 0.3, 1.2), (1, 0.5, 1.0), (2, 1.0, 0.7)])
def test_kid_agrees_with_the_reference_within_5_percent(seed, shift, scale):
    real, fake = feature_sets(seed, 900, 32, shift, scale)
    ours, ref = kid(real, fake, 50, 500, seed), reference_kid(real, fake, 50, 500, seed)
    assert ours == pytest.approx(ref, rel=0.05)


def test_kid_on_the_same_subsets_is_the_reference_mmd():
    """The subsets torchmetrics draws (torch's generator seeded with the seed: per subset a
    permutation of the real rows, then of the generated rows) scored by the reference."""
    real, fake = feature_sets(4, 300, 16, 0.4, 1.1)
    subsets, size, seed = 5, 100, 7
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=gen)[:size].numpy()]
        y = fake[torch.randperm(len(fake), generator=gen)[:size].numpy()]
        values.append(reference_mmd(x, y))
    assert kid(real, fake, subsets, size, seed) == pytest.approx(np.mean(values), rel=1e-9)


def test_kid_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    real, fake = feature_sets(5, 300, 16)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = kid(real, fake, 10, 100, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert kid(real, fake, 10, 100, seed=3) == first
    assert kid(real, fake, 10, 100, seed=4) != first
    torch.manual_seed(999)  # another global state: the same value
    assert kid(real, fake, 10, 100, seed=3) == first


def test_kid_subsets_are_at_most_the_sets():
    """A subset size above the sets' sizes: subsets of the smaller size (here every row)."""
    real, fake = feature_sets(6, 12, 8)
    assert kid(real, fake, 3, 500, 0) == pytest.approx(reference_mmd(real, fake), rel=1e-9)
    assert np.isfinite(kid(real, fake[:5], 3, 500, 0))


def test_torchmetrics_never_probes_the_given_features():
    """``num_features`` spares the module a 299x299 probe image: it sees only features."""
    seen = []

    class Recording(Given):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=Recording(8))
    assert seen == []
    metric.update(torch.rand(5, 8, dtype=torch.float64), real=True)
    assert seen == [(5, 8)]
