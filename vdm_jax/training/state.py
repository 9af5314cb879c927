"""The training state: a pytree of arrays plus hashable descriptions of how to use them."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vdm_jax.models import UNet, UNetConfig
from vdm_jax.training.checkpoint import path_str
from vdm_jax.training.faults import init_faults
from vdm_jax.training.objective import Objective, make_objective


DECAY_MASKS = ("official", "kernels")
"""`optim.weight_decay_mask`'s values: which parameters AdamW decays (`decay_mask`)."""
_LAYER_NORM_SCALES = (("layer_norm", "scale"), ("final_layer_norm", "scale"))  # (google-research/vdm's names)


def decay_mask(params, kind: str = "kernels") -> Any:
    """True for the parameters AdamW's weight decay applies to; `params` is the train state's tree
    {'model': ..., 'schedule': ...}.

    'official': google-research/vdm's mask (`experiment.py`, `get_optimizer`): every parameter but
      those named `bias` and LayerNorm scales (the U-Net has no LayerNorm). The U-Net's GroupNorm
      scales and a learned schedule's parameters (the linear schedule's w and b) are decayed.
    'kernels': the U-Net's kernels only (convolutions, dense layers). Decay pulls a parameter toward
      0 at rate lr·λ whatever the loss says: the schedule's end points γ(0), γ(1) (and so the noise
      range and the bound) toward 0, and a GroupNorm's scale toward a layer that outputs only its
      offset; neither is a weight whose size regularisation should shrink.
    """
    def official(names):
        return names[-1] != "bias" and tuple(names[-2:]) not in _LAYER_NORM_SCALES

    def kernels(names):
        return names[0] == "model" and names[-1] == "kernel"

    rule = {"official": official, "kernels": kernels}[kind]
    # (nnx.State's paths end in the Variable's value)
    return jax.tree_util.tree_map_with_path(lambda path, _: rule(path_str(path).removesuffix("/value").split("/")),
                                            params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimiser's settings (`config.optim` without the EMA): hashable, static under `jit`.

    Adam or AdamW (weight decay on the parameters `decay_mask(params, weight_decay_mask)` picks)
    after global-norm clipping (`grad_clip`, 0: none), with the learning rate warmed up linearly
    from 0 over `warmup_steps` steps, lr·min(1, step/warmup_steps), then constant.
    """

    optimizer: str  # (no defaults here: `default_config()` is the one source of them)
    learning_rate: float
    warmup_steps: int
    b1: float
    b2: float
    eps: float
    weight_decay: float
    weight_decay_mask: str
    grad_clip: float

    @classmethod
    def from_config(cls, optim) -> "Optimizer":
        return cls(**{f.name: optim[f.name] for f in dataclasses.fields(cls)})

    def schedule(self) -> optax.Schedule:
        if self.warmup_steps == 0:
            return optax.constant_schedule(self.learning_rate)
        return optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)

    def transformation(self) -> optax.GradientTransformation:
        adam = dict(learning_rate=self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps)
        mask = functools.partial(decay_mask, kind=self.weight_decay_mask)
        opt = (optax.adamw(**adam, weight_decay=self.weight_decay, mask=mask) if self.optimizer == "adamw"
               else optax.adam(**adam))
        return optax.chain(*([clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []), opt)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` (its state, and its update to float rounding: g·(max_norm/norm), one
    scalar that XLA fuses into the optimiser's passes, where optax's (g/norm)·max_norm is a pass of its
    own over every array), taking the norm as `grad_norm=` when the caller has it: the train step's
    fault check computes it anyway (`faults.inspect`), so a second pass over every gradient array is
    saved. Without `grad_norm` it computes the norm itself."""
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)  # (one scalar: XLA fuses g·scale into its readers)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    `params` and `ema_params` are `{'model': nnx.State, 'schedule': nnx.State or {}}` (the
    schedule's state only for a learned VDM schedule); `opt_state` is optax's state for that tree.
    `faults` records non-finite steps (`vdm_jax.training.faults`). The static fields (graph
    definitions, objective, optimiser settings, EMA decay, what to do with a non-finite step) are
    hashable descriptions, part of the pytree's structure, so `train_step` stays a pure function
    of this state and two states built from one config compile once.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    faults: dict[str, Any]
    graphdef: Any = struct.field(pytree_node=False)
    schedule_graphdef: Any = struct.field(pytree_node=False)
    objective: Objective = struct.field(pytree_node=False)
    optimizer: Optimizer = struct.field(pytree_node=False)
    ema_decay: float = struct.field(pytree_node=False)
    on_nonfinite: str = struct.field(pytree_node=False, default="stop")

    def checkpoint_tree(self) -> dict[str, Any]:
        """The arrays a checkpoint holds (no code, no static structure); `state.replace(**tree)` restores them."""
        return {"step": self.step, "params": self.params, "ema_params": self.ema_params,
                "opt_state": self.opt_state, "faults": self.faults}


def create_train_state(config, model_config: UNetConfig, *, key) -> TrainState:
    """Builds the model (and learned schedule), the optimiser state and the EMA from a validated config.

    Everything is initialised in one compiled call: op-by-op initialisation compiles one small
    program per parameter shape, which takes many seconds on a CPU.
    """
    objective = make_objective(config, model_config)
    optimizer = Optimizer.from_config(config.optim)

    def modules(key):
        key_model, key_schedule = jax.random.split(key)
        return (UNet(model_config, rngs=nnx.Rngs(params=key_model)),
                objective.init_schedule(nnx.Rngs(params=key_schedule)))

    def init(key):
        model, schedule_model = modules(key)
        params = {"model": nnx.split(model)[1],
                  "schedule": {} if schedule_model is None else nnx.split(schedule_model)[1]}
        return params, jax.tree.map(jnp.copy, params), optimizer.transformation().init(params)

    model, schedule_model = nnx.eval_shape(lambda: modules(jax.random.key(0)))
    params, ema_params, opt_state = jax.jit(init)(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=opt_state,
                      faults=init_faults(objective.terms), graphdef=nnx.split(model)[0],
                      schedule_graphdef=None if schedule_model is None else nnx.split(schedule_model)[0],
                      objective=objective, optimizer=optimizer, ema_decay=float(config.optim.ema_decay),
                      on_nonfinite=config.training.on_nonfinite)
