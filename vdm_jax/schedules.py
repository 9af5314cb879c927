"""Noise schedules, every one described by γ = -log SNR as a function of t ∈ [0, 1] (docs/math.md §1).

    α² = sigmoid(-γ),   σ² = sigmoid(γ),   SNR = exp(-γ)

Discrete schedules (DDPM) are built from β_1..β_T and read at t = i/T; continuous ones (VDM) are
functions γ(t). Everything is computed in γ (log) space: `1 - ᾱ` formed by subtraction loses all
precision in float32 when ᾱ is near 1.
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
    """Signal and noise levels of a variance-preserving process (docs/math.md §1.1).

    α = sqrt(sigmoid(-γ)) = exp(-softplus(γ)/2),  σ = sqrt(sigmoid(γ)) = exp(-softplus(-γ)/2).

    The softplus form keeps full relative precision at both ends (γ → ±∞ gives (0, 1) and (1, 0)
    exactly, without NaN).

    Args:
      gamma: γ = -log SNR, any shape.
    Returns:
      (alpha, sigma), each of gamma's shape.
    """
    return jnp.exp(-0.5 * jax.nn.softplus(gamma)), jnp.exp(-0.5 * jax.nn.softplus(-gamma))


def snr(gamma) -> jax.Array:
    """Signal-to-noise ratio α²/σ² = exp(-γ) (docs/math.md §1.1)."""
    return jnp.exp(-gamma)


def _float(t) -> jax.Array:
    """t as a floating array (integers promoted to the default float)."""
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jax.dtypes.canonicalize_dtype(float))


def _inside_unit_interval(t, gamma):
    """γ where 0 <= t <= 1, NaN elsewhere (a jax.Array t is never read back to check it)."""
    return jnp.where((t >= 0) & (t <= 1), gamma, jnp.nan)


# ---------------------------------------------------------------------------------------------
# Discrete (DDPM) schedules: host factories, checked eagerly


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β_1..β_T evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020; docs/math.md §1.3).

    Args:
      T: number of steps, >= 1.
      beta_start, beta_end: first and last β, with 0 < beta_start <= beta_end < 1.
    Returns:
      NumPy float64 [T] array of β (`DiscreteSchedule` casts it to its dtype).
    """
    _checks.check_int("linear_betas: T", T, 1)
    _checks.arguments("linear_betas", beta_start=beta_start, beta_end=beta_end)
    if beta_start > beta_end:
        raise ValueError(f"linear_betas: beta_start must be <= beta_end, got beta_start={beta_start} > "
                         f"beta_end={beta_end}.")
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021) (docs/math.md §1.3).

    f(t) = cos²(((t/T + s)/(1 + s)) π/2),  ᾱ_t = f(t)/f(0),  β_t = min(1 - ᾱ_t/ᾱ_{t-1}, max_beta).

    Args:
      T: number of steps, >= 1.
      s: small offset that keeps β_1 from being tiny, s >= 0.
      max_beta: clip for β near t = T, in (0, 1).
    Returns:
      NumPy float64 [T] array of β.
    """
    _checks.check_int("cosine_betas: T", T, 1)
    _checks.arguments("cosine_betas", max_beta=max_beta)
    if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not s >= 0.0:
        raise ValueError(f"cosine_betas: s must be a real number >= 0, got {s!r}.")
    t = np.arange(T + 1, dtype=np.float64) / T
    log_f = 2.0 * np.log(np.cos((t + s) / (1.0 + s) * np.pi / 2.0).clip(min=0.0))
    # 1 - ᾱ_t/ᾱ_{t-1} = -expm1(log ᾱ_t - log ᾱ_{t-1}); the last f is exactly 0 (log = -inf) -> β = 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        betas = -np.expm1(np.diff(log_f))
    return np.minimum(np.nan_to_num(betas, nan=1.0), max_beta)


def _log_expm1(c):
    """log(exp(c) - 1) for c >= 0, stable for small and large c; -inf at c = 0."""
    return jnp.where(c > 20.0, c + jnp.log1p(-jnp.exp(-c)), jnp.log(jnp.expm1(jnp.minimum(c, 20.0))))


def _host_betas(betas) -> np.ndarray:
    """Checks host betas: 1-D, length T >= 1, every β in (0, 1); returns them in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"DiscreteSchedule: betas must be a 1-D array of length T >= 1, got shape {betas.shape}.")
    bad = ~((betas > 0.0) & (betas < 1.0))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"DiscreteSchedule: betas must lie in the open interval (0, 1); betas[{i}] (step {i + 1}) "
                         f"is {betas[i]}.")
    return betas


def _host_dtype(values):
    """The JAX dtype for host values: theirs if floating, else the default float (x64 or not)."""
    given = np.asarray(values).dtype
    return jax.dtypes.canonicalize_dtype(given if np.issubdtype(given, np.floating) else float)


@jax.tree_util.register_pytree_node_class
class DiscreteSchedule:
    """A DDPM schedule of T steps from β_1..β_T, read as γ(t) on t ∈ [0, 1] (docs/math.md §1.2, §1.4).

        α_i = 1 - β_i,   ᾱ_i = ∏_{j<=i} α_j,   γ_i = log((1 - ᾱ_i)/ᾱ_i),   γ(i/T) = γ_i

    Arrays are indexed i-1 for step i (`betas[0]` is β_1). `schedule(t)` (= `.gamma(t)`) takes
    float t ∈ [0, 1]: exact at t = i/T, with -log ᾱ linear in t in between. `gamma_step(i)` takes
    integer steps i in 0..T. Step 0 is the clean data: γ_0 = -inf (α = 1, σ = 0). The cumulative
    log c_i = -log ᾱ_i is formed by `cumsum(log1p(-β))` and γ_i = log(expm1(c_i)), so γ is exact
    even where ᾱ_i ≈ 1.

    Host betas (NumPy, lists) are checked and c is built in float64, then cast to `dtype` (default:
    the betas' floating dtype, canonicalised: float32 unless x64 is on). A jax.Array is not read
    back: the schedule is built with jnp in its dtype, and only its shape is checked.

    It is a pytree (arrays as leaves, T from their shape), so it can be passed into `jax.jit`.

    Attributes:
      T: number of steps.  betas, alphas, alpha_bars: [T].  gammas: [T + 1] (γ_0 = -inf).  dtype.
    """

    def __init__(self, betas, *, dtype=None):
        if isinstance(betas, jax.Array):
            if betas.ndim != 1 or not jnp.issubdtype(betas.dtype, jnp.floating):
                raise ValueError(f"DiscreteSchedule: betas must be a 1-D floating array, got shape {betas.shape} and "
                                 f"dtype {betas.dtype}.")
            betas = betas.astype(dtype or betas.dtype)
            self._betas = betas
            self._c = jnp.concatenate([jnp.zeros((1,), betas.dtype), -jnp.cumsum(jnp.log1p(-betas))])
            return
        dtype = dtype or _host_dtype(betas)
        betas64 = _host_betas(betas)
        self._betas = jnp.asarray(betas64, dtype=dtype)
        self._c = jnp.asarray(np.concatenate([[0.0], -np.cumsum(np.log1p(-betas64))]), dtype=dtype)

    @classmethod
    def from_alpha_bars(cls, alpha_bars, *, dtype=None) -> "DiscreteSchedule":
        """Builds the schedule whose ᾱ_1..ᾱ_T are given (strictly decreasing, in (0, 1)).

        Host values are checked (as the betas are); a jax.Array is used as it is.
        """
        if isinstance(alpha_bars, jax.Array):
            prev = jnp.concatenate([jnp.ones((1,), alpha_bars.dtype), alpha_bars[:-1]])
            return cls(1.0 - alpha_bars / prev, dtype=dtype)
        a = np.asarray(alpha_bars, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError("DiscreteSchedule.from_alpha_bars: alpha_bars must be a 1-D array of length T >= 1, got "
                             f"shape {a.shape}.")
        prev = np.concatenate([[1.0], a[:-1]])
        bad = ~((a > 0.0) & (a < prev))
        if np.any(bad):
            i = int(np.argmax(bad))
            raise ValueError("DiscreteSchedule.from_alpha_bars: alpha_bars must be strictly decreasing in (0, 1) "
                             f"(below ᾱ_0 = 1); alpha_bars[{i}] (step {i + 1}) is {a[i]}.")
        return cls(1.0 - a / prev, dtype=dtype or _host_dtype(alpha_bars))

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

    def gamma_step(self, i) -> jax.Array:
        """γ_i for integer steps i in 0..T (any shape); γ_0 = -inf, NaN outside 0..T (docs/math.md §1.2)."""
        i = jnp.asarray(i)
        valid = (i >= 0) & (i <= self.T)
        return jnp.where(valid, _log_expm1(self._c[jnp.clip(i, 0, self.T)]), jnp.nan)

    def __call__(self, t) -> jax.Array:
        """γ(t) for float t ∈ [0, 1] (any shape): γ(i/T) = γ_i, -log ᾱ linear in t in between, NaN
        outside [0, 1] (docs/math.md §1.4)."""
        t = _float(t)
        pos = t.astype(self._c.dtype) * self.T
        # Snap to the grid within t's rounding error, so that γ(i/T) = γ_i exactly.
        nearest = jnp.round(pos)
        pos = jnp.where(jnp.abs(pos - nearest) <= 4 * self.T * jnp.finfo(t.dtype).eps, nearest, pos)
        i = jnp.clip(jnp.floor(pos), 0, self.T - 1).astype(jnp.int32)
        frac = pos - i
        c = self._c[i] + frac * (self._c[i + 1] - self._c[i])
        return _inside_unit_interval(t, _log_expm1(c))

    gamma = __call__

    def __repr__(self):
        return f"DiscreteSchedule(T={self.T}, dtype={self.dtype})"


# ---------------------------------------------------------------------------------------------
# Continuous (VDM) schedules


def _check_endpoints(owner, gamma_min, gamma_max):
    _checks.arguments(owner, gamma_min=gamma_min, gamma_max=gamma_max)
    if not gamma_min < gamma_max:
        raise ValueError(f"{owner}: the schedule must be increasing in γ (decreasing SNR): need gamma_min < "
                         f"gamma_max, got gamma_min={gamma_min}, gamma_max={gamma_max}.")


@dataclasses.dataclass(frozen=True)
class _FixedSchedule:
    """A fixed continuous schedule with end points γ(0) = gamma_min < γ(1) = gamma_max; γ is NaN
    outside t ∈ [0, 1]."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __post_init__(self):
        _check_endpoints(type(self).__name__, self.gamma_min, self.gamma_max)

    def __call__(self, t) -> jax.Array:
        t = _float(t)
        return _inside_unit_interval(t, self._gamma(t))

    gamma = __call__


@dataclasses.dataclass(frozen=True)
class LinearSchedule(_FixedSchedule):
    """Fixed linear γ(t) = γ_min + (γ_max - γ_min) t on t ∈ [0, 1] (VDM; docs/math.md §1.5).

    Defaults are VDM's CIFAR-10 values, γ_min = -13.3, γ_max = 5.0.
    """

    def _gamma(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t


@dataclasses.dataclass(frozen=True)
class CosineSchedule(_FixedSchedule):
    """Continuous cosine schedule truncated to [γ_min, γ_max] (docs/math.md §1.5).

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
    """VDM's learned monotone schedule (Kingma et al. 2021, learned noise schedule; docs/math.md §1.6).

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
        _check_endpoints("LearnedSchedule", gamma_min, gamma_max)
        _checks.arguments("LearnedSchedule", hidden=hidden)
        self.endpoints = _Endpoints(gamma_min, gamma_max)
        self.shape = _MonotoneMLP(hidden, rngs=rngs)

    def __call__(self, t) -> jax.Array:
        t = _float(t)
        g0, g1 = self.endpoints()
        lo, hi = self.shape(jnp.zeros((), t.dtype)), self.shape(jnp.ones((), t.dtype))
        return _inside_unit_interval(t, g0 + (g1 - g0) * (self.shape(t) - lo) / (hi - lo))

    gamma = __call__


class LearnedLinearSchedule(nnx.Module):
    """VDM's learned linear schedule, the official `learnable_scalar` (google-research/vdm
    `NoiseSchedule_Scalar`, the schedule of its CIFAR-10 run; docs/math.md §1.7).

        γ(t) = b + |w| t,   initialised at b = γ_min, w = γ_max - γ_min

    Its only freedom is its end points γ(0) = b and γ(1) = b + |w|: the ELBO trains both (there is
    no shape for variance minimisation to act on). Non-decreasing for any w, b; strictly increasing
    unless w = 0.

    Args:
      gamma_min, gamma_max: the initial end points, gamma_min < gamma_max.
    Attributes:
      w, b: float32 scalar `nnx.Param`s, named as in the official checkpoints.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0):
        _check_endpoints("LearnedLinearSchedule", gamma_min, gamma_max)
        self.w = nnx.Param(jnp.asarray(gamma_max - gamma_min, jnp.float32))
        self.b = nnx.Param(jnp.asarray(gamma_min, jnp.float32))

    def __call__(self, t) -> jax.Array:
        t = _float(t)
        return _inside_unit_interval(t, self.b[...] + jnp.abs(self.w[...]) * t)

    gamma = __call__
