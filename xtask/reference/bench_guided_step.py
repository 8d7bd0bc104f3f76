"""Times one classifier-guided sampling step of the PyTorch reference (guided-diffusion-sdk 1.0.0)
for the CIFAR-10 configuration of the robust-guidance paper: the improved-diffusion UNet (128
channels, 3 res blocks, channel_mult 1,2,2,2, learned sigma, 10 classes) and the time-dependent
classifier (width 32, depth 2, attention pool), 250 respaced steps, batch 16, random weights.

    /tmp/refvenv/bin/python xtask/reference/bench_guided_step.py [--batch 16] [--threads N] [--reps 5]

Prints one line `guided_step_seconds <median>` (plus the individual times on stderr); the
criterion benchmark `benches/guided_step.rs` runs this script next to its own measurement.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402

import torch as th  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel, UNetModel  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args()
    if args.threads:
        th.set_num_threads(args.threads)
    th.manual_seed(0)
    model = UNetModel(
        image_size=32, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
        attention_resolutions=(2, 4), dropout=0.1, channel_mult=(1, 2, 2, 2), num_classes=10,
        num_heads=4, use_scale_shift_norm=True, resblock_updown=False,
    ).eval()
    classifier = EncoderUNetModel(
        image_size=32, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=2,
        attention_resolutions=(2, 4), channel_mult=(1, 2, 2, 2), num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention",
    ).eval()
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing="250",
        rescale_timesteps=True,
    )

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * args.scale

    def model_fn(x, t, y=None):
        return model(x, t, y)

    n = args.batch
    x = th.randn(n, 3, 32, 32)
    y = th.arange(n) % 10
    t = th.tensor([125] * n)
    times = []
    for i in range(args.reps + 1):
        start = time.perf_counter()
        with th.no_grad():
            diffusion.p_sample(model_fn, x, t, clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": y})
        elapsed = time.perf_counter() - start
        if i > 0:  # the first run warms up allocators
            times.append(elapsed)
        print(f"rep {i}: {elapsed:.3f} s", file=sys.stderr)
    print(f"guided_step_seconds {statistics.median(times):.4f}")
    print(f"threads {th.get_num_threads()}", file=sys.stderr)


if __name__ == "__main__":
    main()
