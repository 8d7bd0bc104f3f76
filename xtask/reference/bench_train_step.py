"""Reference side of the training-step row of `cargo xtask bench`: one adversarial training step of the
embedded default classifier's recipe, run by robustness 1.2.1.post2's own training loop.

    /tmp/refvenv/bin/python xtask/reference/bench_train_step.py [--weights FILE] [--batch 128]
        [--threads N] [--reps 3] [--device cpu]

The model is robustness' CIFAR ResNet-18 at width multiplier 0.5 (stage widths 32/64/128/256) in its
AttackerModel, starting from the weights of the embedded classifier
(weights/classifier-cifar10-robust.safetensors, f16 storage, computed in f32), the same file bigroc's
side (examples/train_step_throughput.rs) starts from. One step is `train._model_loop(args, "train",
[(x, y)], ...)` over a single batch of 128 random 32x32 images: untargeted L2 PGD (eps 0.5, 3 steps of
0.25, no random start, best iterate) with the model in eval mode, then the train-mode forward of the
attacked batch, cross-entropy, backward and one step of the optimizer robustness makes
(`make_optimizer_and_schedule`: SGD, lr 0.1, momentum 0.9, weight decay 5e-4; the options of the
`bigroc train classifier` command in weights/manifest.json). The loop's progress bar goes to stderr.

Prints one JSON line (bench_common.report): the median seconds per step and the FLOPs of one step.
"""
import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402  (must precede robustness imports)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from robustness import attacker, datasets, train  # noqa: E402
from robustness.cifar_models import resnet as cifar_resnet  # noqa: E402

from bench_common import measure, report, setup  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# robustness' training arguments for this recipe (the names train._model_loop and
# make_optimizer_and_schedule read; None = option not used).
ARGS = SimpleNamespace(
    constraint="2", eps=0.5, attack_lr=0.25, attack_steps=3, random_start=False, use_best=True,
    random_restarts=0, custom_eps_multiplier=None, custom_train_loss=None, custom_adv_loss=None,
    custom_accuracy=None, regularizer=None, iteration_hook=None, mixed_precision=False,
    lr=0.1, momentum=0.9, weight_decay=5e-4, custom_lr_multiplier=None, step_lr=None,
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default=os.path.join(ROOT, "weights/classifier-cifar10-robust.safetensors"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev, sync = setup(a.threads, a.device)
    model = cifar_resnet.ResNet18(wm=0.5, num_classes=10)
    state = {k: v.float() for k, v in load_file(a.weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        sys.exit(f"{a.weights}: not a ResNet-18 w0.5: missing {missing}, unexpected {unexpected}")
    am = attacker.AttackerModel(model, datasets.CIFAR("/tmp/unused")).to(dev)
    opt, _ = train.make_optimizer_and_schedule(ARGS, am, None, None)
    x = torch.rand(a.batch, 3, 32, 32).to(dev)
    y = torch.randint(0, 10, (a.batch,)).to(dev)

    def run():
        train._model_loop(ARGS, "train", [(x, y)], am, opt, 0, True, None)

    seconds, flops = measure(run, a.reps, sync)
    report("train-step", seconds, flops, a.device, batch=a.batch, img_per_s=a.batch / seconds)


if __name__ == "__main__":
    main()
