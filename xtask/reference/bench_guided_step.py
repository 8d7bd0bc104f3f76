"""Reference side of the guided-step row of `cargo xtask bench` (and of `cargo bench --bench
guided_step`): one classifier-guided ancestral sampling step of guided-diffusion-sdk 1.0.0 for the
CIFAR-10 configuration of the robust-guidance paper: the improved-diffusion UNet (128 channels, 3 res
blocks, channel_mult 1,2,2,2, attention at 16x16 and 8x8 with 4 heads, learned sigma, 10 classes) and
the time-dependent classifier (width 32, depth 2, attention pool), 250 respaced steps, at step 125,
batch 16, random weights, guidance scale 1.

    /tmp/refvenv/bin/python xtask/reference/bench_guided_step.py [--out DIR] [--batch 16] [--threads N]
        [--reps 5] [--device cpu] [--dtype f32|f16]

With --out, the random weights are written to DIR/guided_unet.safetensors and
DIR/guided_classifier.safetensors (plain state dicts, guided-diffusion's names, which are bigroc's), so
that bigroc's side (examples/guided_step_throughput.rs) runs the very same networks. Every weight
matrix and convolution kernel is drawn from N(0, 1/fan_in), also those guided-diffusion initializes
to zero (the output layers), so that no activation is identically zero.

--dtype f16 is guided-diffusion's own half precision (`use_fp16`: the torso's blocks converted by
`convert_to_fp16`, the input cast to f16, group norms computed in f32), as bigroc's `--dtype f16`.
The written weights are the f32 ones either way. guided-diffusion has no bf16 mode.

Prints one JSON line (bench_common.report): the median seconds per step and the FLOPs of one step.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402

import torch as th  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel, UNetModel  # noqa: E402

from bench_common import measure, report, setup  # noqa: E402


def randomize(model):
    with th.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, (p[0].numel()) ** -0.5)
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None, help="write the random weights here (for bigroc's side)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    args = p.parse_args()
    fp16 = args.dtype == "f16"
    dev, sync = setup(args.threads, args.device)
    model = randomize(UNetModel(
        image_size=32, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
        attention_resolutions=(2, 4), dropout=0.1, channel_mult=(1, 2, 2, 2), num_classes=10,
        num_heads=4, use_scale_shift_norm=True, resblock_updown=False, use_fp16=fp16,
    )).eval()
    classifier = randomize(EncoderUNetModel(
        image_size=32, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=2,
        attention_resolutions=(2, 4), channel_mult=(1, 2, 2, 2), num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention", use_fp16=fp16,
    )).eval()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, m in [("guided_unet", model), ("guided_classifier", classifier)]:
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(args.out, f"{name}.safetensors"))
    if fp16:
        model.convert_to_fp16()
        classifier.convert_to_fp16()
    model, classifier = model.to(dev), classifier.to(dev)
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
    x = th.randn(n, 3, 32, 32).to(dev)
    y = (th.arange(n) % 10).to(dev)
    t = th.tensor([125] * n).to(dev)

    def run():
        with th.no_grad():
            diffusion.p_sample(model_fn, x, t, clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": y})

    seconds, flops = measure(run, args.reps, sync)
    report("guided-step", seconds, flops, args.device, batch=n, dtype=args.dtype)


if __name__ == "__main__":
    main()
