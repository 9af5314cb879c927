"""The PyTorch reference for `python -m benchmarks run --torch`: diffusers' `UNet2DModel` shaped
like our U-Net, in a process of its own (JAX's thread pools slow a PyTorch run in the same
process: DDPM training measured 1.02× torch in one process, 0.90× in two). `Peer` starts
`python -m benchmarks.torch_reference`, sends it the settings as one JSON line, then asks for one
measurement at a time ('matmul', 'train', 'sample'), each answered by one JSON line, so that the
caller alternates its own timed runs with the peer's while the other process waits.

The model is built from the same `UNetConfig` (its parameter count checked equal to ours); the
train step is the default DDPM config's: uint8 images to [-1, 1], t ~ U{1..T}, ε ~ N(0, I),
‖ε - ε̂‖², Adam 2e-4, global-norm clipping at 1, an EMA. Sampling is DDPM's ancestral chain with
diffusers' `DDPMScheduler`. Needs `pip install torch diffusers` (torch's CPU wheel on a CPU).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeerError(RuntimeError):
    """The PyTorch process failed; the message has its last lines of standard error."""


class Peer:
    """The PyTorch reference in its own process, one measurement per call.

        with Peer(model_config.to_dict(), params=n, batch=8, sample_batch=2, sample_steps=1000,
                  train_steps=3, dtype="float32") as peer:
            peer.info                 # params, device, threads, versions
            peer.call("matmul")       # {'flops_per_s': ...}: an n×n matmul in the run's dtype
            peer.call("train")        # {'step_s': ...}: `train_steps` steps, after a warm-up at start
            peer.call("sample")       # {'chain_s': ...}: one ancestral chain
    """

    def __init__(self, model_config: dict, *, params: int, batch: int, sample_batch: int, sample_steps: int,
                 train_steps: int, dtype: str = "float32"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        self._stderr = tempfile.TemporaryFile("w+")  # its last lines go into a PeerError
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.torch_reference"], cwd=REPO, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        settings = {"model_config": model_config, "params": params, "batch": batch, "sample_batch": sample_batch,
                    "sample_steps": sample_steps, "train_steps": train_steps, "dtype": dtype}
        self.info = self._exchange(json.dumps(settings))

    def _exchange(self, line: str) -> dict:
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
            answer = self._proc.stdout.readline()
        except BrokenPipeError:
            answer = ""
        if not answer:
            self._proc.wait()
            self._stderr.seek(0)
            tail = "".join(self._stderr.readlines()[-20:])
            raise PeerError(f"the PyTorch process exited ({self._proc.returncode}) at {line[:40]!r}:\n{tail}")
        return json.loads(answer)

    call = _exchange  # call(command) -> its answer

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._exchange("quit")
            except (PeerError, ValueError):
                pass
            self._proc.wait(timeout=60)
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_PLACEHOLDERS = []  # the torch.library.Library must stay alive for its definitions to hold


def start_peer(spec_path: str, threads: int | None = None) -> dict:
    """The start of a torch peer process: torchvision made importable (diffusers imports it when it is
    installed), the JSON spec at `spec_path` read and returned, torch seeded with its 'seed' and given
    `threads` threads (default: its 'threads')."""
    import_torchvision()
    import torch

    with open(spec_path) as f:
        spec = json.load(f)
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec["threads"] if threads is None else threads)
    return spec


def import_torchvision():
    """`import torchvision`, also where PyPI's torchvision wheel (built for torch's CUDA build) sits beside
    torch's CPU wheel, whose import fails registering fake kernels for `torchvision::nms` and `qnms`:
    those two ops are then defined as placeholders first (nothing here calls them)."""
    import importlib

    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _PLACEHOLDERS.append(lib)
    return importlib.import_module("torchvision")


def diffusers_unet(config):
    """A `UNet2DModel` with our `UNetConfig`'s architecture (`config`: its fields as attributes)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # (diffusers imports it when it is installed)
    from diffusers import UNet2DModel

    if not config.downsample or config.fourier_features or config.learned_variance:
        raise ValueError("the diffusers reference covers DDPM-shaped U-Nets only")
    sizes = [config.image_size // 2**i for i in range(len(config.channel_mult))]
    attn = [size in config.attn_resolutions for size in sizes]
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks, norm_num_groups=config.num_groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        add_attention=config.mid_attention, dropout=config.dropout, flip_sin_to_cos=False, freq_shift=1)


class _Reference:
    """The PyTorch side: the model, its train step and its sampling chain."""

    def __init__(self, settings: dict):
        import diffusers
        import numpy as np
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count())
        self.torch, self.settings = torch, settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        config = types.SimpleNamespace(**settings["model_config"])
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings["dtype"]]
        self.model = diffusers_unet(config).to(self.device)
        params = sum(p.numel() for p in self.model.parameters())
        if params != settings["params"]:
            raise RuntimeError(f"parameter counts differ: diffusers {params:,}, vdm_jax {settings['params']:,}")
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
        steps = settings["sample_steps"]
        self.scheduler = diffusers.DDPMScheduler(num_train_timesteps=steps, beta_schedule="linear", beta_start=1e-4,
                                       beta_end=0.02, variance_type="fixed_small", clip_sample=True)
        self.alpha_bars = self.scheduler.alphas_cumprod.to(self.device)
        self.shape = (config.in_channels, config.image_size, config.image_size)
        images = np.random.default_rng(0).integers(0, 256, (settings["batch"], *self.shape), dtype=np.uint8)
        self.images = torch.from_numpy(images).to(self.device)
        self.info = {"params": params, "device": self.device, "threads": torch.get_num_threads(), "pid": os.getpid(),
                     "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
        for _ in range(2):  # warm-up
            self.train_step()
        self.sync()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def autocast(self):
        import contextlib

        float32 = self.dtype == self.torch.float32
        return contextlib.nullcontext() if float32 else self.torch.autocast(self.device, dtype=self.dtype)

    def train_step(self):
        torch, model, steps = self.torch, self.model, self.settings["sample_steps"]
        x = self.images.float() * (2.0 / 255.0) - 1.0
        t = torch.randint(0, steps, (x.shape[0],), device=self.device)
        eps = torch.randn_like(x)
        a = self.alpha_bars[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x + (1 - a).sqrt() * eps
        with self.autocast():
            loss = ((model(z, t).sample.float() - eps) ** 2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in model.parameters()], 1e-4)
        return loss

    def train(self) -> dict:
        n = self.settings["train_steps"]
        start = time.perf_counter()
        for _ in range(n):
            loss = self.train_step()
        loss.item()
        self.sync()
        return {"step_s": (time.perf_counter() - start) / n}

    def sample(self) -> dict:
        torch = self.torch
        self.model.eval()
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast():
            self.scheduler.set_timesteps(self.settings["sample_steps"])
            z = torch.randn((self.settings["sample_batch"], *self.shape), device=self.device)
            for t in self.scheduler.timesteps:
                z = self.scheduler.step(self.model(z, t).sample.float(), t, z).prev_sample
        self.sync()
        self.model.train()
        return {"chain_s": time.perf_counter() - start}

    def matmul(self, n: int = 4096, repeats: int = 5) -> dict:
        a, b = (self.torch.randn(n, n, device=self.device, dtype=self.dtype) for _ in range(2))
        times = []
        for _ in range(repeats + 1):  # (the first warms up)
            start = time.perf_counter()
            a @ b
            self.sync()
            times.append(time.perf_counter() - start)
        return {"flops_per_s": 2 * n**3 / min(times[1:])}


def serve() -> None:
    """The peer process: settings on the first line of stdin, then one command a line; one JSON
    answer a line on stdout (everything else the libraries print goes to stderr)."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # keep the protocol's stream clean
    reference = _Reference(json.loads(sys.stdin.readline()))
    print(json.dumps(reference.info), file=out, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command not in ("train", "sample", "matmul"):
            raise ValueError(f"unknown command {command!r}")
        print(json.dumps(getattr(reference, command)()), file=out, flush=True)


if __name__ == "__main__":
    serve()
