"""FID, KID and IS (vdm_jax.fid) against closed forms, scipy, pytorch-fid and torch-fidelity."""
import numpy as np
import pytest

from vdm_jax import fid


def _gaussian_features(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix * scale + shift).astype(np.float32)


def test_statistics_in_batches_equal_numpy_on_all_rows():
    rng = np.random.default_rng(0)
    x = _gaussian_features(rng, 1003, 16, shift=1e4)  # a large offset: raw second moments would cancel
    stats = fid.FeatureStatistics()
    for lo, hi in ((0, 1), (1, 500), (500, 503), (503, 1003)):  # uneven batches, one of a single row
        stats.update(x[lo:hi])
    mu, sigma = stats.mean_and_covariance()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.count == 1003


def test_frechet_distance_closed_form_of_two_gaussians():
    # Commuting covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2, here in a rotated basis.
    rng = np.random.default_rng(1)
    d = 32
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # Non-commuting 1x1 blocks reduce to the scalar case; identical Gaussians are at distance 0.
    s = q @ np.diag(a) @ q.T
    assert abs(fid.frechet_distance(m1, s, m1, s)) < 1e-10 * np.trace(s)


def test_frechet_distance_matches_scipy_sqrtm_on_random_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    x, y = _gaussian_features(rng, 400, 64), _gaussian_features(rng, 300, 64, shift=0.3, scale=1.2)
    mu1, s1 = x.mean(0).astype(np.float64), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0).astype(np.float64), np.cov(y, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), reference, rtol=1e-8)


def test_frechet_distance_matches_pytorch_fid(import_peer):
    fid_score = import_peer("pytorch_fid.fid_score")
    rng = np.random.default_rng(3)
    x, y = _gaussian_features(rng, 500, 48), _gaussian_features(rng, 500, 48, shift=0.1)
    mu1, s1 = np.mean(x, 0), np.cov(x, rowvar=False)
    mu2, s2 = np.mean(y, 0), np.cov(y, rowvar=False)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2),
                               fid_score.calculate_frechet_distance(mu1, s1, mu2, s2), rtol=1e-7)


def test_fid_of_a_set_against_itself_is_zero_and_rank_deficient_covariances_work():
    rng = np.random.default_rng(4)
    x = _gaussian_features(rng, 40, 64)  # N < D: sigma has rank 39, sqrtm of the product is singular
    mu, sigma = fid.FeatureStatistics().update(x).mean_and_covariance()
    # The 25 zero eigenvalues come out as ±1e-16 and their square roots as 1e-8: sqrt(eps)-level.
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    y = _gaussian_features(rng, 40, 64, shift=0.5)
    mu2, sigma2 = fid.FeatureStatistics().update(y).mean_and_covariance()
    d = fid.frechet_distance(mu, sigma, mu2, sigma2)
    assert np.isfinite(d) and d > 0


def test_kid_matches_torch_fidelity_and_is_unbiased(import_peer):
    metric_kid = import_peer("torch_fidelity.metric_kid")
    torch = import_peer("torch")
    rng = np.random.default_rng(5)
    x, y = _gaussian_features(rng, 300, 32), _gaussian_features(rng, 250, 32, shift=0.2)
    mean, std = fid.kernel_inception_distance(x, y, subsets=20, subset_size=100)
    ref = metric_kid.kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=20,
                                            kid_subset_size=100, verbose=False)
    np.testing.assert_allclose(mean, ref["kernel_inception_distance_mean"], rtol=1e-4)
    np.testing.assert_allclose(std, ref["kernel_inception_distance_std"], rtol=1e-3)
    # Same distribution: the unbiased estimate averages to 0 (within its standard error).
    a, b = np.split(_gaussian_features(rng, 4000, 32), 2)
    same, same_std = fid.kernel_inception_distance(a, b, subsets=50, subset_size=200)
    assert abs(same) < 4 * same_std / np.sqrt(50) + 1e-12
    assert mean > 10 * same_std


def test_inception_score_closed_forms_and_torch_fidelity(import_peer):
    # Uniform predictions: IS = 1. Confident predictions spread evenly over K classes: IS = K.
    assert fid.inception_score(np.zeros((100, 10)), splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    k = 8
    confident = np.full((k * 16, 1008), -1e3)
    confident[np.arange(k * 16), np.arange(k * 16) % k] = 0.0
    mean, std = fid.inception_score(confident, splits=1)
    assert mean == pytest.approx(k, rel=1e-9) and std == 0.0
    metric_isc = import_peer("torch_fidelity.metric_isc")
    torch = import_peer("torch")
    logits = np.random.default_rng(6).normal(size=(500, 1008)) * 3
    ref = metric_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10)
    got = fid.inception_score(logits, splits=10)
    np.testing.assert_allclose(got, (ref["inception_score_mean"], ref["inception_score_std"]), rtol=1e-10)


def test_statistics_file_round_trip_in_pytorch_fids_format(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=8), np.eye(8) * 2
    path = str(tmp_path / "sub" / "stats.npz")
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as f:
        assert sorted(f) == ["mu", "sigma"]
    got_mu, got_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="not a statistics file.*'images'"):
        fid.load_statistics(str(tmp_path / "images.npz"))


@pytest.mark.parametrize("call, match", [
    (lambda: fid.FeatureStatistics().update(np.zeros(5)), "features must be features"),
    (lambda: fid.FeatureStatistics().update(np.zeros((2, 3), np.int32)), "features must be floating"),
    (lambda: fid.FeatureStatistics().update(np.full((2, 3), np.nan)), "non-finite"),
    (lambda: fid.FeatureStatistics().update(np.zeros((2, 3))).update(np.zeros((2, 4))), "3 columns"),
    (lambda: fid.FeatureStatistics().update(np.zeros((1, 3))).mean_and_covariance(), "at least 2"),
    (lambda: fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), "mu1/sigma1"),
    (lambda: fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "different dimensions"),
    (lambda: fid.kernel_inception_distance(np.zeros((10, 3)), np.zeros((10, 3)), subset_size=11), "subset_size"),
    (lambda: fid.kernel_inception_distance(np.zeros((10, 3)), np.zeros((10, 4)), subset_size=5), "same dimension"),
    (lambda: fid.inception_score(np.zeros((10, 3)), splits=11), "splits"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
