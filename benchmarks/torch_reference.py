"""The PyTorch reference for `benchmarks.run --torch`: diffusers' `UNet2DModel` shaped like our U-Net.

The diffusers model is built from the same `UNetConfig` (widths, blocks per level, attention
resolutions, groups; the time MLP is 4× the first width in both), and its parameter count is
checked equal to ours. The train step is the one vdm_jax's loop runs for the default DDPM config:
uint8 images to [-1, 1], t ~ U{1..T}, ε ~ N(0, I), z_t = √ᾱ_t x + √(1-ᾱ_t) ε, ‖ε - ε̂‖², Adam
2e-4 with global-norm clipping at 1 and an EMA of the weights. Sampling is DDPM's ancestral chain
with diffusers' `DDPMScheduler` (β linear, posterior variance). Needs `pip install torch diffusers`
(the CPU wheel of torch on a CPU machine).
"""
import os

from benchmarks.common import median_time


def versions() -> dict:
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


def diffusers_unet(config):
    """A `UNet2DModel` with our `UNetConfig`'s architecture."""
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


def bench(config, batch: int, sample_batch: int, sample_steps: int, train_steps: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    from vdm_jax.models import count_params

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = diffusers_unet(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    if params != count_params(config):
        raise RuntimeError(f"parameter counts differ: diffusers {params:,}, vdm_jax {count_params(config):,}")
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    scheduler = DDPMScheduler(num_train_timesteps=sample_steps, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, variance_type="fixed_small", clip_sample=True)
    alpha_bars = scheduler.alphas_cumprod.to(device)
    shape = (config.in_channels, config.image_size, config.image_size)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)).to(device)

    def train_step():
        x = images.float() * (2.0 / 255.0) - 1.0
        t = torch.randint(0, sample_steps, (batch,), device=device)
        eps = torch.randn_like(x)
        a = alpha_bars[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x + (1 - a).sqrt() * eps
        loss = ((model(z, t).sample - eps) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up
        train_step()
    sync()

    def run_steps():
        for _ in range(train_steps):
            loss = train_step()
        loss.item()
        sync()

    step_s = median_time(run_steps, repeats) / train_steps

    @torch.inference_mode()
    def sample():
        scheduler.set_timesteps(sample_steps)
        z = torch.randn((sample_batch, *shape), device=device)
        for t in scheduler.timesteps:
            z = scheduler.step(model(z, t).sample, t, z).prev_sample
        sync()
        return z

    model.eval()
    chain_s = median_time(sample, max(1, repeats - 1))
    return {"params": params, "device": device, "threads": torch.get_num_threads(), "train_step_s": step_s,
            "train_steps_per_s": 1 / step_s, "train_images_per_s": batch / step_s, "sample_chain_s": chain_s,
            "sample_ms_per_step": 1e3 * chain_s / sample_steps}
