"""Reference side of `cargo xtask bench`: BIGRoC's refine workload in PyTorch (robustness' Attacker).

Writes random-weight ResNet-50s as bigroc weights files into OUT (so both sides run the very same
network) and prints one JSON line per workload with the reference's median seconds per batch and the
FLOPs of one batch (protocol and FLOP counting: bench_common.py; `flops` leaves out the final forward
the AttackerModel adds for its returned logits, `reference_flops` has it):

    python xtask/reference/bench_refine.py --out target/bench [--threads 2] [--reps 3] [--device cuda]

Workloads (issue: performance): 7 targeted L2 steps, use_best, on
  cifar50:     the robustness library's CIFAR ResNet-50, 32x32, batch 32;
  imagenet50:  the ImageNet ResNet-50, 128x128, batch 8.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import refenv  # noqa: E402,F401  (must precede robustness imports)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from robustness import attacker, datasets  # noqa: E402
from robustness.cifar_models import resnet as cifar_resnet  # noqa: E402
from robustness.imagenet_models import resnet as imagenet_resnet  # noqa: E402

from bench_common import flop_counter, measure, report, setup  # noqa: E402

WORKLOADS = {
    "cifar50": dict(batch=32, size=32, classes=10),
    "imagenet50": dict(batch=8, size=128, classes=1000),
}


def build(name):
    if name == "cifar50":
        model, ds = cifar_resnet.ResNet50(num_classes=10), datasets.CIFAR("/tmp/unused")
        layout, mean, std = "cifar", [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    else:
        model, ds = imagenet_resnet.resnet50(num_classes=1000), datasets.ImageNet("/tmp/unused")
        layout, mean, std = "imagenet", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    config = dict(layout=layout, block="bottleneck", blocks=[3, 4, 6, 3], widths=[64, 128, 256, 512],
                  num_classes=WORKLOADS[name]["classes"], mean=mean, std=std)
    return attacker.AttackerModel(model, ds).eval(), config


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timed with torch.cuda.synchronize)")
    a = p.parse_args()
    dev, sync = setup(a.threads, a.device)
    os.makedirs(a.out, exist_ok=True)
    for name, w in WORKLOADS.items():
        if a.only and a.only not in f"refine-{name}":
            continue
        am, config = build(name)
        weights = {k: v.contiguous() for k, v in am.model.state_dict().items() if "num_batches_tracked" not in k}
        meta = {"format": "bigroc/1", "kind": "resnet", "config": json.dumps(config), "info": json.dumps({})}
        save_file(weights, os.path.join(a.out, f"{name}.safetensors"), metadata=meta)
        am = am.to(dev)
        x = torch.rand(w["batch"], 3, w["size"], w["size"]).to(dev)
        target = torch.randint(0, w["classes"], (w["batch"],)).to(dev)
        eps = 0.5

        def run():
            am(x, target, make_adv=True, constraint="2", eps=eps, step_size=1.5 * eps / 7, iterations=7,
               targeted=True, use_best=True, random_start=False)

        seconds, flops = measure(run, a.reps, sync)
        # The AttackerModel ends with one more forward, of the attacked batch, for the logits it
        # returns; bigroc's refine has no use for them. That forward (1/16 of the FLOPs) stays in
        # the reference's time but not in the count, which is of the work both sides do.
        with flop_counter() as counter, torch.no_grad():
            am(x)
        report(f"refine-{name}", seconds, flops - counter.get_total_flops(), a.device, batch=w["batch"],
               size=w["size"], img_per_s=w["batch"] / seconds, reference_flops=flops)


if __name__ == "__main__":
    main()
