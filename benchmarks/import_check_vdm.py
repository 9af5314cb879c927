"""The official side of `python -m benchmarks import_check --from=vdm`, in a process of its own: imports
google-research/vdm's own, unmodified `model_vdm.py` and `train_state.py` from SPEC's "vdm_code" (a
folder holding them, outside this repository), trains the official `VDM` on the subset's training
images as `experiment.py` and `experiment_vdm.py` do, saves the train state as clu does, and
records the official bound of the EMA parameters on fixed test images and draws.

    python -m benchmarks.import_check_vdm SPEC.json OUT_DIR

SPEC: {"vdm_code", "config": VDMConfig kwargs, "data": npz path, "steps", "batch", "seed",
"optimizer": cifar10.py's {"learning_rate", "warmup", "ema_rate", "args"}, "eval_images": N}.
Writes OUT_DIR/checkpoints-0/ckpt-1.flax (`flax.serialization.to_bytes` of the official
`TrainState`, what clu's `Checkpoint.save` writes), OUT_DIR/train.json (bits/dim per step,
seconds) and OUT_DIR/reference.npz (the test images [N, 32, 32, 3] uint8, the draws eps_0, t and
eps that `VDM.__call__` made, its loss terms [N] in nats, and the score network's eps_hat at z_t).
"""
import json
import os
import sys
import time


def main(spec_path: str, out: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    sys.path.insert(0, spec["vdm_code"])
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.core import FrozenDict, freeze, unfreeze

    import model_vdm
    import train_state

    jax.tree_multimap = jax.tree.map  # used by train_state.py; removed from JAX in 0.3.16 (same function)
    model = model_vdm.VDM(model_vdm.VDMConfig(**spec["config"]))
    opt = spec["optimizer"]

    def get_optimizer(lr):  # experiment.py's Experiment.get_optimizer (adamw, no gradient_clip_norm)
        def decay_mask_fn(params):
            flat_params = flax.traverse_util.flatten_dict(unfreeze(params))
            flat_mask = {path: (path[-1] != "bias" and path[-2:] not in [("layer_norm", "scale"),
                                                                          ("final_layer_norm", "scale")])
                         for path in flat_params}
            return FrozenDict(flax.traverse_util.unflatten_dict(flat_mask))
        return optax.adamw(learning_rate=lr, mask=decay_mask_fn, **opt["args"])

    def loss_fn(params, inputs, rng, is_train):  # experiment_vdm.py's Experiment_VDM.loss_fn, its bits/dim
        rng, sample_rng = jax.random.split(rng)
        rngs = {"sample": sample_rng}
        if is_train:
            rng, dropout_rng = jax.random.split(rng)
            rngs["dropout"] = dropout_rng
        outputs = model.apply({"params": params}, **inputs, rngs=rngs, deterministic=not is_train)
        rescale_to_bpd = 1. / (np.prod(inputs["images"].shape[1:]) * np.log(2.))
        terms = {k: jnp.mean(getattr(outputs, "loss_" + k)) * rescale_to_bpd for k in ("klz", "recon", "diff")}
        return terms["klz"] + terms["recon"] + terms["diff"], terms

    # Experiment.__init__ and Experiment_VDM.get_model_and_params (flax's init gave a FrozenDict in 2022)
    rng = jax.random.PRNGKey(spec["seed"])
    rng, model_rng = jax.random.split(rng)
    rng1, rng2 = jax.random.split(model_rng)
    variables = freeze(model.init({"params": rng1, "sample": rng2}, images=jnp.zeros((2, 32, 32, 3), "uint8"),
                                  conditioning=jnp.zeros((2,))))
    state = train_state.TrainState.create(apply_fn=model.apply, variables=variables, optax_optimizer=get_optimizer)
    lr_schedule = optax.linear_schedule(0.0, opt["learning_rate"], opt["warmup"])  # (lr_decay=False)
    rng, train_rng = jax.random.split(rng)

    @jax.jit
    def train_step(state, batch):  # Experiment.train_step on one device (no pmap, no axis_index fold)
        rng = jax.random.fold_in(train_rng, state.step)
        (bpd, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng=rng, is_train=True)
        return state.apply_gradients(grads=grads, lr=lr_schedule(state.step), ema_rate=opt["ema_rate"]), bpd

    data = np.load(spec["data"])
    x_train, draw = data["x_train"], np.random.default_rng(spec["seed"])
    zeros = jnp.zeros((spec["batch"],), "uint8")  # dataset.py's conditioning for cifar10
    bpd, start = [], time.perf_counter()
    for _ in range(spec["steps"]):
        images = x_train[draw.integers(len(x_train), size=spec["batch"])]
        state, loss = train_step(state, {"images": jnp.asarray(images), "conditioning": zeros})
        bpd.append(float(loss))
        if len(bpd) == 1:
            first_s = time.perf_counter() - start  # (compilation included)
    train_s = time.perf_counter() - start
    os.makedirs(os.path.join(out, "checkpoints-0"))
    with open(os.path.join(out, "checkpoints-0", "ckpt-1.flax"), "wb") as f:  # clu's save counter starts at 1
        f.write(flax.serialization.to_bytes(state))

    # The reference: the official bound of the EMA parameters on fixed test images (eval mode, one draw
    # each), run eagerly so that its draws (jax.random.normal, uniform) can be recorded as it makes them.
    images = data["x_test"][:spec["eval_images"]]
    drawn = {}

    def recording(name, fn):
        def draw(*args, **kwargs):
            drawn.setdefault(name, []).append(fn(*args, **kwargs))
            return drawn[name][-1]
        return draw

    normal, uniform = jax.random.normal, jax.random.uniform
    jax.random.normal, jax.random.uniform = recording("normal", normal), recording("uniform", uniform)
    try:
        outputs = model.apply({"params": state.ema_params}, jnp.asarray(images), jnp.zeros((len(images),)),
                              rngs={"sample": jax.random.PRNGKey(spec["seed"] + 1)}, deterministic=True)
    finally:
        jax.random.normal, jax.random.uniform = normal, uniform
    (eps_0, eps), (t0,) = drawn["normal"], drawn["uniform"]
    t = jnp.mod(t0 + jnp.arange(0., 1., step=1. / len(images)), 1.)  # VDM.__call__'s antithetic t (T = 0)
    ema = {"params": state.ema_params}
    g_t = model.apply(ema, t, method=lambda m, t: m.gamma(t))
    z_t = model.apply(ema, images, method=lambda m, x: m.encdec.encode(x))
    z_t = jnp.sqrt(1. - jax.nn.sigmoid(g_t))[:, None, None, None] * z_t \
        + jnp.sqrt(jax.nn.sigmoid(g_t))[:, None, None, None] * eps
    eps_hat = model.apply(ema, z_t, g_t, jnp.zeros((len(images),)),
                          method=lambda m, *a: m.score_model(*a, deterministic=True))
    np.savez(os.path.join(out, "reference.npz"), images=images, eps_0=eps_0, t=t, eps=eps, z_t=z_t,
             eps_hat=eps_hat, loss_recon=outputs.loss_recon, loss_klz=outputs.loss_klz,
             loss_diff=outputs.loss_diff)
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump({"losses": bpd, "train_s": train_s, "first_step_s": first_s, "step": int(state.step),
                   "parameters": sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
                   "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
                   "gamma": {k: float(v[0]) for k, v in unfreeze(state.ema_params["gamma"]).items()}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
