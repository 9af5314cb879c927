"""The PyTorch side of tests/models/test_ddpm_weights.py, in a process of its own (torch and JAX
stay apart): diffusers' `UNet2DModel` with random weights, saved the ways DDPM's weights are
published, and its outputs at given inputs.

    python tests/diffusers_ddpm_peer.py SPEC.json OUT_DIR

SPEC: {"config": UNet2DModel keyword arguments, "seed": int, "timesteps": [B ints],
"formats": any of "safetensors", "bin", "hub"}. Writes OUT_DIR/<format>/ with config.json and the
weights, and OUT_DIR/io.npz with z [B, C, H, W] ~ N(0, I), the timesteps [B] and the model's
output [B, C, H, W] (float32, eval mode). Formats:

- "safetensors", "bin": `save_pretrained` with and without `safe_serialization` (today's names);
- "hub": as `google/ddpm-cifar10-32` was published (diffusers 0.0.4): config.json with only the
  keys that version wrote, the attention's old names (query, key, value, proj_attn), and a
  `torch.save` in torch's legacy (non-zip) format.

Every parameter is random (torch.manual_seed(seed)): convs and linears as PyTorch initialises
them, GroupNorm scales ~ U(0.5, 1.5) and offsets ~ N(0, 0.1²), so that a scale and an offset
swapped, or a kernel transposed, changes the output.
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HUB_KEYS = ("act_fn", "attention_head_dim", "block_out_channels", "center_input_sample", "down_block_types",
             "downsample_padding", "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block",
             "mid_block_scale_factor", "norm_eps", "norm_num_groups", "out_channels", "sample_size",
             "time_embedding_type", "up_block_types")  # google/ddpm-cifar10-32's config.json
_OLD_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def main(spec_path: str, out: str) -> None:
    sys.path.insert(0, REPO)
    from benchmarks.torch_reference import start_peer

    spec = start_peer(spec_path, threads=1)
    import numpy as np
    import torch
    from diffusers import UNet2DModel

    model = UNet2DModel(**spec["config"]).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    config = model.config
    z = torch.randn(len(spec["timesteps"]), config.in_channels, config.sample_size, config.sample_size)
    timesteps = torch.tensor(spec["timesteps"], dtype=torch.int64)
    with torch.no_grad():
        output = model(z, timesteps).sample
    for kind in spec["formats"]:
        folder = os.path.join(out, kind)
        if kind == "hub":
            _save_like_the_hub(model, folder)
        else:
            model.save_pretrained(folder, safe_serialization=kind == "safetensors")
    np.savez(os.path.join(out, "io.npz"), z=z.numpy(), timesteps=timesteps.numpy(), out=output.numpy())


def _save_like_the_hub(model, folder: str) -> None:
    import torch

    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4",
              **{k: _plain(model.config[k]) for k in _HUB_KEYS}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {}
    for name, value in model.state_dict().items():
        for new, old in _OLD_NAMES.items():
            name = name.replace(new, old)
        state[name] = value
    torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"), _use_new_zipfile_serialization=False)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


if __name__ == "__main__":
    main(*sys.argv[1:])
