"""The training state: a pytree of arrays plus the static pieces that say how to use them."""
from __future__ import annotations

import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from flax import nnx, struct

from vdm_jax.models import UNet, UNetConfig
from vdm_jax.training.faults import init_faults
from vdm_jax.training.objective import Objective


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    `params` and `ema_params` are `{'model': nnx.State, 'schedule': nnx.State or {}}` (the
    schedule's state only for a learned VDM schedule). `opt_state` is the optimiser's state for
    all parameters raveled into one vector (`jax.flatten_util.ravel_pytree` order): the step
    updates the parameters, the optimiser state and the EMA as a few loops over that vector
    rather than several per parameter array. `faults` records non-finite steps
    (`vdm_jax.training.faults`). The static fields (graph definitions, optimiser, objective,
    what to do with a non-finite step) are part of the pytree's structure, so `train_step` stays
    a pure function of this state.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    faults: dict[str, jax.Array]
    graphdef: Any = struct.field(pytree_node=False)
    schedule_graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    learning_rate: Callable = struct.field(pytree_node=False)
    objective: Objective = struct.field(pytree_node=False)
    ema_decay: float = struct.field(pytree_node=False)
    on_nonfinite: str = struct.field(pytree_node=False, default="stop")

    def checkpoint_tree(self) -> dict[str, Any]:
        """The arrays a checkpoint holds (no code, no static structure)."""
        return {"step": self.step, "params": self.params, "ema_params": self.ema_params,
                "opt_state": self.opt_state, "faults": self.faults}

    def replace_from_checkpoint(self, tree: dict[str, Any]) -> "TrainState":
        return self.replace(step=tree["step"], params=tree["params"], ema_params=tree["ema_params"],
                            opt_state=tree["opt_state"], faults=tree["faults"])


def make_optimizer(optim) -> tuple[optax.GradientTransformation, Callable]:
    """Adam/AdamW with linear warmup to a constant learning rate and global-norm clipping.

    The same settings give the same (cached) objects, so states built twice from one config have
    equal static fields and a jitted step does not recompile for the second one.
    """
    return _optimizer(**{k: optim[k] for k in ("optimizer", "learning_rate", "warmup_steps", "b1", "b2",
                                               "eps", "weight_decay", "grad_clip")})


@functools.lru_cache(maxsize=None)
def _optimizer(*, optimizer, learning_rate, warmup_steps, b1, b2, eps, weight_decay, grad_clip):
    optim = types.SimpleNamespace(optimizer=optimizer, learning_rate=learning_rate, warmup_steps=warmup_steps,
                                  b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, grad_clip=grad_clip)
    # Warm-up from lr/warmup (not 0, which would make the first step a no-op) to lr.
    lr = optax.join_schedules(
        [optax.linear_schedule(optim.learning_rate / max(optim.warmup_steps, 1), optim.learning_rate,
                               max(optim.warmup_steps, 1)),
         optax.constant_schedule(optim.learning_rate)], [max(optim.warmup_steps, 1)])
    if optim.warmup_steps == 0:
        lr = optax.constant_schedule(optim.learning_rate)
    if optim.optimizer == "adamw":
        opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    else:
        opt = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    return optax.chain(*parts, opt), lr


def create_train_state(config, model_config: UNetConfig, *, key) -> TrainState:
    """Builds the model (and learned schedule), the optimiser and the EMA from a validated config.

    Everything is initialised in one compiled call: op-by-op initialisation compiles one small
    program per parameter shape, which takes many seconds on a CPU.
    """
    objective = Objective.from_config(config, model_config)
    hidden = config.diffusion.schedule_hidden
    tx, lr = make_optimizer(config.optim)

    def modules(key):
        key_model, key_schedule = jax.random.split(key)
        model = UNet(model_config, rngs=nnx.Rngs(params=key_model))
        return model, objective.make_schedule_model(hidden, nnx.Rngs(params=key_schedule))

    def init(key):
        model, schedule_model = modules(key)
        params = {"model": nnx.split(model)[1],
                  "schedule": {} if schedule_model is None else nnx.split(schedule_model)[1]}
        return params, jax.tree.map(jnp.copy, params), tx.init(ravel_pytree(params)[0])

    model, schedule_model = nnx.eval_shape(lambda: modules(jax.random.key(0)))
    graphdef = nnx.split(model)[0]
    schedule_graphdef = None if schedule_model is None else nnx.split(schedule_model)[0]
    params, ema_params, opt_state = jax.jit(init)(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=opt_state,
                      faults=init_faults(), graphdef=graphdef, schedule_graphdef=schedule_graphdef, tx=tx,
                      learning_rate=lr, objective=objective, ema_decay=float(config.optim.ema_decay),
                      on_nonfinite=config.training.on_nonfinite)
