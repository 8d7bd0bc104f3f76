"""Reference fixtures for `bigroc train diffusion` (bigroc `train::diffusion`): one training step
of a class-conditional ADM UNet with learned sigma under improved-diffusion's hybrid loss, made
with guided-diffusion-sdk==1.0.0's `GaussianDiffusion.training_losses`.

Run from the repository root:

    /tmp/refvenv/bin/python xtask/reference/diffusion_train_fixtures.py
        writes tests/fixtures/diffusion_train.safetensors (< 2 MB).

Everything runs on the CPU in float32 and is seeded; reruns give byte-identical files.

The network is guided-diffusion's own `UNetModel`, small: 8x8 input, 32 base channels, channel
multipliers (1, 1), one ResBlock per level, attention at resolution 4 with 16 channels per head,
scale-shift norm, convolutional up/down-sampling (no resblock up/down: the fixture stays < 2 MB),
10 classes, learn_sigma (6 output channels). Random weights:
PyTorch's default init, the zero-initialized layers (ResBlock `out_layers.3`, attention
`proj_out`, the final `out.2`) re-initialized by their default init, random GroupNorm affines
(weight ~ N(1, 0.1), bias ~ N(0, 0.1)), so that no block is the identity; all weights rounded to
float16-representable values and stored as f16 (exact).

The diffusion is `create_gaussian_diffusion(steps=500, learn_sigma=True, noise_schedule="linear",
rescale_learned_sigmas=True)`: loss type RESCALED_MSE, so the VB term is scaled by 500/1000 = 0.5
(a factor that 1000 steps would hide). The batch's timesteps include t = 0 (the decoder NLL
branch) and t > 0 (the KL branch). The loss is `training_losses(model, x0, t, {"y": y}, noise)`
and the training scalar is `terms["loss"].mean()` (the uniform sampler's weights are all 1), then
backward; the fixture holds every parameter's gradient.

Layout of diffusion_train.safetensors:
    model.<key>        the UNet's state dict (f16)
    x0, t, noise, y    a batch of 4: images in [-1, 1] (u8 / 127.5 - 1), timesteps (i64), N(0, 1)
                       noise, labels (i64)
    mse, vb, loss      the per-example terms of training_losses, (4,)
    loss_mean          (1,) the mean of `loss`
    grad.<key>         d loss_mean / d parameter, for every parameter
    __metadata__["config"] = JSON {"model" (serde form of bigroc's UNetConfig),
        "diffusion": {"steps", "noise_schedule", "rescale_learned_sigmas", "rescale_timesteps"}}
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402

import torch as th  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import UNetModel  # noqa: E402

FIXTURE = "tests/fixtures/diffusion_train.safetensors"
th.set_num_threads(2)

MODEL = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=[2],
    dropout=0.0,
    channel_mult=[1.0, 1.0],
    conv_resample=True,
    num_classes=10,
    num_heads=1,
    num_head_channels=16,
    num_heads_upsample=None,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_new_attention_order=False,
)
DIFFUSION = dict(steps=500, noise_schedule="linear", rescale_learned_sigmas=True, rescale_timesteps=False)


def build():
    m = UNetModel(
        image_size=MODEL["image_size"],
        in_channels=MODEL["in_channels"],
        model_channels=MODEL["model_channels"],
        out_channels=MODEL["out_channels"],
        num_res_blocks=MODEL["num_res_blocks"],
        attention_resolutions=tuple(MODEL["attention_resolutions"]),
        dropout=MODEL["dropout"],
        channel_mult=tuple(int(c) for c in MODEL["channel_mult"]),
        conv_resample=MODEL["conv_resample"],
        num_classes=MODEL["num_classes"],
        num_heads=MODEL["num_heads"],
        num_head_channels=MODEL["num_head_channels"],
        num_heads_upsample=-1,
        use_scale_shift_norm=MODEL["use_scale_shift_norm"],
        resblock_updown=MODEL["resblock_updown"],
        use_new_attention_order=MODEL["use_new_attention_order"],
    )
    for mod in m.modules():
        if isinstance(mod, nn.GroupNorm):
            with th.no_grad():
                mod.weight.normal_(1.0, 0.1)
                mod.bias.normal_(0.0, 0.1)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            if not mod.weight.detach().abs().sum():
                mod.reset_parameters()
    with th.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def main():
    th.manual_seed(0)
    model = build()
    diffusion = create_gaussian_diffusion(
        steps=DIFFUSION["steps"],
        learn_sigma=True,
        noise_schedule=DIFFUSION["noise_schedule"],
        rescale_learned_sigmas=DIFFUSION["rescale_learned_sigmas"],
        rescale_timesteps=DIFFUSION["rescale_timesteps"],
    )
    g = th.Generator().manual_seed(1)
    x0 = th.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 127.5 - 1.0
    t = th.tensor([0, 3, 250, 499], dtype=th.long)
    noise = th.randn(4, 3, 8, 8, generator=g)
    y = th.tensor([3, 0, 9, 3], dtype=th.long)
    terms = diffusion.training_losses(model, x0, t, model_kwargs={"y": y}, noise=noise)
    loss_mean = terms["loss"].mean()
    model.zero_grad()
    loss_mean.backward()

    out = {}
    for k, v in model.state_dict().items():
        out[f"model.{k}"] = v.half().contiguous()
    for k, p in model.named_parameters():
        assert p.grad is not None, k
        out[f"grad.{k}"] = p.grad.detach().contiguous()
    out.update(
        x0=x0.contiguous(), t=t, noise=noise.contiguous(), y=y,
        mse=terms["mse"].detach().contiguous(), vb=terms["vb"].detach().contiguous(),
        loss=terms["loss"].detach().contiguous(), loss_mean=loss_mean.detach().reshape(1),
    )
    config = {"model": MODEL, "diffusion": DIFFUSION}
    save_file(out, FIXTURE, metadata={"config": json.dumps(config)})
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE)} bytes); mse {terms['mse'].tolist()} vb {terms['vb'].tolist()}")


if __name__ == "__main__":
    main()
