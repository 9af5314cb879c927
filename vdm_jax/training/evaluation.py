"""Evaluate a trained model: bits/dim on a whole split, samples at scale, and their FID.

    config, state = load_checkpoint(workdir)            # EMA parameters included, replicated
    result = evaluate_bpd(state, source, mesh=mesh, batch_size=256, key=key, draws=4)
    images = generate_samples(state, mesh=mesh, num=10_000, key=key, sampler="ddim", sample_steps=100)
    features = inception_features(fid_inception(weights_path), images, mesh=mesh)
    scores = sample_quality(features, load_statistics("cifar10_train.npz"))     # FID, IS

Each is sharded over the devices with one compiled program; `evaluate_bpd` reads every
example once and reports bits per dimension (docs/math.md §5) with standard errors, and the images
of `generate_samples` depend only on the state, the key and the batch size.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vdm_jax._files import atomic_write
from vdm_jax.data import check_source, eval_iterator, num_eval_batches
from vdm_jax.training import parallel, steps
from vdm_jax.training.checkpoint import Checkpointer, saved_config
from vdm_jax.training.config import checked_config, validate_config
from vdm_jax.training.metrics import progress_bar
from vdm_jax.training.state import TrainState, create_train_state

TERMS = ("prior", "diffusion", "reconstruction", "total")
# `evaluate_ode_bpd`'s terms: the per-example values of `steps.ode_bpd_step` they are the mean of.
ODE_TERMS = {"prior": "prior_bpd", "flow": "flow_bpd", "dequantization": "dequantization_bpd",
             "total": "bits_per_dim", "total_iw": "bits_per_dim_iw"}
_LN2 = math.log(2.0)


class RunNotFoundError(FileNotFoundError):
    """The directory is not a training run's work directory, or it holds no checkpoint."""


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved in `workdir/config.json`, read into the schema (`checked_config`)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        config = saved_config(workdir)
    except ValueError as e:
        raise ValueError(f"{e}. Rerunning the run's training command rewrites it (it resumes from the "
                         "last checkpoint).") from None
    if config is None:
        raise RunNotFoundError(f"{os.path.join(workdir, 'config.json')} does not exist: --workdir must be the work "
                               "directory of a training run (experiments.quickstart or experiments.cifar10).")
    try:
        return checked_config(config)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{os.path.join(workdir, 'config.json')}: {e}") from None


def load_checkpoint(workdir: str, *, step: int | None = None, mesh=None, dtype: str | None = None
                    ) -> tuple[ml_collections.ConfigDict, TrainState]:
    """The config and the train state saved in a run's work directory, replicated over `mesh`.

    Builds the state's structure without initialising it (`jax.eval_shape`) and restores `step`
    (default: the newest intact one; damaged newer ones are skipped with a warning and left in
    place) straight into replicated device buffers. Nothing in `workdir` is changed.

    `dtype` ('auto', 'float32', 'bfloat16') replaces the run's `model.dtype`, the U-Net's
    activation dtype: e.g. sample in bfloat16 from a run trained in float32, or evaluate the bound
    in float32. The parameters are float32 either way.

    Raises:
      RunNotFoundError: no config.json, no checkpoint, or no checkpoint at `step`.
      CheckpointMismatchError: the checkpoint does not fit the saved config's model.
      CorruptCheckpointError: the checkpoint at `step` (or every one) is damaged.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = read_config(workdir)
    if dtype is not None:
        config.model.dtype = dtype
    model_config = validate_config(config)
    directory = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(directory, async_save=False, read_only=True) if os.path.isdir(directory) else None
    try:
        saved = ckpt.all_steps() if ckpt else []
        if not saved or (step is not None and step not in saved):
            raise RunNotFoundError(f"{workdir} has no checkpoint at step {step}; it has steps {saved}." if saved
                                   else f"{workdir} has no checkpoint yet (looked in {directory}).")
        abstract = jax.eval_shape(lambda key: create_train_state(config, model_config, key=key), jax.random.key(0))
        target = parallel.replicated_like(abstract.checkpoint_tree(), mesh or parallel.make_mesh())
        tree = ckpt.restore_latest(target)[1] if step is None else ckpt.restore(target, step)[0]
    finally:
        if ckpt:
            ckpt.close()
    return config, abstract.replace(**tree)


# --- bits per dimension ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _per_example_fn(mesh, step, options: tuple):
    """`step(state, batch, key=key, **options)`, jitted with the batch sharded over `mesh`: ({name: [B]}
    and the examples' 'index' [B], mask [B]), gathered."""
    rep = parallel.replicated(mesh)

    def fn(state, batch, key):
        values = step(state, {k: v for k, v in batch.items() if k in ("image", "label")}, key=key, **dict(options))
        return {**values, "index": batch["index"]}, batch["mask"]

    return jax.jit(fn, in_shardings=(rep, parallel.batch_sharding(mesh), rep), out_shardings=rep)


def _every_example(step, options: dict, state, source, *, mesh, batch_size: int, key, progress: bool, desc: str):
    """({name: float64 [N]} of `step`'s per-example values in the source's order, N): every example of
    `source` exactly once, batch b with `fold_in(key, b)` (`_per_example_fn`)."""
    parallel.check_batch_size(batch_size, mesh, name="batch_size")
    check_images(source, state.objective.image_shape)
    fn = _per_example_fn(mesh, step, tuple(sorted(options.items())))
    bar = progress_bar(progress, total=num_eval_batches(len(source), batch_size), desc=desc, unit="batch")
    parts = []
    keys = ("image", "index", "mask") + (("label",) if state.objective.num_classes else ())
    for b, batch in enumerate(eval_iterator(source, global_batch_size=batch_size)):
        local = {k: batch[k] for k in keys}
        values, mask = jax.device_get(fn(state, parallel.global_batch(local, mesh), jax.random.fold_in(key, b)))
        parts.append({name: np.asarray(v)[np.asarray(mask, bool)] for name, v in values.items()})
        bar.update(1)
    bar.close()
    per_example = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    index, n = per_example.pop("index"), len(source)
    if index.shape[0] != n or not np.array_equal(np.sort(index), np.arange(n)):
        raise RuntimeError(f"the evaluation pass saw {index.shape[0]} examples ({np.unique(index).shape[0]} "
                           f"distinct) of a split of {n}; every example must be seen exactly once.")
    return {name: v[np.argsort(index)].astype(np.float64) for name, v in per_example.items()}, n


def _mean_and_se(values: np.ndarray) -> dict[str, float]:
    n = values.shape[0]
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")}


def check_images(source, image_shape, what: str = "the source's") -> None:
    """Raises ValueError unless `source`'s images (`vdm_jax.data.check_source`) have the model's `image_shape`."""
    shape = tuple(check_source(source))
    if shape != tuple(image_shape):
        raise ValueError(f"{what} images have shape {shape} but the model takes {tuple(image_shape)} "
                         "(config.model.image_size, config.model.in_channels).")


def check_labels(source, num_classes: int, what: str = "the source") -> None:
    """Raises ValueError unless every example of `source` has a label in 0..num_classes-1 (a
    class-conditional model's data); nothing to check for an unconditional model (num_classes 0)."""
    if not num_classes:
        return
    labels = getattr(source, "labels", None)  # (an ArraySource's, all of them; else the first examples')
    labels = np.asarray(labels if labels is not None else [source[i]["label"] for i in range(min(len(source), 64))])
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what} has no labels, but model.num_classes={num_classes} makes the model class-"
                         "conditional: use labelled data, or model.num_classes=0.")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{what} has the label {int(labels.max())}, outside 0..{num_classes - 1} "
                         f"(model.num_classes={num_classes}).")


_NO_LABEL = "no_label/"


def _bounds_with_and_without_label(state: TrainState, batch, *, key, **options) -> dict[str, jax.Array]:
    """`steps.eval_step` of a class-conditional model given the batch's labels, and (keys prefixed
    `_NO_LABEL`) given none, with the same draws of t and ε."""
    without = steps.eval_step(state, batch, key=key, conditional=False, **options)
    return steps.eval_step(state, batch, key=key, **options) | {_NO_LABEL + k: v for k, v in without.items()}


def evaluate_bpd(state: TrainState, source, *, mesh, batch_size: int, key, draws: int = 1,
                 full_vlb: bool = False, progress: bool = False) -> dict[str, Any]:
    """The bound in bits/dim on every example of `source`, each exactly once, with the EMA parameters.

    Args:
      state: the train state (replicated over `mesh`).
      source: a random-access source (`vdm_jax.data.load_source`); every host passes the same one.
      mesh: the device mesh; batches are sharded over its data axis.
      batch_size: global examples per batch (a multiple of the device count).
      key: PRNG key; batch b uses `fold_in(key, b)`.
      draws: independent estimates of each example's bound to average (t and ε redrawn).
      full_vlb: DDPM only: every term of the discrete bound (all T steps) in each draw.
      progress: show a progress bar.
    Returns:
      {'examples': N, 'draws', 'full_vlb', 'bpd': {term: {'mean', 'se'}} for TERMS,
       'per_example_nats': {term: float64 [N]} ordered by the source's index, and with full_vlb
       'per_t_bpd': [T] the mean of each L_{t-1}, t = 1..T}. A class-conditional model's bound is
       given each example's label, and its bound given no label is added as 'bpd_unconditional'
       (the same draws of t and ε).
    Raises:
      ValueError: a batch size that does not split over the devices, draws < 1, images of
        another shape than the model's, or full_vlb for a VDM.
      RuntimeError: the pass did not cover every example exactly once (a data pipeline bug).
    """
    both = bool(state.objective.num_classes and not full_vlb)  # (given the label and given none, in one pass)
    per_example, n = _every_example(_bounds_with_and_without_label if both else steps.eval_step,
                                    dict(draws=draws, full_vlb=bool(full_vlb)), state, source, mesh=mesh,
                                    batch_size=batch_size, key=key, progress=progress, desc="bpd")
    scale = state.objective.dims * _LN2
    result = {"examples": n, "draws": int(draws), "full_vlb": bool(full_vlb),
              "bpd": {name: _mean_and_se(per_example[name] / scale) for name in TERMS}}
    if both:
        result["bpd_unconditional"] = {name: _mean_and_se(per_example.pop(_NO_LABEL + name) / scale)
                                       for name in TERMS}
    if "per_t" in per_example:
        result["per_t_bpd"] = (per_example.pop("per_t").mean(axis=0) / scale).tolist()
    return {**result, "per_example_nats": per_example}


def evaluate_ode_bpd(state: TrainState, source, *, mesh, batch_size: int, key, num_draws: int = 1,
                     progress: bool = False, **ode_kwargs) -> dict[str, Any]:
    """Bits/dim of every example of `source`, each exactly once, under the probability-flow ODE of
    the EMA parameters (`steps.ode_bpd_step`: uniform dequantisation, `vdm_jax.ode_log_likelihood`).

    Args:
      state, source, mesh, batch_size, key, progress: as in `evaluate_bpd` (batch b: `fold_in(key, b)`).
      num_draws: dequantisation draws per example.
      **ode_kwargs: `vdm_jax.ode_log_likelihood`'s options: divergence, probe, num_probes, rtol,
        atol, max_steps, solver.
    Returns:
      {'examples': N, 'num_draws', 'options': ode_kwargs, 'bpd': {term: {'mean', 'se'}} for
       ODE_TERMS (the terms 'prior', 'flow', 'dequantization' add up to 'total'; 'total_iw' is
       importance weighted over the draws), 'nfe': {'mean', 'max'} network evaluations per example,
       'per_example': {name: float64 [N]} in the source's order}.
    """
    per_example, n = _every_example(steps.ode_bpd_step, dict(ode_kwargs, num_draws=num_draws), state, source,
                                    mesh=mesh, batch_size=batch_size, key=key, progress=progress, desc="ode bpd")
    return {"examples": n, "num_draws": num_draws, "options": dict(ode_kwargs),
            "bpd": {term: _mean_and_se(per_example[name]) for term, name in ODE_TERMS.items()},
            "nfe": {"mean": float(per_example["nfe"].mean()), "max": float(per_example["nfe"].max())},
            "per_example": per_example}


def format_bpd_table(result: dict[str, Any]) -> str:
    """The bpd result (`evaluate_bpd`'s or `evaluate_ode_bpd`'s) as a small text table (term,
    bits/dim, standard error)."""
    return "\n".join([f"{'term':<16}{'bits/dim':>12}{'± s.e.':>12}"]
                     + [f"{name:<16}{r['mean']:>12.5f}{r['se']:>12.5f}" for name, r in result["bpd"].items()])


# --- samples ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sample_fn(mesh, batch_size: int, sampler: str, sample_steps: int, guidance_interval=None):
    sharded, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def fn(state, key, labels, guidance):
        images = steps.sample_step(state, key=key, num=batch_size, sampler=sampler, sample_steps=sample_steps,
                                   labels=labels, guidance=guidance, guidance_interval=guidance_interval)
        # Pin the batch axis of the whole chain to the devices, then gather the (uint8) result.
        return jax.lax.with_sharding_constraint(images, sharded)

    return jax.jit(fn, in_shardings=(rep, rep, rep, rep), out_shardings=rep)  # (labels: [batch_size], tiny)


def generate_samples(state: TrainState, *, mesh, num: int, key, batch_size: int = 256,
                     sampler: str = "ancestral", sample_steps: int = 0, progress: bool = False, labels=None,
                     guidance: float = 0.0, guidance_interval: tuple[float, float] | None = None) -> np.ndarray:
    """`num` samples as uint8 [num, H, W, C] from the EMA parameters, in batches sharded over devices.

    Args:
      state: the train state (replicated over `mesh`).
      mesh: the device mesh.
      num: how many images.
      key: PRNG key; batch b uses `fold_in(key, b)`, so the images depend only on (state, key,
        batch_size) and the same seed gives the same images bitwise.
      batch_size: images per compiled call (a multiple of the device count); the last batch is
        drawn whole and trimmed, so every call has the same shape and nothing recompiles.
      sampler: one of `SAMPLERS`: 'ancestral' (DDPM or VDM), 'ddim', 'dpm_solver', 'heun', 'euler'.
      sample_steps: the sampler's steps (0: its default, `family.sampler_default_steps`).
      progress: show a progress bar.
      labels: a class-conditional model's class of each image, int [num] (None: no label, the
        unconditional model; `Objective.sample`).
      guidance: with labels, the classifier-free guidance weight w (docs/math.md §6.9).
      guidance_interval: with labels, (lo, hi) of γ outside which the guidance is off.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    k = state.objective.num_classes
    if labels is not None:
        labels = np.asarray(labels)
        if not k:
            raise ValueError("labels: given, but the model is unconditional (model.num_classes=0).")
        if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > k:
            raise ValueError(f"labels must be {num} integer classes in 0..{k} ({k}: no label), got "
                             f"{labels.dtype} of shape {labels.shape}.")
    padded = np.full(-(-num // batch_size) * batch_size, k, np.int32)  # (the last batch drawn whole, trimmed)
    padded[:num] = k if labels is None else labels
    sample_steps = state.objective.check_sample_steps(sample_steps, sampler, name="sample_steps")  # (0 resolved)
    parallel.check_batch_size(batch_size, mesh, name="batch_size")
    interval = None if guidance_interval is None else tuple(float(g) for g in guidance_interval)
    fn = _sample_fn(mesh, int(batch_size), sampler, int(sample_steps), interval if k else None)
    bar = progress_bar(progress, total=num, desc="samples", unit="image")
    out = []
    for lo in range(0, num, batch_size):
        labels_b = padded[lo:lo + batch_size] if k else None
        out.append(np.asarray(jax.device_get(fn(state, jax.random.fold_in(key, lo // batch_size), labels_b,
                                                 np.float32(guidance)))))
        bar.update(min(batch_size, num - lo))
    bar.close()
    return np.concatenate(out)[:num]


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes uint8 images [N, H, W, C] to `path` (.npz, key 'images'; and a class-conditional
    model's `labels` [N], key 'labels'), atomically."""
    arrays = {"images": np.asarray(images, np.uint8)} | ({} if labels is None else {"labels": np.asarray(labels)})
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, **arrays)


@functools.lru_cache(maxsize=None)
def _features_fn(mesh, graphdef):
    sharded, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    def fn(weights, images):  # uint8 [B, H, W, C], C = 1 (repeated to RGB) or 3
        x = images.astype(jnp.float32) / 255.0
        x = jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
        out = nnx.merge(graphdef, weights)(x)
        return {"pool": out["pool"], "logits_unbiased": out["logits_unbiased"]}

    return jax.jit(fn, in_shardings=(rep, sharded), out_shardings=rep)


def inception_features(network, images: np.ndarray, *, mesh, batch_size: int = 200,
                       progress: bool = False) -> dict[str, np.ndarray]:
    """The FID Inception network's features of uint8 images [N, H, W, C] (C = 1 or 3), in batches
    sharded over the devices: {'pool': [N, 2048], 'logits_unbiased': [N, 1008]}, float32.

    `network` is a `vdm_jax.models.FIDInception` (e.g. `fid_inception(path)`). Every image is the
    same on every host; the last batch is padded and trimmed, so one program serves any N.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}.")
    parallel.check_batch_size(batch_size, mesh, name="batch_size")
    graphdef, weights = nnx.split(network)
    fn, weights = _features_fn(mesh, graphdef), parallel.replicate(weights, mesh)
    sharding = parallel.batch_sharding(mesh)
    bar = progress_bar(progress, total=len(images), desc="features", unit="image")
    out = {"pool": [], "logits_unbiased": []}
    for lo in range(0, len(images), batch_size):
        batch = images[lo:lo + batch_size]
        batch = np.pad(batch, [(0, batch_size - len(batch))] + [(0, 0)] * 3)
        result = jax.device_get(fn(weights, jax.make_array_from_callback(batch.shape, sharding,
                                                                         lambda index: batch[index])))
        for k in out:
            out[k].append(np.asarray(result[k])[:len(images) - lo])
        bar.update(min(batch_size, len(images) - lo))
    bar.close()
    return {k: np.concatenate(v) for k, v in out.items()}
