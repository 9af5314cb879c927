"""The families DDPM and VDM (`vdm_jax.families`): their losses and bounds against exact identities
and Monte Carlo, their sampling through the one registry, and their checks (once, at construction)."""
import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import vdm_jax as vj
from vdm_jax.families import DDPM, SAMPLERS, VDM

KEY = jax.random.key(0)


def _data(b=64, d=6, key=jax.random.key(1)):
    """Data on the 'ddpm' grid (any grid works for the Gaussian decoders' tests below)."""
    pixels = jax.random.randint(key, (b, d), 0, 256)
    return vj.pixels_to_data(pixels, grid="ddpm")


def _mean(fn, keys=400):
    """The Monte Carlo mean over `keys` draws of fn(key) ([B] -> [B]) and its standard error."""
    values = jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(7), keys))
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(keys)


def _linear_pred(z, t):
    """A network that is not optimal, but smooth: the losses differ from their minima."""
    return 0.7 * z - 0.2 * t[:, None]


def test_families_are_static_under_jit():
    for family in (DDPM(), DDPM(timesteps=10, schedule="cosine"), VDM(), VDM(schedule="learned")):
        assert hash(family) == hash(dataclasses.replace(family)) and family == dataclasses.replace(family)
    traces = []

    def loss(x, family):
        traces.append(1)
        return family.loss(_linear_pred, x, key=KEY)[0]

    f = jax.jit(loss, static_argnums=1)
    np.testing.assert_array_equal(f(_data(), DDPM(timesteps=10)), f(_data(), DDPM(timesteps=10)))
    assert len(traces) == 1  # an equal family is the same static argument: no retrace


@pytest.mark.parametrize("cls, kwargs, match", [
    (DDPM, dict(timesteps=0), "DDPM: timesteps must be >= 1, got 0"),
    (DDPM, dict(schedule="sigmoid"), "DDPM: schedule must be one of 'linear' or 'cosine', got 'sigmoid'"),
    (DDPM, dict(beta_start=0.1, beta_end=0.01), "DDPM: beta_start must be <= beta_end"),
    (DDPM, dict(prediction="noise"), "DDPM: prediction must be one of"),
    (DDPM, dict(loss_type="hybrid"), "loss_type='hybrid' trains the learned variance: it needs variance='learned'"),
    (DDPM, dict(variance="learned"), "loss_type='simple' cannot train a learned variance"),
    (DDPM, dict(hybrid_lambda=-1.0, loss_type="vlb"), "DDPM: hybrid_lambda must be >= 0"),
    (VDM, dict(timesteps=-1), "VDM: timesteps must be >= 0"),
    (VDM, dict(gamma_min=5.0, gamma_max=-13.3), "VDM: gamma_min must be < gamma_max"),
    (VDM, dict(schedule="quadratic"), "VDM: schedule must be one of"),
])
def test_bad_settings_are_refused_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_method_arguments_name_the_method():
    x = _data()
    with pytest.raises(ValueError, match=r"DDPM.loss: x must be a floating array \[B, \.\.\.\] with a leading batch axis, got int32"):
        DDPM().loss(_linear_pred, jnp.zeros((4, 2), jnp.int32), key=KEY)
    with pytest.raises(ValueError, match="VDM: schedule='learned': pass the learned schedule as gamma_fn"):
        VDM(schedule="learned").loss(_linear_pred, x, key=KEY)
    with pytest.raises(ValueError, match="DDPM: a DDPM's schedule is fixed"):
        DDPM().sample(_linear_pred, (2, 2), key=KEY, gamma_fn=vj.LinearSchedule())
    with pytest.raises(ValueError, match=r"DDPM.sample: shape must be a non-empty tuple of positive ints"):
        DDPM(timesteps=4).sample(_linear_pred, (0, 2), key=KEY)
    with pytest.raises(ValueError, match="DDPM: sampler must be one of 'ancestral', 'ddim', 'dpm_solver'"):
        DDPM().sample(_linear_pred, (2, 2), key=KEY, sampler="rk45")
    with pytest.raises(ValueError, match="sample_steps=10: DDPM's ancestral sampler runs all T = 20 steps"):
        DDPM(timesteps=20).sample(_linear_pred, (2, 2), key=KEY, sample_steps=10)
    with pytest.raises(ValueError, match="sample_steps=30: ddim on a DDPM with T = 20 takes at most T steps"):
        DDPM(timesteps=20).check_sampling("ddim", 30)


def test_ddpm_simple_loss_of_a_zero_network_is_the_noise_energy():
    """L_simple with ε̂ = 0 is ‖ε‖²: its mean is D per example, whatever the data and step."""
    x = _data(b=8, d=6)
    mean, se = _mean(lambda k: DDPM(timesteps=50).loss(lambda z, t: jnp.zeros_like(z), x, key=k)[0], keys=2000)
    assert np.all(np.abs(mean - 6.0) < 5 * se + 1e-3), (mean, se)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_vlb_loss_and_bound_are_unbiased_for_the_full_bound(variance):
    """E_i[L_prior + T·L_{i−1}] (the 'vlb' loss, i ~ U{1..T}) and E[bound] (i ~ U{2..T}, and L_0)
    both equal the whole T-term bound."""
    family = DDPM(timesteps=10, loss_type="vlb", variance=variance)
    x = _data(b=16)
    # (each of its terms draws ε: the full bound is random too; average it as well)
    full, full_se = _mean(lambda k: family.full_bound(_linear_pred, x, key=k)["total"], keys=200)
    for fn in (lambda k: family.loss(_linear_pred, x, key=k)[0], lambda k: family.bound(_linear_pred, x, key=k)["total"]):
        mean, se = _mean(fn, keys=3000)
        z = (mean - full) / np.sqrt(se ** 2 + full_se ** 2)
        assert np.abs(z).max() < 5, z


def test_ddpm_bound_terms_add_up():
    """'total' = prior + diffusion + reconstruction; at T = 1 there is no diffusion term, and the
    prior is the full bound's."""
    x = _data(b=8)
    family = DDPM(timesteps=1, beta_start=0.01, beta_end=0.01)
    bound = jax.jit(lambda k: family.bound(_linear_pred, x, key=k))(KEY)
    np.testing.assert_allclose(bound["total"], bound["prior"] + bound["diffusion"] + bound["reconstruction"],
                               rtol=1e-6)
    np.testing.assert_array_equal(bound["diffusion"], 0.0)
    full = family.full_bound(_linear_pred, x, key=KEY)
    np.testing.assert_allclose(bound["prior"], full["prior"], rtol=1e-6)


def test_ddpm_hybrid_trains_the_variance_only_through_the_vlb():
    family = DDPM(timesteps=10, loss_type="hybrid", variance="learned", hybrid_lambda=0.5)
    x = _data(b=8)

    def pred(scale):
        return lambda z, t: (scale * z, jnp.full_like(z, 0.3))

    loss, terms = jax.jit(lambda k: family.loss(pred(0.5), x, key=k))(KEY)
    np.testing.assert_allclose(loss, terms["simple"] + 0.5 * 10 * terms["vlb_t"], rtol=1e-6)
    # d/d scale of the hybrid loss is L_simple's: the VLB term sees the mean through stop_gradient.
    g_hybrid = jax.jit(jax.grad(lambda s: family.loss(pred(s), x, key=KEY)[0].sum()))(0.5)
    g_simple = jax.jit(jax.grad(lambda s: family.loss(pred(s), x, key=KEY)[1]["simple"].sum()))(0.5)
    np.testing.assert_allclose(g_hybrid, g_simple, rtol=1e-5)


def test_vdm_loss_is_its_elbo():
    x = vj.pixels_to_data(jax.random.randint(KEY, (8, 6), 0, 256), grid="vdm")
    for family in (VDM(), VDM(timesteps=10, schedule="cosine")):
        loss, terms = jax.jit(lambda k: family.loss(_linear_pred, x, key=k))(KEY)
        want = jax.jit(lambda k: vj.vdm_elbo(_linear_pred, x, family.gamma_schedule(), key=k, T=family.timesteps))(KEY)
        np.testing.assert_array_equal(loss, want["total"])
        assert set(terms) == set(family.terms)
    learned = vj.LearnedSchedule(-13.3, 5.0, hidden=8, rngs=nnx.Rngs(0))
    loss, _ = VDM(schedule="learned").loss(_linear_pred, x, key=KEY, gamma_fn=learned)
    np.testing.assert_array_equal(loss, vj.vdm_elbo(_linear_pred, x, learned, key=KEY)["total"])


def test_the_registry_is_every_sampler_and_counts_its_network_calls(optimal_pred):
    """Every sampler samples through the family and makes the network evaluations its entry says
    (which tells them apart: a DDPM's ancestral chain makes T, Heun 2N - 1, the others N)."""
    assert tuple(SAMPLERS) == ("ancestral", "ddim", "dpm_solver", "heun", "euler")
    # (a VDM: the samplers whose function or count differ from a DDPM's)
    for family, names, steps in ((DDPM(timesteps=20), tuple(SAMPLERS), 8), (VDM(), ("ancestral", "heun"), 8)):
        schedule = family.gamma_schedule()
        for name in names:
            n = family.timesteps if (name == "ancestral" and isinstance(family, DDPM)) else steps
            calls = []
            base = optimal_pred(schedule)

            def pred(z, t, base=base, calls=calls):
                jax.debug.callback(lambda: calls.append(1))
                return base(z, t)

            got = jax.jit(lambda k: family.sample(pred, (16, 2), key=k, sampler=name, sample_steps=n))(KEY)
            jax.effects_barrier()
            assert len(calls) == family.evaluations(name, n), (type(family).__name__, name, len(calls))
            assert got.shape == (16, 2) and bool(jnp.all(jnp.isfinite(got)))
    assert DDPM(timesteps=20).evaluations("heun", 8) == 15 and VDM().evaluations("heun", 8) == 16


def test_ancestral_sampling_of_each_family_draws_the_data(optimal_pred):
    """The Gaussian case: the exact denoiser's samples have the data's moments (N(0.5, 0.3²)). (A
    VDM: a DDPM's samplers clip x̂ to [-1, 1], which cuts this Gaussian's tail.)"""
    from tests.conftest import GAUSSIAN_M, GAUSSIAN_S
    for family, sampler, steps in ((VDM(), "ancestral", 100), (VDM(timesteps=50), "dpm_solver", 20)):
        x = jax.jit(lambda k: family.sample(optimal_pred(family.gamma_schedule()), (4096, 2), key=k,
                                            sampler=sampler, sample_steps=steps))(KEY)
        np.testing.assert_allclose(x.mean(), GAUSSIAN_M, atol=0.02, err_msg=(family, sampler))
        np.testing.assert_allclose(x.std(), GAUSSIAN_S, rtol=0.05, err_msg=(family, sampler))


def test_a_learned_variance_is_dropped_where_a_sampler_does_not_take_it(optimal_pred):
    family = DDPM(timesteps=20, loss_type="vlb", variance="learned")
    base = optimal_pred(family.gamma_schedule())
    with_v = lambda z, t: (base(z, t), jnp.full_like(z, 0.5))  # noqa: E731
    for name in ("ddim", "dpm_solver"):
        a, b = jax.jit(lambda k: (family.sample(with_v, (8, 2), key=k, sampler=name, sample_steps=5),
                                  DDPM(timesteps=20).sample(base, (8, 2), key=k, sampler=name, sample_steps=5)))(KEY)
        np.testing.assert_array_equal(a, b)
    flow_fn, schedule, t_min = family.flow(with_v)
    assert t_min == 1 / 20 and isinstance(schedule, vj.DiscreteSchedule)
    np.testing.assert_array_equal(flow_fn(jnp.ones((2, 2)), jnp.ones(2)), base(jnp.ones((2, 2)), jnp.ones(2)))


def test_the_docs_list_the_registry():
    """The README's sampler table has one row per registered sampler, in the registry's order, and
    names each one's network evaluations as the registry counts them; docs/api.md lists the names."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Samplers", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [re.fullmatch(r" `(\w+)` ", row[0]).group(1) for row in rows] == list(SAMPLERS)
    evaluations = {name: row[2].strip() for name, row in zip(SAMPLERS, rows)}
    defaults = {name: row[3].strip() for name, row in zip(SAMPLERS, rows)}  # the registry's default_steps
    assert defaults == {name: str(s.default_steps) if s.default_steps else "T (a VDM: 1000)"
                        for name, s in SAMPLERS.items()}
    assert [VDM().sampler_default_steps(n) for n in SAMPLERS] == [s.default_steps or 1000 for s in SAMPLERS.values()]
    assert [DDPM(timesteps=30).sampler_default_steps(n) for n in SAMPLERS] == [30, 30, 20, 20, 30]  # (at most T)
    ddpm = DDPM(timesteps=1000)
    for name in SAMPLERS:  # 'N' steps of a VDM, of a DDPM; the ancestral DDPM chain: T
        n = 1000 if name == "ancestral" else 8
        assert VDM().evaluations(name, n) == {"N": n, "T, or N": n, "2N (2N − 1 on a DDPM)": 2 * n}[evaluations[name]]
        assert ddpm.evaluations(name, n) == {"N": n, "T, or N": n, "2N (2N − 1 on a DDPM)": 2 * n - 1}[
            evaluations[name]]
    api = (root / "docs" / "api.md").read_text(encoding="utf-8")
    listed = re.search(r"the one registry, name → `Sampler`: (.*?); ", api).group(1)
    assert re.findall(r"'(\w+)'", listed) == list(SAMPLERS)
