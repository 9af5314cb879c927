"""Noise schedules, every one described by γ = -log SNR (MATH.md §1).

    α² = sigmoid(-γ),   σ² = sigmoid(γ),   SNR = exp(-γ)

Discrete schedules (DDPM) are built from β_1..β_T; continuous ones (VDM) are functions γ(t) on
t ∈ [0, 1]. A discrete schedule read at t = i/T is a continuous one (`DiscreteSchedule.as_continuous`).
Everything is computed in γ (log) space: `1 - ᾱ` formed by subtraction loses all precision in
float32 when ᾱ is near 1.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from vdm_jax import _checks

# ---------------------------------------------------------------------------------------------
# γ ↔ (α, σ)


def alpha_sigma(gamma) -> tuple[jax.Array, jax.Array]:
    """Signal and noise levels of a variance-preserving process (MATH.md §1).

    α = sqrt(sigmoid(-γ)) = exp(-softplus(γ)/2),  σ = sqrt(sigmoid(γ)) = exp(-softplus(-γ)/2).

    The softplus form keeps full relative precision at both ends (γ → ±∞ gives (0, 1) and (1, 0)
    exactly, without NaN).

    Args:
      gamma: γ = -log SNR, any shape.
    Returns:
      (alpha, sigma), each of gamma's shape.
    """
    gamma = _checks.check_float("gamma", gamma)
    return jnp.exp(-0.5 * jax.nn.softplus(gamma)), jnp.exp(-0.5 * jax.nn.softplus(-gamma))


def snr(gamma) -> jax.Array:
    """Signal-to-noise ratio α²/σ² = exp(-γ) (MATH.md §1)."""
    return jnp.exp(-_checks.check_float("gamma", gamma))


# ---------------------------------------------------------------------------------------------
# Discrete (DDPM) schedules


def _check_T(T) -> int:
    return _checks.check_int("T", T, 1)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02, *, dtype=None) -> jax.Array:
    """β_1..β_T evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020; MATH.md §1).

    Args:
      T: number of steps, >= 1.
      beta_start, beta_end: first and last β, with 0 < beta_start <= beta_end < 1.
      dtype: result dtype (default: JAX's default float).
    Returns:
      [T] array of β.
    """
    T = _check_T(T)
    _checks.check_real("beta_start", beta_start)
    _checks.check_real("beta_end", beta_end)
    if not 0.0 < beta_start < 1.0:
        raise ValueError(f"beta_start must be in (0, 1), got {beta_start}.")
    if not 0.0 < beta_end < 1.0:
        raise ValueError(f"beta_end must be in (0, 1), got {beta_end}.")
    if beta_start > beta_end:
        raise ValueError(f"beta_start must be <= beta_end, got beta_start={beta_start} > "
                         f"beta_end={beta_end}.")
    return jnp.asarray(np.linspace(beta_start, beta_end, T, dtype=np.float64), dtype=dtype)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999, *, dtype=None) -> jax.Array:
    """Cosine schedule of Nichol & Dhariwal (2021) (MATH.md §1).

    f(t) = cos²(((t/T + s)/(1 + s)) π/2),  ᾱ_t = f(t)/f(0),  β_t = min(1 - ᾱ_t/ᾱ_{t-1}, max_beta).

    Args:
      T: number of steps, >= 1.
      s: small offset that keeps β_1 from being tiny, s >= 0.
      max_beta: clip for β near t = T, in (0, 1).
    Returns:
      [T] array of β.
    """
    T = _check_T(T)
    _checks.check_real("s", s)
    _checks.check_real("max_beta", max_beta)
    if not s >= 0.0:
        raise ValueError(f"s must be >= 0, got {s}.")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta}.")
    t = np.arange(T + 1, dtype=np.float64) / T
    log_f = 2.0 * np.log(np.cos((t + s) / (1.0 + s) * np.pi / 2.0).clip(min=0.0))
    # 1 - ᾱ_t/ᾱ_{t-1} = -expm1(log ᾱ_t - log ᾱ_{t-1}); the last f is exactly 0 (log = -inf) -> β = 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        betas = -np.expm1(np.diff(log_f))
    betas = np.minimum(np.nan_to_num(betas, nan=1.0), max_beta)
    return jnp.asarray(betas, dtype=dtype)


def _log_expm1(c):
    """log(exp(c) - 1) for c >= 0, stable for small and large c; -inf at c = 0."""
    return jnp.where(c > 20.0, c + jnp.log1p(-jnp.exp(-c)), jnp.log(jnp.expm1(jnp.minimum(c, 20.0))))


@jax.tree_util.register_pytree_node_class
class DiscreteSchedule:
    """A DDPM schedule of T steps from β_1..β_T (MATH.md §1, discrete time).

        α_t = 1 - β_t,   ᾱ_t = ∏_{s<=t} α_s,   γ_t = log((1 - ᾱ_t)/ᾱ_t)

    Arrays are indexed t-1 for step t (`betas[0]` is β_1). `gamma(t)` takes integer t in 0..T, with
    t = 0 the clean data (γ_0 = -inf: α = 1, σ = 0). The cumulative log, c_t = -log ᾱ_t, is formed by
    `cumsum(log1p(-β))` in float64 and γ_t = log(expm1(c_t)), so γ is exact even where ᾱ_t ≈ 1.

    It is a pytree (arrays as leaves, T from their shape), so it can be passed into `jax.jit`.

    Attributes:
      betas, alphas, alpha_bars: [T] arrays.
      T: number of steps.
    """

    def __init__(self, betas, *, dtype=None):
        value = _checks.concrete_or_none(betas)
        if value is not None:
            betas64 = np.asarray(value, dtype=np.float64)
            if betas64.ndim != 1 or betas64.shape[0] < 1:
                raise ValueError(f"betas must be a 1-D array of length T >= 1, got shape {betas64.shape}.")
            bad = ~((betas64 > 0.0) & (betas64 < 1.0))
            if np.any(bad):
                i = int(np.argmax(bad))
                raise ValueError(f"betas must lie in the open interval (0, 1); betas[{i}] (step t={i + 1}) "
                                 f"is {betas64[i]}.")
            dtype = dtype or (jnp.asarray(betas).dtype if jnp.issubdtype(jnp.asarray(betas).dtype, jnp.floating)
                              else None)
            c = np.concatenate([[0.0], -np.cumsum(np.log1p(-betas64))])
            self._betas = jnp.asarray(betas64, dtype=dtype)
            self._c = jnp.asarray(c, dtype=dtype)
        else:  # Built inside a traced function: same formulas in jnp, no value checks.
            betas = _checks.check_float("betas", betas)
            if betas.ndim != 1:
                raise ValueError(f"betas must be a 1-D array, got shape {betas.shape}.")
            self._betas = betas
            self._c = jnp.concatenate([jnp.zeros((1,), betas.dtype), -jnp.cumsum(jnp.log1p(-betas))])

    @classmethod
    def from_alpha_bars(cls, alpha_bars, *, dtype=None) -> "DiscreteSchedule":
        """Builds the schedule whose ᾱ_1..ᾱ_T are given (strictly decreasing, in (0, 1])."""
        a = np.asarray(alpha_bars, dtype=np.float64)
        if a.ndim != 1 or a.shape[0] < 1:
            raise ValueError(f"alpha_bars must be a 1-D array of length T >= 1, got shape {a.shape}.")
        bad = ~((a > 0.0) & (a <= 1.0))
        if np.any(bad):
            i = int(np.argmax(bad))
            raise ValueError(f"alpha_bars must lie in (0, 1]; alpha_bars[{i}] (step t={i + 1}) is {a[i]}.")
        prev = np.concatenate([[1.0], a[:-1]])
        if np.any(a >= prev):
            i = int(np.argmax(a >= prev))
            raise ValueError(f"alpha_bars must be strictly decreasing (and below ᾱ_0 = 1); "
                             f"alpha_bars[{i}] = {a[i]} >= {prev[i]}.")
        return cls(1.0 - a / prev, dtype=dtype or jnp.asarray(alpha_bars).dtype)

    # Pytree protocol: T comes from the leaves' shapes, so nothing static needs storing.
    def tree_flatten(self):
        return (self._betas, self._c), None

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        obj = object.__new__(cls)
        obj._betas, obj._c = leaves
        return obj

    @property
    def T(self) -> int:
        return self._betas.shape[0]

    @property
    def dtype(self):
        return self._betas.dtype

    @property
    def betas(self) -> jax.Array:
        return self._betas

    @property
    def alphas(self) -> jax.Array:
        return 1.0 - self._betas

    @property
    def alpha_bars(self) -> jax.Array:
        return jnp.exp(-self._c[1:])

    @property
    def gammas(self) -> jax.Array:
        """[T + 1] array γ_0..γ_T (γ_0 = -inf)."""
        return _log_expm1(self._c)

    def gamma(self, t) -> jax.Array:
        """γ_t for integer t in 0..T (any shape). t = 0 is the clean data: γ_0 = -inf.

        A concrete t outside 0..T raises ValueError; a traced one gives NaN there (never a
        silently wrong finite value).
        """
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise TypeError(f"t must be an integer step in 0..T, got dtype {t.dtype}; for continuous "
                            "time in [0, 1] use schedule.as_continuous().")
        _checks.check_in_range("t", t, 0, self.T, f"0..T = 0..{self.T}")
        valid = (t >= 0) & (t <= self.T)
        return jnp.where(valid, _log_expm1(self._c[jnp.clip(t, 0, self.T)]), jnp.nan)

    def continuous_gamma(self, t) -> jax.Array:
        """γ at continuous t ∈ [0, 1]: exact at t = i/T; -log ᾱ linear in t in between."""
        t = _checks.check_float("t", t)
        _checks.check_in_range("t", t, 0.0, 1.0, "[0, 1]")
        pos = t.astype(self._c.dtype) * self.T
        # Snap to the grid within t's rounding error, so that γ(i/T) = γ_i exactly.
        nearest = jnp.round(pos)
        pos = jnp.where(jnp.abs(pos - nearest) <= 4 * self.T * jnp.finfo(t.dtype).eps, nearest, pos)
        i = jnp.clip(jnp.floor(pos), 0, self.T - 1).astype(jnp.int32)
        frac = pos - i
        c = self._c[i] + frac * (self._c[i + 1] - self._c[i])
        return _inside_unit_interval(t, _log_expm1(c))

    def as_continuous(self) -> "ContinuousView":
        """This schedule as a function γ(t) on t ∈ [0, 1] (MATH.md §1: read at t_i = i/T)."""
        return ContinuousView(self)

    def __repr__(self):
        return f"DiscreteSchedule(T={self.T}, dtype={self.dtype})"


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ContinuousView:
    """A discrete schedule read as a continuous one: γ(i/T) = γ_i (see `continuous_gamma`)."""

    schedule: DiscreteSchedule

    def __call__(self, t) -> jax.Array:
        return self.schedule.continuous_gamma(t)

    gamma = __call__

    def tree_flatten(self):
        return (self.schedule,), None

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(*leaves)


# ---------------------------------------------------------------------------------------------
# Continuous (VDM) schedules


def _check_endpoints(gamma_min, gamma_max):
    for name, v in (("gamma_min", gamma_min), ("gamma_max", gamma_max)):
        _checks.check_real(name, v)
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}.")
    if not gamma_min < gamma_max:
        raise ValueError("the schedule must be increasing in γ (decreasing SNR): need gamma_min < gamma_max, "
                         f"got gamma_min={gamma_min}, gamma_max={gamma_max}.")


def _check_t(t):
    t = _checks.check_float("t", t)
    _checks.check_in_range("t", t, 0.0, 1.0, "[0, 1]")
    return t


def _inside_unit_interval(t, gamma):
    """γ where 0 <= t <= 1, NaN elsewhere (a traced t can't be checked eagerly)."""
    return jnp.where((t >= 0) & (t <= 1), gamma, jnp.nan)


@dataclasses.dataclass(frozen=True)
class _FixedSchedule:
    """A fixed continuous schedule with end points γ(0) = gamma_min < γ(1) = gamma_max.

    A concrete t outside [0, 1] raises ValueError; a traced one gives NaN there.
    """

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __post_init__(self):
        _check_endpoints(self.gamma_min, self.gamma_max)

    def __call__(self, t) -> jax.Array:
        t = _check_t(t)
        return _inside_unit_interval(t, self._gamma(t))

    def gamma(self, t) -> jax.Array:
        return self(t)


@dataclasses.dataclass(frozen=True)
class LinearSchedule(_FixedSchedule):
    """Fixed linear γ(t) = γ_min + (γ_max - γ_min) t on t ∈ [0, 1] (VDM; MATH.md §1).

    Defaults are VDM's CIFAR-10 values, γ_min = -13.3, γ_max = 5.0.
    A concrete t outside [0, 1] raises ValueError; a traced one gives NaN there.
    """

    def _gamma(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


@dataclasses.dataclass(frozen=True)
class CosineSchedule(_FixedSchedule):
    """Continuous cosine schedule truncated to [γ_min, γ_max] (MATH.md §1).

    The continuous limit of Nichol & Dhariwal's cosine (s → 0) has ᾱ(u) = cos²(πu/2), i.e.
    γ(u) = 2 log tan(πu/2), which is ±∞ at the ends. We read it on u ∈ [u_0, u_1] with
    u_i = (2/π) atan(exp(γ_i/2)), so γ(0) = γ_min and γ(1) = γ_max exactly:

        γ(t) = 2 log tan(π (u_0 + (u_1 - u_0) t) / 2)
    """

    def _gamma(self, t):
        u0 = 2.0 / math.pi * math.atan(math.exp(0.5 * self.gamma_min))
        u1 = 2.0 / math.pi * math.atan(math.exp(0.5 * self.gamma_max))
        theta = 0.5 * math.pi * (u0 + (u1 - u0) * t)
        return 2.0 * (jnp.log(jnp.sin(theta)) - jnp.log(jnp.cos(theta)))


class _Endpoints(nnx.Module):
    """γ(0) = gamma_0 and γ(1) = gamma_0 + softplus(raw_gap), so γ(1) > γ(0) always."""

    def __init__(self, gamma_min: float, gamma_max: float):
        self.gamma_0 = nnx.Param(jnp.asarray(gamma_min, jnp.float32))
        gap = gamma_max - gamma_min
        self.raw_gap = nnx.Param(jnp.asarray(gap + math.log(-math.expm1(-gap)), jnp.float32))

    def __call__(self):
        return self.gamma_0[...], self.gamma_0[...] + jax.nn.softplus(self.raw_gap[...])


class _MonotoneMLP(nnx.Module):
    """γ̃(t) = l1(t) + l3(sigmoid(l2(2t - 1)))/H with positive weights: strictly increasing in t."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        normal = jax.nn.initializers.normal(1.0)
        self.w1 = nnx.Param(jnp.asarray(0.0, jnp.float32))  # softplus(w1) > 0
        self.w2 = nnx.Param(normal(rngs.params(), (hidden,), jnp.float32))
        self.b2 = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.w3 = nnx.Param(normal(rngs.params(), (hidden,), jnp.float32))
        self.hidden = hidden

    def __call__(self, t):
        pos = jax.nn.softplus
        lead = (1,) * jnp.ndim(t)  # explicit broadcasting of the [H] weights over t's shape
        w2, b2, w3 = (w.reshape(lead + w.shape) for w in (pos(self.w2[...]), self.b2[...], pos(self.w3[...])))
        h = jax.nn.sigmoid((2.0 * t - 1.0)[..., None] * w2 + b2)
        return pos(self.w1[...]) * t + jnp.sum(h * w3, axis=-1) / self.hidden


class LearnedSchedule(nnx.Module):
    """VDM's learned monotone schedule (Kingma et al. 2021, learned noise schedule; MATH.md §1).

        γ_η(t) = γ_0 + (γ_1 - γ_0) (γ̃(t) - γ̃(0)) / (γ̃(1) - γ̃(0))

    γ̃ is a monotone MLP (weights made positive by softplus), so γ_η is strictly increasing; the end
    points γ_0 < γ_1 are learned too. The state splits into `endpoints` (what the VLB depends on)
    and `shape` (what only changes the diffusion loss's variance), which is how
    `vdm_jax.variance_minimising_grads` treats them.

    Args:
      gamma_min, gamma_max: initial end points.
      hidden: width of the MLP.
      rngs: `nnx.Rngs` for the MLP's initialisation.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, *, hidden: int = 1024,
                 rngs: nnx.Rngs):
        _check_endpoints(gamma_min, gamma_max)
        _checks.check_int("hidden", hidden, 1)
        self.endpoints = _Endpoints(gamma_min, gamma_max)
        self.shape = _MonotoneMLP(hidden, rngs=rngs)

    def __call__(self, t) -> jax.Array:
        t = _check_t(t)
        g0, g1 = self.endpoints()
        lo, hi = self.shape(jnp.zeros((), t.dtype)), self.shape(jnp.ones((), t.dtype))
        return _inside_unit_interval(t, g0 + (g1 - g0) * (self.shape(t) - lo) / (hi - lo))

    gamma = __call__
