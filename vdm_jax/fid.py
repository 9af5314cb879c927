"""Sample quality from Inception features: FID, KID and the Inception Score (docs/math.md §7).

    stats = FeatureStatistics()
    for batch in batches:
        stats.update(features_of(batch)["pool"])           # [B, 2048], accumulated in float64
    fid = frechet_distance(*stats.mean_and_covariance(), *load_statistics("cifar10_train.npz"))

The features come from the FID Inception network (`vdm_jax.models.inception`). These functions
are NumPy in float64 on the host: they run once per evaluation, on at most a few hundred MB of
features, where float64 matters more than speed. Statistics files are pytorch-fid's `.npz`
(`mu` [D], `sigma` [D, D]), so published reference statistics can be reused.
"""
from __future__ import annotations

import os

import numpy as np

from vdm_jax._files import atomic_write

__all__ = ["FeatureStatistics", "frechet_distance", "kernel_inception_distance", "inception_score",
           "sample_quality", "save_statistics", "load_statistics"]


def _features(name: str, x, *, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be features [N, D], got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point, got {x.dtype}.")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got {x.shape[0]}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values.")
    return x.astype(np.float64)


class FeatureStatistics:
    """The mean and covariance of features seen in batches, exactly, in float64.

    Batches are merged by Chan et al.'s pairwise update (each batch's own mean and centred
    scatter, then the shift between means), so the result equals `np.cov` of all the rows at once
    without the cancellation of accumulating raw second moments.
    """

    def __init__(self):
        self.count = 0
        self._mean = None
        self._scatter = None  # sum of (x - mean)(x - mean)^T

    def update(self, features) -> "FeatureStatistics":
        x = _features("features", features)
        n, mean = x.shape[0], x.mean(axis=0)
        centred = x - mean
        scatter = centred.T @ centred
        if self.count == 0:
            self.count, self._mean, self._scatter = n, mean, scatter
            return self
        if x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"features must have {self._mean.shape[0]} columns like the earlier batches, "
                             f"got {x.shape[1]}.")
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self.count = total
        return self

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]): the mean and the unbiased covariance (`np.cov(rowvar=False)`)."""
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 feature rows, got {self.count}.")
        return self._mean.copy(), self._scatter / (self.count - 1)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception features):

        |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½).

    tr((Σ1 Σ2)^½) is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½, which has the
    same eigenvalues as Σ1 Σ2 and stays real and well conditioned where a general `sqrtm` of the
    non-symmetric product needs an offset (pytorch-fid adds εI when it fails).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    for name, mu, sigma in (("mu1/sigma1", mu1, sigma1), ("mu2/sigma2", mu2, sigma2)):
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"{name} must be a mean [D] and a covariance [D, D], got {mu.shape} and {sigma.shape}.")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise ValueError(f"{name} has non-finite values.")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}.")
    root1 = _sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def kernel_inception_distance(features1, features2, *, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with the kernel k(x, y) = (γ x·y + c)^d,
    γ = 1/D by default, averaged over `subsets` random subsets of `subset_size` rows of each set
    (drawn without replacement). Returns (mean, standard deviation over subsets).

    The defaults and the subset draws (`np.random.RandomState(seed).choice`, first set then
    second) are torch-fidelity's, so the same features give its number.
    """
    x, y = _features("features1", features1), _features("features2", features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features1 and features2 must have the same dimension, got {x.shape[1]} and {y.shape[1]}.")
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be a positive int, got {subsets!r}.")
    if not isinstance(subset_size, int) or not 2 <= subset_size <= min(len(x), len(y)):
        raise ValueError(f"subset_size must be an int in [2, {min(len(x), len(y))}] (the smaller set's size), "
                         f"got {subset_size!r}.")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    m = subset_size
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_aa, k_bb, k_ab = ((u @ v.T * gamma + coef0) ** degree for u, v in ((a, a), (b, b), (a, b)))
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        mmds[i] = within - 2.0 * k_ab.mean()
    return float(mmds.mean()), float(mmds.std())


def inception_score(logits, *, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """The Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)), p(y) the split's mean
    of p(y|x) = softmax(logits), over `splits` equal splits. Returns (mean, std over splits).

    Use the network's 'logits_unbiased' (pool · W, no bias), as the original code and
    torch-fidelity do; rows are shuffled by `np.random.RandomState(seed).permutation` first, as
    torch-fidelity does.
    """
    z = _features("logits", logits)
    if not isinstance(splits, int) or not 1 <= splits <= len(z):
        raise ValueError(f"splits must be an int in [1, {len(z)}] (the number of rows), got {splits!r}.")
    if shuffle:
        z = z[np.random.RandomState(seed).permutation(len(z))]
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    n, scores = len(z), []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(chunk)
        with np.errstate(divide="ignore", invalid="ignore"):  # a class no row predicts: p log p = 0
            kl = np.where(p > 0, p * (chunk - np.log(p.mean(axis=0))), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def sample_quality(features, reference, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                   is_splits: int = 10) -> dict:
    """FID against `reference`, KID where the reference is features, and the Inception Score.

    Args:
      features: the images' features, {'pool': [N, 2048], 'logits_unbiased': [N, 1008]}
        (`vdm_jax.training.inception_features`).
      reference: the same for the reference images, or their statistics (mu, sigma), e.g.
        `load_statistics(path)` (a statistics file has no features: KID is then not computed).
      kid_subsets, kid_subset_size: KID's subsets; the size is capped at the smaller set's.
      is_splits: the Inception Score's splits (capped at N).

    Returns {'fid', 'kid', 'kid_std', 'inception_score', 'inception_score_std', 'num_images',
    'num_reference'} (KID's entries and 'num_reference' are None with statistics as the reference).
    """
    mu, sigma = FeatureStatistics().update(features["pool"]).mean_and_covariance()
    result = {"num_images": int(len(features["pool"])), "num_reference": None, "kid": None, "kid_std": None}
    if isinstance(reference, tuple):
        ref_mu, ref_sigma = reference
    else:
        ref_mu, ref_sigma = FeatureStatistics().update(reference["pool"]).mean_and_covariance()
        size = min(kid_subset_size, len(features["pool"]), len(reference["pool"]))
        result["kid"], result["kid_std"] = kernel_inception_distance(
            features["pool"], reference["pool"], subsets=kid_subsets, subset_size=size)
        result["num_reference"] = int(len(reference["pool"]))
    result["fid"] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    result["inception_score"], result["inception_score_std"] = inception_score(
        features["logits_unbiased"], splits=min(is_splits, len(features["logits_unbiased"])))
    return result


def save_statistics(path: str, mu, sigma) -> None:
    """Writes pytorch-fid's statistics file (`mu` [D], `sigma` [D, D], float64 .npz), atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
    with atomic_write(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a statistics file in pytorch-fid's format (no pickles are read)."""
    with np.load(os.path.expanduser(path), allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} is not a statistics file: it must hold 'mu' and 'sigma', it holds {sorted(f)}.")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
    return mu, sigma
