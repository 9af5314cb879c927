"""Import a released checkpoint into a vdm_jax work directory, which every tool then reads as a run's.

    python -m experiments.import_checkpoint --from=vdm --checkpoint=PATH --workdir=DIR [--data=SPEC]
    python -m experiments.import_checkpoint --from=ddpm --checkpoint=PATH_OR_DIR --workdir=DIR [--data=SPEC]
    python -m experiments.evaluate --workdir=DIR [--num_samples=N --sampler=dpm_solver] [--ode_bpd]

--from=vdm: google-research/vdm's train state (`checkpoints-0/ckpt-N.flax`, or that directory; read by
`vdm_jax.models.vdm_weights` without the official code). The work directory's config is
experiments/configs/cifar10.py:vdm (the official recipe) with the network read from the file, its
'learnable_scalar' schedule as diffusion.schedule='learned_linear' (a 'fixed' one as 'linear') and
the settings the file does not hold from the flags below (the official CIFAR-10 values by default).

--from=ddpm: DDPM's weights as diffusers publishes them (`google/ddpm-cifar10-32`: the folder with
config.json and diffusion_pytorch_model.safetensors or .bin, or that file; read by
`vdm_jax.models.ddpm_weights` without running code from it). The config is
experiments/configs/cifar10.py:ddpm (linear β from 1e-4 to 0.02, T = 1000, the reverse variance β of
Ho et al.'s CIFAR-10 samples) with the network read from config.json (`time_offset=-1`: diffusers counts
the steps from 0); a scheduler_config.json beside it, if any, must describe that process. The files hold
one set of weights: they become both the parameters and the EMA parameters, at step 0 (no step is recorded).

What is written: DIR/config.json and one orbax checkpoint at the official step, with the official
parameters and EMA parameters (U-Net and schedule), a fresh optimiser state and no data position, so
`experiments.evaluate` reads it (bits/dim, samples with any sampler, ODE bits/dim, FID). An existing,
non-empty DIR is refused; nothing is left behind if the import fails.

Each source is a function in `SOURCES` that reads its file into an `Imported` record (the vdm_jax
config and the parameters); writing the work directory is shared.
"""
import dataclasses
import os
import shutil
from typing import Any, Callable

from absl import flags


@dataclasses.dataclass
class Imported:
    """What a source's reader returns: the work directory's config and the train state's arrays.

    params, ema_params: {'model': the U-Net's nnx.State, 'schedule': a learned schedule's nnx.State or {}},
    the structure of `vdm_jax.training.TrainState.params`.
    """

    config: Any  # an ml_collections.ConfigDict of the schema (`vdm_jax.training.default_config()`)
    params: dict
    ema_params: dict
    step: int
    what: str  # e.g. "google-research/vdm's checkpoint PATH", for the summary line


def _from_vdm(FLAGS) -> Imported:
    from flax import nnx

    from experiments.configs.cifar10 import vdm as official_recipe
    from vdm_jax.models.vdm_weights import read_vdm_checkpoint
    from vdm_jax.schedules import LearnedLinearSchedule
    from vdm_jax.training import set_model

    ckpt = read_vdm_checkpoint(FLAGS.checkpoint, image_size=FLAGS.image_size)
    config = official_recipe()
    set_model(config, ckpt.model_config, dtype=config.model.dtype)  # (the recipe's activations: float32)
    config.diffusion.timesteps = FLAGS.timesteps
    config.diffusion.gamma_min, config.diffusion.gamma_max = FLAGS.gamma_min, FLAGS.gamma_max
    config.diffusion.schedule = "learned_linear" if ckpt.gamma_type == "learnable_scalar" else "linear"

    def schedule(values: dict):
        if not values:
            return {}
        module = LearnedLinearSchedule(FLAGS.gamma_min, FLAGS.gamma_max)
        module.w[...], module.b[...] = values["w"], values["b"]
        return nnx.split(module)[1]

    return Imported(config, {"model": ckpt.params, "schedule": schedule(ckpt.schedule)},
                    {"model": ckpt.ema_params, "schedule": schedule(ckpt.ema_schedule)}, ckpt.step,
                    f"google-research/vdm's checkpoint {os.path.abspath(FLAGS.checkpoint)}")


def _from_ddpm(FLAGS) -> Imported:
    from experiments.configs.cifar10 import ddpm as ddpm_recipe
    from vdm_jax.models.ddpm_weights import load_ddpm_family, load_ddpm_weights
    from vdm_jax.training import set_model

    model_config, params = load_ddpm_weights(FLAGS.checkpoint)
    family = load_ddpm_family(FLAGS.checkpoint)  # (checks a scheduler_config.json: linear β, T = 1000)
    config = ddpm_recipe()
    set_model(config, model_config.replace(prediction=family.prediction))
    config.diffusion.timesteps = family.timesteps
    config.diffusion.beta_start, config.diffusion.beta_end = family.beta_start, family.beta_end
    weights = {"model": params, "schedule": {}}
    return Imported(config, weights, weights, 0, f"DDPM's weights (diffusers) {os.path.abspath(FLAGS.checkpoint)}")


SOURCES: dict[str, Callable[[Any], Imported]] = {"vdm": _from_vdm, "ddpm": _from_ddpm}
"""--from's choices: name -> the reader of its checkpoint."""

flags.DEFINE_enum("from", None, list(SOURCES), "The checkpoint's origin: vdm (google-research/vdm's Flax msgpack "
                  "train state) or ddpm (DDPM's weights as diffusers publishes them, google/ddpm-cifar10-32).")
flags.DEFINE_string("checkpoint", None, "The released checkpoint: a file, or the directory the source's code wrote.")
flags.DEFINE_string("workdir", None, "The vdm_jax work directory to write (new, or empty).")
flags.DEFINE_string("data", None, "config.data.source of the work directory: the data evaluate reads by default "
                    "(default: the base config's, tfds:cifar10).")
flags.DEFINE_integer("image_size", 32, "The images' size (not in the file; 32 for CIFAR-10).", lower_bound=1)
flags.DEFINE_float("gamma_min", -13.3, "vdm: the official config's gamma_min (not in the file): the network sees "
                   "(γ - gamma_min) / (gamma_max - gamma_min).")
flags.DEFINE_float("gamma_max", 5.0, "vdm: the official config's gamma_max (not in the file).")
flags.DEFINE_integer("timesteps", 0, "vdm: the official config's sm_n_timesteps (not in the file; 0: continuous time).",
                     lower_bound=0)
flags.mark_flags_as_required(["from", "checkpoint", "workdir"])


def _check_workdir(workdir: str) -> str:
    from vdm_jax.training import WorkdirError

    if "://" in workdir:
        raise WorkdirError(f"--workdir={workdir} is a URL: the work directory is written through the file system; "
                           "mount the bucket and give its path.")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise WorkdirError(f"--workdir={workdir} exists and is not an empty directory: an import writes a new work "
                           "directory; give another path.")
    return workdir


def _filled(target, source):
    """`target`'s pytree (a train state's params) with the values of `source`, leaf by leaf and path by path:
    the structure stays the one `create_train_state` makes, which every tool restores into."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vdm_jax.training.checkpoint import path_str

    values = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    made = []
    for p, ref in jax.tree_util.tree_flatten_with_path(target)[0]:
        if path_str(p) not in values:
            raise ValueError(f"the imported parameters have no {path_str(p)}, which the model needs")
        value = np.asarray(values.pop(path_str(p)))
        made.append(jnp.asarray(value.reshape(ref.shape), ref.dtype))
    if values:
        raise ValueError(f"the imported parameters have {len(values)} array(s) the model has no place for, e.g. "
                         f"{sorted(values)[0]}")
    return jax.tree.unflatten(jax.tree.structure(target), made)


def import_checkpoint(FLAGS) -> dict:
    import jax
    import jax.numpy as jnp

    from vdm_jax.training import Checkpointer, create_train_state, validate_config
    from vdm_jax.training.checkpoint import save_config

    source = getattr(FLAGS, "from")
    workdir = _check_workdir(FLAGS.workdir)  # (before any work)
    imported = SOURCES[source](FLAGS)
    config = imported.config
    if FLAGS.data:
        config.data.source = FLAGS.data
    model_config = validate_config(config)
    state = create_train_state(config, model_config, key=jax.random.key(config.seed))
    params, ema_params = (_filled(state.params, imported.params), _filled(state.params, imported.ema_params))
    state = state.replace(step=jnp.asarray(imported.step, jnp.int32), params=params, ema_params=ema_params,
                          opt_state=state.optimizer.transformation().init(params))
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        try:
            ckpt.save(imported.step, state.checkpoint_tree(), {"seed": config.seed, "imported_from": imported.what},
                      force=True)
            ckpt.wait()
        finally:
            ckpt.close()
        save_config(workdir, config.to_dict())
    except BaseException:  # (Ctrl-C included) a half-written work directory would read as a run
        shutil.rmtree(workdir, ignore_errors=True)
        if not created:
            os.makedirs(workdir, exist_ok=True)  # (it was there, empty)
        raise
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"imported {imported.what} (step {imported.step}, {count:,} parameters, with their EMA) into {workdir}; "
          f"evaluate it with: python -m experiments.evaluate --workdir={workdir}")
    return {"workdir": workdir, "step": imported.step, "parameters": count}


def main(argv):
    del argv  # parse_flags has rejected anything but flags
    from absl import logging

    from experiments.common import run_or_explain, start_jax

    logging.set_verbosity(logging.WARNING)
    start_jax()
    run_or_explain(import_checkpoint, flags.FLAGS)


if __name__ == "__main__":
    from experiments.common import parse_flags, run_app

    run_app(main, parse_flags)
