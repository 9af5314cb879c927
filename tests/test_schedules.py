"""Schedules (docs/math.md §1): closed forms, precision, monotonicity, bad input."""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import vdm_jax as vj


def test_linear_betas_values():
    betas = vj.linear_betas(1000)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-3)


def test_cosine_betas_match_nichol_formula():
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(T + 1)
    alpha_bar = f(t) / f(0)
    expected = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    betas = vj.cosine_betas(T)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64
    np.testing.assert_allclose(betas, expected, rtol=1e-5)


def test_discrete_schedule_quantities(x64):
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    assert sched.dtype == jnp.float64
    b = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - b)
    assert sched.T == 1000
    np.testing.assert_allclose(sched.betas, b, rtol=1e-14)
    np.testing.assert_allclose(sched.alphas, 1 - b, rtol=1e-14)
    np.testing.assert_allclose(sched.alpha_bars, abar, rtol=1e-12)
    gamma = jax.jit(sched.gamma_step)(jnp.arange(1, 1001))
    np.testing.assert_allclose(gamma, np.log((1 - abar) / abar), rtol=1e-10)
    assert np.isneginf(sched.gamma_step(0))
    np.testing.assert_allclose(sched.gammas[1:], gamma, rtol=1e-14)


def test_discrete_gamma_keeps_precision_in_float32():
    """γ_1 = log(β_1/(1-β_1)): forming 1 - ᾱ by subtraction in float32 would lose ~3 digits."""
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    assert sched.dtype == jnp.float32 and sched.gamma_step(1).dtype == jnp.float32
    exact = np.log(1e-4 / (1 - 1e-4))
    np.testing.assert_allclose(float(sched.gamma_step(1)), exact, rtol=1e-6)
    np.testing.assert_allclose(float(sched(jnp.float32(1 / 1000))), exact, rtol=1e-6)
    alpha, sigma = vj.alpha_sigma(sched.gamma_step(1))
    np.testing.assert_allclose(float(sigma) ** 2, 1e-4, rtol=1e-5)


@pytest.mark.parametrize("betas_fn", [vj.linear_betas, vj.cosine_betas])
def test_discrete_schedule_is_a_function_of_t(betas_fn):
    """γ(i/T) = γ_i, and γ increases strictly between the grid points too."""
    sched = vj.DiscreteSchedule(betas_fn(1000))
    i = jnp.arange(0, 1001)
    t = i.astype(jnp.float32) / 1000
    np.testing.assert_allclose(jax.jit(sched)(t[1:]), sched.gamma_step(i[1:]), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(sched.gamma(t[1:]), sched(t[1:]))
    assert np.isneginf(sched(jnp.float32(0.0)))
    fine = sched(jnp.linspace(1e-4, 1.0, 20001))
    assert np.all(np.diff(np.asarray(fine)) > 0), "γ must increase strictly between grid points too"


def test_discrete_schedule_is_a_pytree():
    sched = vj.DiscreteSchedule(vj.linear_betas(50))
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.T == 50
    out = jax.jit(lambda s, i: s.gamma_step(i))(sched, jnp.int32(7))
    np.testing.assert_allclose(out, sched.gamma_step(7), rtol=1e-6)
    out = jax.jit(lambda s, t: s(t))(sched, jnp.float32(7 / 50))
    np.testing.assert_allclose(out, sched.gamma_step(7), rtol=1e-6)


def test_discrete_gamma_traced_out_of_range_is_nan_not_wrong():
    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    out = jax.jit(sched.gamma_step)(jnp.array([-1, 0, 10, 11]))
    assert np.isnan(out[0]) and np.isnan(out[3])
    assert np.isneginf(out[1]) and np.isfinite(out[2])
    out = jax.jit(sched)(jnp.array([-0.1, 0.0, 1.0, 1.1]))
    assert np.isnan(out[0]) and np.isnan(out[3])
    assert np.isneginf(out[1]) and np.isfinite(out[2])


def test_from_alpha_bars_round_trip(x64):
    sched = vj.DiscreteSchedule(vj.cosine_betas(100))
    back = vj.DiscreteSchedule.from_alpha_bars(sched.alpha_bars)  # a jax.Array: built with jnp
    np.testing.assert_allclose(back.betas, sched.betas, rtol=1e-9)
    back = vj.DiscreteSchedule.from_alpha_bars(np.asarray(sched.alpha_bars))  # host: checked, float64
    np.testing.assert_allclose(back.betas, sched.betas, rtol=1e-9)
    assert back.dtype == jnp.float64


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


def _linear(w, b):
    """A LearnedLinearSchedule with these parameters."""
    sched = vj.LearnedLinearSchedule()
    sched.w[...], sched.b[...] = jnp.float32(w), jnp.float32(b)
    return sched


def test_learned_linear_schedule_is_the_official_line():
    """google-research/vdm `NoiseSchedule_Scalar`: γ(t) = b + |w| t, b = γ_min, w = γ_max - γ_min."""
    sched = vj.LearnedLinearSchedule(-13.3, 5.0)
    state = nnx.state(sched, nnx.Param)
    assert sorted(state.keys()) == ["b", "w"]  # (the names the checkpoint importer maps onto)
    for name, init in (("w", 18.3), ("b", -13.3)):
        value = state[name][...]
        assert value.shape == () and value.dtype == jnp.float32
        assert float(value) == np.float32(init)
    t = jnp.linspace(0.0, 1.0, 10001)
    g = np.asarray(jax.jit(sched)(t))
    np.testing.assert_allclose(g[[0, -1]], [-13.3, 5.0], rtol=1e-6)  # the end points are the initial ones
    np.testing.assert_allclose(g, np.float32(-13.3) + np.float32(18.3) * np.asarray(t, np.float64), rtol=1e-6,
                               atol=1e-5)
    assert np.all(np.diff(g) > 0)
    np.testing.assert_array_equal(sched.gamma(t), sched(t))
    np.testing.assert_allclose(vj.LearnedLinearSchedule(-10.0, 8.0)(jnp.array([0.0, 1.0])), [-10.0, 8.0])


@pytest.mark.parametrize("w, b", [(18.3, -13.3), (-4.0, 2.0), (0.5, -30.0), (-25.0, -1.0)])
def test_learned_linear_schedule_monotone_for_any_params(w, b):
    """γ' = |w| >= 0 whatever the sign of w: strictly increasing for w != 0, end points b and b + |w|."""
    sched = _linear(w, b)
    t = jnp.linspace(0.0, 1.0, 20001)
    g = np.asarray(jax.jit(sched)(t))
    assert np.all(np.diff(g) > 0)
    np.testing.assert_allclose(g[[0, -1]], [b, b + abs(w)], rtol=1e-6)
    _, d = jax.jvp(sched, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(d, abs(np.float32(w)), rtol=1e-6)
    flat = np.asarray(_linear(0.0, b)(t))  # w = 0: constant (non-decreasing, not strictly)
    np.testing.assert_array_equal(flat, np.float32(b))


@pytest.mark.parametrize("w", [18.3, -3.5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_learned_linear_schedule_gradients_closed_form(w, dtype):
    """∂γ(t)/∂b = 1, ∂γ(t)/∂w = sign(w) t; for γ'(t) = |w|: sign(w) and 0 (jax.grad under jit).
    The parameters stay float32 under x64; γ(t) takes t's dtype."""
    with jax.enable_x64(dtype == "float64"):
        sched = _linear(w, -13.3)
        graphdef, state = nnx.split(sched)
        t = jnp.asarray([0.0, 0.1, 0.5, 0.73, 1.0], dtype)
        assert sched(t).dtype == dtype

        def gamma_at(state, u):
            return nnx.merge(graphdef, state)(u)

        for u in np.asarray(t):
            g = jax.jit(jax.grad(gamma_at))(state, jnp.asarray(u, dtype))
            np.testing.assert_allclose(g["b"][...], 1.0, rtol=1e-7)
            np.testing.assert_allclose(g["w"][...], np.sign(w) * u, rtol=1e-6, atol=1e-7)
            assert g["w"][...].dtype == g["b"][...].dtype == jnp.float32

        def slope(state):  # γ'(t) by jvp, at a batch of t
            _, d = jax.jvp(lambda u: gamma_at(state, u), (t,), (jnp.ones_like(t),))
            return d.sum()

        g = jax.jit(jax.grad(slope))(state)
        np.testing.assert_allclose(g["w"][...], np.sign(w) * t.shape[0], rtol=1e-7)
        np.testing.assert_allclose(g["b"][...], 0.0, atol=0.0)
        # Both through a batch: ∇ Σ_i γ(t_i) = (Σ sign(w) t_i, B).
        g = jax.jit(jax.grad(lambda s: gamma_at(s, t).sum()))(state)
        np.testing.assert_allclose(g["w"][...], np.sign(w) * np.asarray(t).sum(), rtol=1e-6)
        np.testing.assert_allclose(g["b"][...], t.shape[0], rtol=1e-7)


def test_alpha_sigma_stable_at_extremes():
    gamma = jnp.array([-jnp.inf, -30.0, -15.0, 0.0, 15.0, 30.0, jnp.inf], jnp.float32)
    alpha, sigma = jax.jit(vj.alpha_sigma)(gamma)
    assert not np.any(np.isnan(alpha)) and not np.any(np.isnan(sigma))
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(sigma[1] ** 2, np.exp(-30.0), rtol=1e-5)  # full relative precision
    np.testing.assert_allclose(alpha[5] ** 2, np.exp(-30.0), rtol=1e-5)
    np.testing.assert_allclose([alpha[0], sigma[0], alpha[-1], sigma[-1]], [1, 0, 0, 1])
    np.testing.assert_allclose(vj.snr(jnp.float32(2.0)), np.exp(-2.0), rtol=1e-6)


# --- bad input: one table per public entry point ----------------------------------------------
# (fn, args, kwargs, error, message regex); each row is checked eagerly and under jax.jit.

SCHED = vj.DiscreteSchedule(vj.linear_betas(10))

ERRORS = {
    vj.linear_betas: [
        ((0,), {}, ValueError, "linear_betas: T must be >= 1, got 0"),
        ((-5,), {}, ValueError, "T must be >= 1"),
        ((10.5,), {}, TypeError, r"T must be an int, got 10.5 \(float\)"),
        ((True,), {}, TypeError, "T must be an int, got True"),
        ((10, 0.02, 1e-4), {}, ValueError, "linear_betas: beta_start must be <= beta_end"),
        ((10, 0.0, 0.02), {}, ValueError, r"linear_betas: beta_start must be a real number in \(0, 1\), got 0.0"),
        ((10, -0.1, 0.02), {}, ValueError, r"beta_start must be a real number in \(0, 1\)"),
        ((10, 1e-4, 1.0), {}, ValueError, r"beta_end must be a real number in \(0, 1\)"),
        ((10, "1e-4"), {}, ValueError, "beta_start must be a real number in .*, got '1e-4'"),
        ((10, 1e-4, None), {}, ValueError, "beta_end must be a real number in .*, got None"),
        ((10, jnp.float32(1e-4)), {}, ValueError, r"beta_start must be a real number .*got float32 of shape \(\)"),
    ],
    vj.cosine_betas: [
        ((0,), {}, ValueError, "cosine_betas: T must be >= 1"),
        ((True,), {}, TypeError, "T must be an int, got True"),
        ((10,), {"max_beta": 1.0}, ValueError, r"cosine_betas: max_beta must be a real number in \(0, 1\), got 1.0"),
        ((10,), {"s": -0.1}, ValueError, "cosine_betas: s must be a real number >= 0, got -0.1"),
    ],
    vj.DiscreteSchedule: [
        (([0.1, 0.0, 0.2],), {}, ValueError, r"betas must lie in the open interval \(0, 1\); betas\[1\] \(step 2\)"),
        ((np.array([0.1, 1.0]),), {}, ValueError, "betas must lie in the open interval"),
        (([0.1, float("nan")],), {}, ValueError, "betas must lie in the open interval"),
        (([0.5, 1.5],), {}, ValueError, "betas must lie in the open interval"),
        ((np.full((3, 3), 0.1),), {}, ValueError, "betas must be a 1-D array"),
        ((jnp.full((3, 3), 0.1),), {}, ValueError, "betas must be a 1-D floating array"),
        (([],), {}, ValueError, r"betas must be a 1-D array of length T >= 1, got shape \(0,\)"),
    ],
    vj.DiscreteSchedule.from_alpha_bars: [
        (([0.9, 0.8, 0.85],), {}, ValueError,
         r"alpha_bars must be strictly decreasing in \(0, 1\) .*alpha_bars\[2\] \(step 3\) is 0.85"),
        (([0.9, 0.0],), {}, ValueError, r"strictly decreasing in \(0, 1\) .*alpha_bars\[1\] \(step 2\) is 0.0"),
        (([1.0, 0.5],), {}, ValueError, r"alpha_bars\[0\] \(step 1\) is 1.0"),  # β_1 = 0
        ((np.full((2, 2), 0.5),), {}, ValueError, r"alpha_bars must be a 1-D array of length T >= 1, got shape \(2, 2\)"),
        (([],), {}, ValueError, r"alpha_bars must be a 1-D array .*shape \(0,\)"),
    ],
    vj.LinearSchedule: [
        ((5.0, -13.3), {}, ValueError, "LinearSchedule: the schedule must be increasing .*gamma_min < gamma_max"),
        ((1.0, 1.0), {}, ValueError, "gamma_min < gamma_max"),
        (("-13", 5.0), {}, ValueError, "LinearSchedule: gamma_min must be a real number in .*, got '-13'"),
    ],
    vj.CosineSchedule: [
        ((5.0, -13.3), {}, ValueError, "CosineSchedule: the schedule must be increasing"),
        ((-13.3, float("inf")), {}, ValueError, r"gamma_max must be a real number in \(-inf, inf\), got inf"),
    ],
    vj.LearnedSchedule: [
        ((5.0, -1.0), {"rngs": nnx.Rngs(0)}, ValueError, "LearnedSchedule: the schedule must be increasing"),
        ((), {"hidden": 0, "rngs": nnx.Rngs(0)}, ValueError, "LearnedSchedule: hidden must be an int >= 1, got 0"),
    ],
    vj.LearnedLinearSchedule: [
        ((5.0, -13.3), {}, ValueError, "LearnedLinearSchedule: the schedule must be increasing .*gamma_min < gamma_max"),
        ((1.0, 1.0), {}, ValueError, "LearnedLinearSchedule: the schedule must be increasing"),
        (("-13", 5.0), {}, ValueError, "LearnedLinearSchedule: gamma_min must be a real number in .*, got '-13'"),
        ((-13.3, float("nan")), {}, ValueError, r"LearnedLinearSchedule: gamma_max must be a real number in \(-inf, inf\)"),
        ((None,), {}, ValueError, "LearnedLinearSchedule: gamma_min must be a real number .*, got None"),
    ],
}
CASES = [(fn, *row) for fn, rows in ERRORS.items() for row in rows]


def _id(fn):
    return getattr(fn, "__qualname__", type(fn).__name__)


@pytest.mark.parametrize("fn, args, kwargs, error, match", CASES,
                         ids=[f"{_id(c[0])}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments(fn, args, kwargs, error, match, raises):
    raises(fn, args, kwargs, error, match)


def test_device_values_out_of_range_are_nan_not_errors(no_host_reads):
    """A jax.Array is never read back to be checked: out-of-range values give NaN."""
    t = jax.device_put(jnp.array([-0.5, 0.5, 1.5]))
    with no_host_reads():
        outs = [s(t) for s in (vj.LinearSchedule(), vj.CosineSchedule(), SCHED,
                               vj.LearnedSchedule(hidden=4, rngs=nnx.Rngs(0)), vj.LearnedLinearSchedule())]
        outs.append(SCHED.gamma_step(jax.device_put(jnp.array([-1, 5, 11]))))
    for out in outs:
        assert np.isnan(out[0]) and np.isfinite(out[1]) and np.isnan(out[2])
    betas = vj.DiscreteSchedule(jax.device_put(jnp.array([0.1, 1.5])))  # not read back: no error
    assert np.isnan(betas.gammas[2])
    # Host times and steps alike: NaN outside [0, 1] (or 0..T), the same values inside.
    for s in (vj.LinearSchedule(), vj.CosineSchedule(), SCHED, vj.LearnedLinearSchedule()):
        out = s(np.array([-0.5, 0.5, 1.5]))
        assert np.isnan(out[0]) and out[1] == s(0.5) and np.isnan(out[2])
    assert np.isnan(SCHED.gamma_step(11)) and np.isnan(SCHED(1.5))


def test_schedule_jit_traces_once():
    sched = vj.LinearSchedule()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(t):
        return sched(t)

    f(jnp.linspace(0, 1, 4))
    f(jnp.linspace(0, 0.5, 4))
