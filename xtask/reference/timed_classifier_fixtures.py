"""Reference fixtures for `bigroc train timed-classifier` (bigroc `train::timed_classifier`,
`train::early_stop_pgd`): one training step of guided-diffusion's time-dependent classifier and
the robust-guidance paper's early-stopping attack, made with guided-diffusion-sdk==1.0.0.

Run from the repository root:

    /tmp/refvenv/bin/python xtask/reference/timed_classifier_fixtures.py
        writes tests/fixtures/timed_classifier.safetensors (< 2 MB).

Everything runs on the CPU in float32 and is seeded; reruns give byte-identical files.

The network is guided-diffusion's own `EncoderUNetModel` at a small width (32x32 input, 32
channels at every level, one ResBlock per level, attention at resolutions 16 and 8 with 16
channels per head, resblock up/down, scale-shift norm, attention pool: the layout of the paper's
CIFAR-10 classifier, narrower). Random weights: PyTorch's default init, the zero-initialized
layers (ResBlock `out_layers.3`, attention `proj_out`) re-initialized by their default init, and
random GroupNorm affines (weight ~ N(1, 0.1), bias ~ N(0, 0.1)), so that no block is the identity;
all weights rounded to float16-representable values and stored as f16 (exact).

The training step is the one of guided-diffusion's `scripts/classifier_train.py` (the script is not
part of the PyPI package, so its steps are spelled out here): x_t = diffusion.q_sample(x_0, t,
noise) with `create_gaussian_diffusion(steps=1000, noise_schedule="linear")`, logits =
model(x_t, timesteps=t) with the integer t, loss = F.cross_entropy(logits, y) averaged over the
batch, then backward. The fixture holds every parameter's gradient.

The attack is a straightforward PyTorch implementation, written in this script, of the
robust-guidance paper's untargeted L2 PGD with early stopping (the official code,
bahjat-kawar/enhancing-diffusion-robust `untargeted_pgd_l2`, is not on PyPI). It works on x_t
directly (no clamping: x_t is unbounded) and for `steps` iterations: evaluates the model, marks the
samples still classified as their label as active, stops if none is, takes the gradient of the
batch-mean cross-entropy with respect to x, and moves only the active samples:
x <- x + step_size * g / (||g|| + 1e-10), then back onto the eps-ball around the start:
x <- x_0 + d * eps / (max(||d||, eps) + 1e-10) with d = x - x_0. A sample misclassified at the
start never moves; one that becomes misclassified stops there.

Layout of timed_classifier.safetensors:
    model.<key>        the classifier's state dict (f16)
    x0, t, noise, y    a batch of 4: images in [-1, 1] (u8 / 127.5 - 1), timesteps (i64), N(0, 1)
                       noise, labels (i64)
    x_t                q_sample(x0, t, noise), linear schedule
    x_t_cosine         the same with the cosine schedule
    logits, loss       model(x_t, t) and the mean cross-entropy against y
    grad.<key>         d loss / d parameter, for every parameter
    pgd.x, pgd.t, pgd.y   the attack's input batch of 8 noisy images, timesteps and labels
    pgd.output         the attacked batch
    pgd.steps          (8,) i64: steps each sample moved (0: misclassified at the start)
    pgd.logits         model(pgd.output, pgd.t)
    __metadata__["config"] = JSON {"model" (serde form of bigroc's EncoderUNetConfig),
        "diffusion": {"steps", "noise_schedule"}, "pgd": {"eps", "step_size", "steps"},
        "pgd_min_relative_margin"}
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402

import torch as th  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel  # noqa: E402

FIXTURE = "tests/fixtures/timed_classifier.safetensors"
th.set_num_threads(2)

MODEL = dict(
    image_size=32,
    in_channels=3,
    model_channels=32,
    out_channels=10,
    num_res_blocks=1,
    attention_resolutions=[2, 4],
    dropout=0.0,
    channel_mult=[1, 1, 1],
    conv_resample=True,
    num_heads=1,
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
    pool="attention",
)
# A large radius: random-weight logits hardly depend on the input (the pool averages GroupNorm
# outputs), so eps 0.5 fools nothing in 7 steps; at 6 samples stop at different steps.
PGD = dict(eps=6.0, step_size=1.0, steps=7)


def build():
    m = EncoderUNetModel(
        image_size=MODEL["image_size"],
        in_channels=MODEL["in_channels"],
        model_channels=MODEL["model_channels"],
        out_channels=MODEL["out_channels"],
        num_res_blocks=MODEL["num_res_blocks"],
        attention_resolutions=tuple(MODEL["attention_resolutions"]),
        dropout=MODEL["dropout"],
        channel_mult=tuple(MODEL["channel_mult"]),
        conv_resample=MODEL["conv_resample"],
        num_heads=MODEL["num_heads"],
        num_head_channels=MODEL["num_head_channels"],
        use_scale_shift_norm=MODEL["use_scale_shift_norm"],
        resblock_updown=MODEL["resblock_updown"],
        use_new_attention_order=MODEL["use_new_attention_order"],
        pool=MODEL["pool"],
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


def early_stopping_pgd(model, x0, t, y, eps, step_size, steps):
    """The paper's attack (see the module docstring). Returns the attacked batch, the steps each
    sample moved, and the smallest |logit_y - max other logit| seen in a stopping decision."""
    x0 = x0.detach()
    x = x0.clone()
    moved = th.zeros(len(x0), dtype=th.long)
    min_margin = float("inf")
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        logits = model(x, t)
        others = logits.detach().clone()
        others[th.arange(len(y)), y] = -float("inf")
        margin = logits.detach()[th.arange(len(y)), y] - others.max(dim=1).values
        min_margin = min(min_margin, margin.abs().min().item())
        active = logits.argmax(dim=1) == y
        if not active.any():
            break
        loss = F.cross_entropy(logits, y)
        (g,) = th.autograd.grad(loss, [x])
        with th.no_grad():
            g_norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            stepped = x + step_size * g / (g_norm + 1e-10)
            d = stepped - x0
            d_norm = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            projected = x0 + d * eps / (th.clamp(d_norm, min=eps) + 1e-10)
            x = th.where(active.view(-1, 1, 1, 1), projected, x)
            moved += active.long()
    return x.detach(), moved, min_margin


def main():
    th.manual_seed(20230731)
    model = build()
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear")
    cosine = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")

    n = 4
    x0 = th.randint(0, 256, (n, 3, 32, 32)).float() / 127.5 - 1
    t = th.tensor([0, 17, 503, 999])
    noise = th.randn(n, 3, 32, 32)
    y = th.tensor([3, 0, 9, 5])
    x_t = diffusion.q_sample(x0, t, noise=noise)
    x_t_cosine = cosine.q_sample(x0, t, noise=noise)

    model.zero_grad()
    logits = model(x_t, timesteps=t)
    loss = F.cross_entropy(logits, y, reduction="none").mean()
    loss.backward()

    tensors = {f"model.{k}": v.detach().half().contiguous() for k, v in model.state_dict().items()}
    for k, v in tensors.items():
        assert th.equal(v.float(), model.state_dict()[k[len("model."):]]), k
    tensors.update(
        x0=x0, t=t, noise=noise, y=y, x_t=x_t, x_t_cosine=x_t_cosine,
        logits=logits.detach(), loss=loss.detach().reshape(1),
    )
    for k, p in model.named_parameters():
        tensors[f"grad.{k}"] = p.grad.detach().clone()

    # The attack: 8 noisy images at assorted noise levels; labels chosen so that two are
    # misclassified from the start (never moved) and the others are the model's own prediction
    # (attacked until fooled, at different steps, or for all steps). Batches are redrawn until
    # every stopping decision is clear: |logit_y - max other| >= 2e-3 max|logit| at each check,
    # a thousand times the rounding differences between implementations.
    m = 8
    pt = th.tensor([3, 40, 150, 300, 420, 610, 800, 960])
    for attempt in range(100):
        px0 = th.randint(0, 256, (m, 3, 32, 32)).float() / 127.5 - 1
        px = diffusion.q_sample(px0, pt, noise=th.randn(m, 3, 32, 32))
        with th.no_grad():
            clean = model(px, pt)
        py = clean.argmax(dim=1)
        py[[1, 6]] = (py[[1, 6]] + 1) % 10  # misclassified at the start
        out, moved, min_margin = early_stopping_pgd(model, px, pt, py, **PGD)
        relative_margin = min_margin / clean.abs().max().item()
        steps = moved.tolist()
        if (relative_margin >= 2e-3 and len(set(steps)) >= 4 and PGD["steps"] in steps
                and min(s for s in steps if s > 0) < PGD["steps"] - 2):
            break
    else:
        raise SystemExit("no clear-cut attack batch found")
    print(f"pgd batch after {attempt + 1} draws: steps per sample {steps}, "
          f"smallest decision margin {relative_margin:.2e} of max|logit|")
    assert moved[1] == 0 and moved[6] == 0
    with th.no_grad():
        plogits = model(out, pt)
    tensors.update({
        "pgd.x": px, "pgd.t": pt, "pgd.y": py, "pgd.output": out, "pgd.steps": moved,
        "pgd.logits": plogits,
    })

    config = {
        "model": MODEL,
        "diffusion": {"steps": 1000, "noise_schedule": "linear"},
        "pgd": PGD,
        "pgd_min_relative_margin": relative_margin,
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, FIXTURE, metadata={"config": json.dumps(config)})
    print(f"{FIXTURE}: {os.path.getsize(FIXTURE) / 1e6:.2f} MB, loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
