"""Schedules (MATH.md §1): closed forms, precision, monotonicity, bad input."""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import vdm_jax as vj


def test_linear_betas_values():
    betas = np.asarray(vj.linear_betas(1000))
    assert betas.shape == (1000,)
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-3)


def test_cosine_betas_match_nichol_formula():
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(T + 1)
    alpha_bar = f(t) / f(0)
    expected = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    np.testing.assert_allclose(np.asarray(vj.cosine_betas(T), np.float64), expected, rtol=1e-5)


def test_discrete_schedule_quantities(x64):
    betas = vj.linear_betas(1000, dtype=jnp.float64)
    sched = vj.DiscreteSchedule(betas)
    b = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - b)
    assert sched.T == 1000
    np.testing.assert_allclose(sched.betas, b, rtol=1e-14)
    np.testing.assert_allclose(sched.alphas, 1 - b, rtol=1e-14)
    np.testing.assert_allclose(sched.alpha_bars, abar, rtol=1e-12)
    gamma = jax.jit(sched.gamma)(jnp.arange(1, 1001))
    np.testing.assert_allclose(gamma, np.log((1 - abar) / abar), rtol=1e-10)
    assert np.isneginf(sched.gamma(0))


def test_discrete_gamma_keeps_precision_in_float32():
    """γ_1 = log(β_1/(1-β_1)): forming 1 - ᾱ by subtraction in float32 would lose ~3 digits."""
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    assert sched.gamma(1).dtype == jnp.float32
    exact = np.log(1e-4 / (1 - 1e-4))
    np.testing.assert_allclose(float(sched.gamma(1)), exact, rtol=1e-6)
    alpha, sigma = vj.alpha_sigma(sched.gamma(1))
    np.testing.assert_allclose(float(sigma) ** 2, 1e-4, rtol=1e-5)


@pytest.mark.parametrize("betas_fn", [vj.linear_betas, vj.cosine_betas])
def test_discrete_schedule_read_as_continuous(betas_fn):
    sched = vj.DiscreteSchedule(betas_fn(1000))
    cont = sched.as_continuous()
    i = jnp.arange(0, 1001)
    t = i.astype(jnp.float32) / 1000
    np.testing.assert_allclose(jax.jit(cont)(t[1:]), sched.gamma(i[1:]), rtol=2e-5, atol=2e-5)
    assert np.isneginf(cont(jnp.float32(0.0)))
    fine = cont(jnp.linspace(1e-4, 1.0, 20001))
    assert np.all(np.diff(np.asarray(fine)) > 0), "γ must increase strictly between grid points too"


def test_discrete_schedule_is_a_pytree():
    sched = vj.DiscreteSchedule(vj.linear_betas(50))
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.T == 50
    out = jax.jit(lambda s, t: s.gamma(t))(sched, jnp.int32(7))
    np.testing.assert_allclose(out, sched.gamma(7), rtol=1e-6)


def test_discrete_gamma_traced_out_of_range_is_nan_not_wrong():
    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    out = jax.jit(sched.gamma)(jnp.array([-1, 0, 10, 11]))
    assert np.isnan(out[0]) and np.isnan(out[3])
    assert np.isneginf(out[1]) and np.isfinite(out[2])


def test_from_alpha_bars_round_trip(x64):
    sched = vj.DiscreteSchedule(vj.cosine_betas(100, dtype=jnp.float64))
    back = vj.DiscreteSchedule.from_alpha_bars(sched.alpha_bars)
    np.testing.assert_allclose(back.betas, sched.betas, rtol=1e-9)


@pytest.mark.parametrize("sched", [vj.LinearSchedule(), vj.CosineSchedule(), vj.LinearSchedule(-10.0, 8.0)])
def test_continuous_schedules_endpoints_and_monotone(sched):
    t = jnp.linspace(0.0, 1.0, 10001)
    g = np.asarray(jax.jit(sched)(t))
    np.testing.assert_allclose(g[[0, -1]], [sched.gamma_min, sched.gamma_max], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(g) > 0)


def test_linear_schedule_derivative_by_jvp():
    sched = vj.LinearSchedule(-13.3, 5.0)
    _, d = jax.jvp(sched, (jnp.full((3,), 0.3),), (jnp.ones((3,)),))
    np.testing.assert_allclose(d, 18.3, rtol=1e-6)


def test_cosine_schedule_matches_nichol_limit():
    """Between its end points, the continuous cosine is γ = 2 log tan(πu/2), i.e. ᾱ = cos²(πu/2)."""
    sched = vj.CosineSchedule(-13.3, 5.0)
    t = jnp.linspace(0.0, 1.0, 11)
    u0 = 2 / np.pi * np.arctan(np.exp(-13.3 / 2))
    u1 = 2 / np.pi * np.arctan(np.exp(5.0 / 2))
    u = u0 + (u1 - u0) * np.asarray(t, np.float64)
    abar = np.cos(np.pi * u / 2) ** 2
    np.testing.assert_allclose(sched(t), np.log((1 - abar) / abar), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_learned_schedule_strictly_monotone_for_random_params(seed):
    sched = vj.LearnedSchedule(-13.3, 5.0, hidden=64, rngs=nnx.Rngs(seed))
    # Randomise every parameter, including the end points and the linear term.
    graphdef, state = nnx.split(sched)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [l + 2.0 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    sched = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    t = jnp.linspace(0.0, 1.0, 20001)
    g = np.asarray(sched(t))
    assert np.all(np.isfinite(g))
    assert np.all(np.diff(g) > 0)
    _, d = jax.jvp(sched, (t,), (jnp.ones_like(t),))
    assert np.all(np.asarray(d) > 0)


def test_learned_schedule_endpoints_are_learnable():
    sched = vj.LearnedSchedule(-13.3, 5.0, hidden=16, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(sched(jnp.array([0.0, 1.0])), [-13.3, 5.0], rtol=1e-5)
    graphdef, state = nnx.split(sched)

    def ends(state):
        g = nnx.merge(graphdef, state)(jnp.array([0.0, 1.0]))
        return g[1] - g[0]

    grads = jax.grad(ends)(state)
    assert float(jnp.abs(grads["endpoints"]["raw_gap"][...])) > 0.1
    assert float(jnp.abs(grads["endpoints"]["gamma_0"][...])) == 0.0  # the gap does not depend on γ_0
    g0 = jax.grad(lambda s: nnx.merge(graphdef, s)(jnp.float32(0.0)))(state)
    np.testing.assert_allclose(g0["endpoints"]["gamma_0"][...], 1.0, rtol=1e-6)


def test_alpha_sigma_stable_at_extremes():
    gamma = jnp.array([-jnp.inf, -30.0, -15.0, 0.0, 15.0, 30.0, jnp.inf], jnp.float32)
    alpha, sigma = jax.jit(vj.alpha_sigma)(gamma)
    assert not np.any(np.isnan(alpha)) and not np.any(np.isnan(sigma))
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(sigma[1] ** 2, np.exp(-30.0), rtol=1e-5)  # full relative precision
    np.testing.assert_allclose(alpha[5] ** 2, np.exp(-30.0), rtol=1e-5)
    np.testing.assert_allclose([alpha[0], sigma[0], alpha[-1], sigma[-1]], [1, 0, 0, 1])
    np.testing.assert_allclose(vj.snr(jnp.float32(2.0)), np.exp(-2.0), rtol=1e-6)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [0, -5])
def test_T_below_one(T):
    with pytest.raises(ValueError, match="T must be >= 1"):
        vj.linear_betas(T)
    with pytest.raises(ValueError, match="T must be >= 1"):
        vj.cosine_betas(T)


def test_T_not_int():
    with pytest.raises(TypeError, match="T must be an int"):
        vj.linear_betas(10.5)


def test_beta_start_after_end():
    with pytest.raises(ValueError, match="beta_start must be <= beta_end"):
        vj.linear_betas(10, 0.02, 1e-4)


@pytest.mark.parametrize("start,end", [(0.0, 0.02), (1e-4, 1.0), (-0.1, 0.02)])
def test_betas_outside_unit_interval_in_factory(start, end):
    with pytest.raises(ValueError, match="beta_(start|end) must be in \\(0, 1\\)"):
        vj.linear_betas(10, start, end)


@pytest.mark.parametrize("bad", [[0.1, 0.0, 0.2], [0.1, 1.0], [0.1, float("nan")], [0.5, 1.5]])
def test_discrete_schedule_rejects_betas_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="betas must lie in the open interval"):
        vj.DiscreteSchedule(jnp.asarray(bad))


def test_discrete_schedule_rejects_2d_betas():
    with pytest.raises(ValueError, match="betas must be a 1-D array"):
        vj.DiscreteSchedule(jnp.full((3, 3), 0.1))


def test_non_monotone_alpha_bars():
    with pytest.raises(ValueError, match="alpha_bars must be strictly decreasing"):
        vj.DiscreteSchedule.from_alpha_bars([0.9, 0.8, 0.85])


@pytest.mark.parametrize("cls", [vj.LinearSchedule, vj.CosineSchedule])
def test_non_monotone_gamma(cls):
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        cls(5.0, -13.3)
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        cls(1.0, 1.0)


def test_learned_schedule_non_monotone_endpoints():
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        vj.LearnedSchedule(5.0, -1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("t", [-1, 11, [3, 12]])
def test_integer_t_out_of_range(t):
    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    with pytest.raises(ValueError, match=r"t must lie in 0..T = 0..10"):
        sched.gamma(jnp.asarray(t))


def test_float_t_to_discrete_gamma():
    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    with pytest.raises(TypeError, match="t must be an integer step"):
        sched.gamma(jnp.float32(0.5))


@pytest.mark.parametrize("t", [-0.1, 1.5])
def test_continuous_t_out_of_range(t):
    for sched in (vj.LinearSchedule(), vj.CosineSchedule(), vj.DiscreteSchedule(vj.linear_betas(10)).as_continuous()):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            sched(jnp.float32(t))


def test_alpha_sigma_rejects_integers():
    with pytest.raises(TypeError, match="gamma must be a floating-point array"):
        jax.jit(vj.alpha_sigma)(jnp.int32(3))
    with pytest.raises(TypeError, match="gamma must be a floating-point array, got str"):
        vj.alpha_sigma("3.0")


@pytest.mark.parametrize("make, error, match", [
    (lambda: vj.linear_betas(10, "1e-4"), TypeError, "beta_start must be a real number, got '1e-4'"),
    (lambda: vj.linear_betas(10, 1e-4, None), TypeError, "beta_end must be a real number, got None"),
    (lambda: vj.cosine_betas(10, max_beta=1.0), ValueError, r"max_beta must be in \(0, 1\), got 1.0"),
    (lambda: vj.cosine_betas(True), TypeError, "T must be an int, got True"),
    (lambda: vj.LinearSchedule("-13", 5.0), TypeError, "gamma_min must be a real number"),
    (lambda: vj.CosineSchedule(-13.3, float("inf")), ValueError, "gamma_max must be finite, got inf"),
    (lambda: vj.LearnedSchedule(hidden=0, rngs=nnx.Rngs(0)), ValueError, "hidden must be >= 1, got 0"),
    (lambda: vj.DiscreteSchedule.from_alpha_bars([0.9, 0.0]), ValueError,
     r"alpha_bars must lie in \(0, 1\]; alpha_bars\[1\] \(step t=2\) is 0.0"),
])
def test_bad_schedule_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("sched", [vj.LinearSchedule(), vj.DiscreteSchedule(vj.linear_betas(10)).as_continuous()])
def test_integer_t_to_continuous_schedule_inside_jit(sched):
    with pytest.raises(TypeError, match="t must be a floating-point array, got dtype int32"):
        jax.jit(sched)(jnp.int32(1))


def test_float_t_to_discrete_gamma_inside_jit():
    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    with pytest.raises(TypeError, match="t must be an integer step in 0..T"):
        jax.jit(sched.gamma)(jnp.float32(0.5))


def test_schedule_jit_traces_once():
    sched = vj.LinearSchedule()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(t):
        return sched(t)

    f(jnp.linspace(0, 1, 4))
    f(jnp.linspace(0, 0.5, 4))
