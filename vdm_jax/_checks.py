"""How the core checks its arguments: once, at the public boundary, by one decorator.

    @_checks.boundary(arrays=("x", "eps"), per_example=("gamma_t",))
    def q_sample(x, eps, gamma_t):
        alpha, sigma = alpha_sigma(gamma_t)
        return alpha * x + sigma * eps

`boundary` declares the contract, so the body reads like its formula. Argument kinds (tuples of
names; an argument that is None is left alone): `arrays`, floating arrays of one shape, the first
given being the reference x [B, ...]; `per_example`, floating scalars or [B] (B = x's leading
axis; with no x given, they need only broadcast), reshaped to [B, 1, ..., 1] for the body so
that formulas broadcast per example; `per_element`, the same or of x's shape; `batch`, scalars or [B], passed as they are;
`floats`/`ints`, floating/integer arrays of any shape. Any other keyword gives the argument of that
name a rule `rule(name, value, args)` (or a tuple of them) that raises: `one_of`, `int_at_least`,
`in_range`, `below`, `instance`, or one written beside the function.

The outermost decorated call checks; library calls made while it runs (a contextvar) skip the
checks but still convert (asarray, the reshape), so a composite such as `vdm_elbo` validates once.
Shapes and dtypes are checked at trace time under `jax.jit`; values only of host inputs (Python
numbers, lists, NumPy arrays): a `jax.Array` is never read back, and an out-of-range value there
gives NaN. Errors are TypeError (types) or ValueError (shapes, values), prefixed with the public
function's name.
"""
from __future__ import annotations

import contextvars
import functools
import inspect

import numpy as np
import jax
import jax.numpy as jnp

_INSIDE = contextvars.ContextVar("vdm_jax_inside_boundary", default=False)
_KINDS = ("arrays", "per_example", "per_element", "batch", "floats", "ints")
_EXPANDED, _VECTORS = ("per_example", "per_element"), ("per_example", "per_element", "batch")


def boundary(**contract):
    """Decorates a public function with its contract (see the module docstring)."""
    kinds = {kind: contract.pop(kind, ()) for kind in _KINDS}
    rules = {n: rule if isinstance(rule, tuple) else (rule,) for n, rule in contract.items()}

    def decorate(fn):
        signature = inspect.signature(fn)
        key_hint = " (key is keyword-only: key=...)" if "key" in signature.parameters else ""

        @functools.wraps(fn)
        def public(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:  # e.g. a positional key
                raise TypeError(f"{fn.__name__}: {e}{key_hint}") from None
            bound.apply_defaults()
            a, raw, check = bound.arguments, dict(bound.arguments), not _INSIDE.get()
            given = {kind: [n for n in names if a[n] is not None] for kind, names in kinds.items()}
            try:
                for kind, names in given.items():
                    for n in names:
                        a[n] = _asarray(n, a[n], kind, check)
                if check:
                    _check_shapes(a, given)
                    for n, rule in ((n, r) for n, rs in rules.items() for r in rs):
                        rule(n, raw[n], raw)
            except (TypeError, ValueError) as e:  # named after the public function (a method: its class)
                name = f"{type(a['self']).__name__}.{fn.__name__}" if "self" in a else fn.__name__
                raise type(e)(f"{name.replace('.__call__', '')}: {e}") from None
            if given["arrays"]:  # per-example values [B] -> [B, 1, ..., 1]
                ndim = a[given["arrays"][0]].ndim
                for n in (n for kind in _EXPANDED for n in given[kind] if a[n].ndim == 1):
                    a[n] = _per_example(a[n], ndim)
            token = _INSIDE.set(True)
            try:
                return fn(*bound.args, **bound.kwargs)
            finally:
                _INSIDE.reset(token)
        return public
    return decorate


@functools.partial(jax.jit, static_argnums=1)  # jitted: eagerly, one fast dispatch instead of a reshape op's
def _per_example(value, ndim):
    return value.reshape(value.shape + (1,) * (ndim - 1))


def _asarray(name, value, kind, check):
    want, what = (jnp.integer, "an integer") if kind == "ints" else (jnp.floating, "a floating-point")
    if not isinstance(value, jax.Array):
        try:
            value = jnp.asarray(value)
        except (TypeError, ValueError):  # strings, None in a list, ragged lists, ...
            raise TypeError(f"{name} must be {what} array, got {type(value).__name__} {value!r:.60}.") from None
    if check and not jnp.issubdtype(value.dtype, want):
        raise TypeError(f"{name} must be {what} array, got dtype {value.dtype}.")
    return value


def _check_shapes(a, given):
    ref = given["arrays"][0] if given["arrays"] else None
    if ref is None:  # no array to broadcast against: the per-example values need only broadcast together
        return
    if a[ref].ndim < 1:
        raise ValueError(f"{ref} must have shape [B, ...] with a leading batch axis, got shape {a[ref].shape}.")
    for n in given["arrays"][1:]:
        if a[n].shape != a[ref].shape:
            raise ValueError(f"{n} must have {ref}'s shape {a[ref].shape}, got {a[n].shape}.")
    for kind in _VECTORS:
        also = f" or {ref}'s shape {a[ref].shape}" if kind == "per_element" else ""
        for n in given[kind]:
            if not (a[n].ndim == 0 or a[n].shape == a[ref].shape[:1] or (also and a[n].shape == a[ref].shape)):
                raise ValueError(f"{n} must be a scalar or [B] = [{a[ref].shape[0]}] ({ref}'s batch axis){also}, "
                                 f"got shape {a[n].shape}.")


def host_value(value) -> np.ndarray | None:
    """`value` as a NumPy array if it is on the host; None for a jax.Array (never read back)."""
    if any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(value)):
        return None
    return np.asarray(value)


def one_of(*choices):
    """Rule: one of the given strings."""
    def rule(name, value, args):
        if not isinstance(value, str) or value not in choices:
            listed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
            raise ValueError(f"{name} must be one of {listed}, got {value!r}.")
    return rule


def int_at_least(minimum: int):
    """Rule: a Python or NumPy int >= minimum."""
    return lambda name, value, args: check_int(name, value, minimum)


def in_range(lo, hi, what: str = "[{lo:g}, {hi:g}]"):
    """Rule: host values in [lo, hi]; `hi` may be a function of the arguments (e.g. a schedule's T)."""
    def rule(name, value, args):
        v = host_value(value)
        top = hi(args) if callable(hi) else hi
        if v is not None and v.size and (np.any(np.isnan(v)) or np.min(v) < lo or np.max(v) > top):
            raise ValueError(f"{name} must lie in {what.format(lo=lo, hi=top)}; got values in "
                             f"[{np.min(v)}, {np.max(v)}].")
    return rule


def below(other: str):
    """Rule: host values below those of the argument `other` (elementwise, broadcast), e.g. γ_s < γ_t."""
    def rule(name, value, args):
        s, t = host_value(value), host_value(args[other])
        s, t = (None, None) if s is None or t is None else np.broadcast_arrays(s, t)
        if s is not None and np.any(bad := ~(s < t)):
            i = np.unravel_index(np.argmax(bad), bad.shape)
            where = f" at index {tuple(int(k) for k in i)}" if bad.ndim else ""
            raise ValueError(f"{name} must be < {other} (s < t: the noise level grows with time); got "
                             f"{name}={s[i]} and {other}={t[i]}{where}.")
    return rule


def instance(cls: type, hint: str = ""):
    """Rule: an instance of `cls`; `hint` (e.g. what to use instead) ends the message."""
    def rule(name, value, args):
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}{hint}.")
    return rule


def check_int(name: str, value, minimum: int) -> int:
    """Checks that `value` is a Python or NumPy int (not a bool) >= `minimum`; returns it as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def split_prediction(out, z_t, learned: bool):
    """pred_fn's output as (prediction, v): a pair with a learned variance, one array otherwise, of z_t's shape."""
    if learned != isinstance(out, (tuple, list)) or (learned and len(out) != 2):
        got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else "one array"
        raise ValueError(f"with variance='learned' pred_fn must return (prediction, v), got {got}." if learned else
                         f"pred_fn returned {got}, but without a learned variance it must return one array.")
    prediction, v = out if learned else (out, None)
    if jnp.shape(prediction) != z_t.shape:
        raise ValueError(f"pred_fn must return a prediction of z_t's shape {z_t.shape}, got {jnp.shape(prediction)}.")
    return prediction, v
