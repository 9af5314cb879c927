"""XLA:CPU's convolution paths for the U-Net: jaxlib's default (YNNPACK) against `vdm_jax.set_cpu_xla_flags()`'s.

    python -m benchmarks.cpu_conv_paths [--models=tiny32,ddpm_cifar10] [--batch=32] [--repeats=5]

For each model, times (median of `--repeats`, after a warm-up call) the U-Net's forward pass (what
a sampler runs) and its gradient (what a train step runs) on one CPU device, compiled three ways:

- `default`: no compiler options (jaxlib's default, which sends convolutions and dots to YNNPACK);
- `vdm_jax`: no YNNPACK fusions (XLA's Eigen convolutions), the `--xla_cpu_experimental_ynn_fusion_type=`
  that `vdm_jax.set_cpu_xla_flags()` puts in XLA_FLAGS, passed here per program;
- `ynn_dots`: YNNPACK for dots only.

Also a single 3×3 convolution of each shape the model has, forward and forward+backward, against
`torch.nn.functional.conv2d` when torch is installed. Writes
benchmarks/results/cpu_conv_paths_<host>.json (or `--out`).
"""
import os
import platform

from absl import app, flags

from benchmarks.common import median_time, write_result

flags.DEFINE_list("models", ["tiny32"], "Models: tiny32 (0.4M), ddpm_cifar10 (35.7M).")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (the median is reported).")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS

_YNN = "xla_cpu_experimental_ynn_fusion_type"
VARIANTS = {"default": None, "vdm_jax": {_YNN: ""}, "ynn_dots": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}}


def _options(variant):
    return VARIANTS[variant]


def _time(fn, *args):
    import jax

    jax.block_until_ready(fn(*args))
    return median_time(lambda: jax.block_until_ready(fn(*args)), FLAGS.repeats)


def _unet(name: str, batch: int):
    """(graphdef, params, z, t) of a fresh `name` U-Net and a batch of inputs."""
    import jax

    from flax import nnx

    from vdm_jax.models import UNet, ddpm_cifar10, tiny

    config = {"tiny32": lambda: tiny(embedding_dim=24), "ddpm_cifar10": ddpm_cifar10}[name]().replace(dropout=0.0)
    graphdef, params = nnx.split(UNet(config, rngs=nnx.Rngs(params=jax.random.key(0))))
    z = jax.random.normal(jax.random.key(1), (batch, config.image_size, config.image_size, config.in_channels))
    t = jax.random.uniform(jax.random.key(2), (batch,))
    return graphdef, params, z, t


def bench_unet(name: str, graphdef, params, z, t) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def forward(p, z, t):
        return nnx.merge(graphdef, p)(z, t)

    def loss(p, z, t):
        return jnp.mean((forward(p, z, t) - z) ** 2)

    out = {}
    for variant in VARIANTS:
        opts = _options(variant)
        fwd = jax.jit(forward, compiler_options=opts)
        grad = jax.jit(jax.grad(loss), compiler_options=opts)
        out[variant] = {"forward_s": _time(fwd, params, z, t), "grad_s": _time(grad, params, z, t)}
        print(f"{name} B={z.shape[0]} {variant:9} forward {out[variant]['forward_s']:.4f} s  "
              f"gradient {out[variant]['grad_s']:.4f} s", flush=True)
    return out


def _conv_shapes(graphdef, params, z, t):
    """(H, C_in, C_out) of the U-Net's 3×3 stride-1 convolutions, without repeats (from its jaxpr)."""
    import jax
    from flax import nnx

    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(z, t))(params)
    shapes = set()
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and eqn.params["window_strides"] == (1, 1):
            x, w = (v.aval.shape for v in eqn.invars)
            if w[:2] == (3, 3):
                shapes.add((x[1], w[2], w[3]))
    return sorted(shapes)


def bench_convs(graphdef, params, z, t) -> list:
    import jax
    import jax.numpy as jnp

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def fwd_bwd(x, w):
        return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)

    rows = []
    batch = z.shape[0]
    for size, cin, cout in _conv_shapes(graphdef, params, z, t):
        x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
        w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
        flops = 2 * batch * size * size * 9 * cin * cout
        row = {"shape": f"B{batch} {size}x{size} {cin}->{cout}", "flops": flops}
        for variant in VARIANTS:
            opts = _options(variant)
            row[variant] = {"forward_gflops": flops / _time(jax.jit(conv, compiler_options=opts), x, w) / 1e9,
                            "fwd_bwd_gflops": 3 * flops / _time(jax.jit(fwd_bwd, compiler_options=opts), x, w) / 1e9}
        row.update(_torch_conv(batch, size, cin, cout, flops))
        rows.append(row)
        print(row["shape"], "GFLOP/s", {k: v for k, v in row.items() if isinstance(v, dict)}, flush=True)
    return rows


def _torch_conv(batch, size, cin, cout, flops):
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count())
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    w = torch.randn(cout, cin, 3, 3, requires_grad=True)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1)

    def fwd_bwd():
        x.grad = w.grad = None
        (torch.nn.functional.conv2d(x, w, padding=1) ** 2).sum().backward()

    fwd(), fwd_bwd()
    return {"torch": {"forward_gflops": flops / median_time(fwd, FLAGS.repeats) / 1e9,
                      "fwd_bwd_gflops": 3 * flops / median_time(fwd_bwd, FLAGS.repeats) / 1e9}}


def main(argv):
    del argv
    import jax

    if jax.default_backend() != "cpu":
        raise app.UsageError("this benchmark compares XLA:CPU's convolution paths; run it on a CPU.")
    record = {"benchmark": "cpu_conv_paths", "batch": FLAGS.batch, "repeats": FLAGS.repeats,
              "versions": {"python": platform.python_version(), "jax": jax.__version__},
              "vdm_jax_compiler_options": VARIANTS["vdm_jax"], "unet": {}, "convolutions": {}}
    for name in FLAGS.models:
        model = _unet(name, FLAGS.batch)
        record["unet"][name] = bench_unet(name, *model)
        record["convolutions"][name] = bench_convs(*model)
    write_result(record, FLAGS.out, f"cpu_conv_paths_{platform.machine()}.json")


if __name__ == "__main__":
    app.run(main)
