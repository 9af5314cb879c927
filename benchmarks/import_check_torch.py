"""The PyTorch side of `python -m benchmarks import_check --from=ddpm`, in a process of its own (torch
and JAX never share one): trains a small diffusers `UNet2DModel` of DDPM's block types with
diffusers' `DDPMScheduler` (linear β 1e-4..0.02, T = 1000) and the ε-loss, saves it with
`save_pretrained`, and measures its ε-MSE on fixed test images, steps and noise.

    python -m benchmarks.import_check_torch SPEC.json OUT_DIR

SPEC: {"config": UNet2DModel kwargs, "data": npz path, "steps", "batch", "lr", "seed", "threads",
"eval_images": N, "eval_timesteps": [N ints, 0-based]}. Writes OUT_DIR/model/ (config.json, the
safetensors, scheduler_config.json), OUT_DIR/train.json (losses, seconds) and OUT_DIR/eps.npz (the
test images x [N, 32, 32, 3] uint8, eps, timesteps, the noisy z and the model's eps_hat, NCHW).
"""
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(spec_path: str, out: str) -> None:
    sys.path.insert(0, REPO)
    from benchmarks.torch_reference import start_peer

    spec = start_peer(spec_path)
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    data = np.load(spec["data"])
    train = torch.from_numpy(data["x_train"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    model = UNet2DModel(**spec["config"])
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    losses, gen = [], torch.Generator().manual_seed(spec["seed"])
    start = time.perf_counter()
    model.train()
    for _ in range(spec["steps"]):
        x = train[torch.randint(len(train), (spec["batch"],), generator=gen)]
        eps = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x),), generator=gen)
        loss = torch.mean((model(scheduler.add_noise(x, eps, t), t).sample - eps) ** 2)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    model.eval()
    model.save_pretrained(os.path.join(out, "model"))
    scheduler.save_pretrained(os.path.join(out, "model"))
    # The reference: ε-MSE of the trained model on fixed test images, steps and noise.
    n = spec["eval_images"]
    images = data["x_test"][:n]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(spec["seed"] + 1))
    t = torch.tensor(spec["eval_timesteps"], dtype=torch.int64)
    z = scheduler.add_noise(x, eps, t)
    with torch.no_grad():
        eps_hat = model(z, t).sample
    np.savez(os.path.join(out, "eps.npz"), x=images, eps=eps.numpy(), timesteps=t.numpy(), z=z.numpy(),
             eps_hat=eps_hat.numpy())
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump({"losses": losses, "train_s": train_s, "parameters": sum(p.numel() for p in model.parameters()),
                   "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                   "eps_mse": float(torch.mean((eps_hat - eps) ** 2))}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
