"""Reference fixtures for bigroc's robust ResNets (bigroc-models `resnet`, `ops::max_pool2d`).

Run from the repository root:

    /tmp/refvenv/bin/python xtask/reference/resnet_fixtures.py
        writes tests/fixtures/resnet_{cifar18,cifar50,imagenet50,maxpool}.safetensors and
        tests/fixtures/robustness_cifar18.pt (a small checkpoint in robustness' training format).

    /tmp/refvenv/bin/python xtask/reference/resnet_fixtures.py --full DIR
        additionally writes full-size random-weight checkpoints in robustness' format into DIR
        (NOT committed, ~1 GB): robustness_cifar_resnet50.pt (CIFAR ResNet-50, wm=1) and
        robustness_imagenet_resnet50.pt (ImageNet ResNet-50), each with `<name>_check.safetensors` next
        to it (`model.*`, `input`, `target`, `logits`, `input_grad`, and `logits_f64`/`input_grad_f64`
        computed in float64) and `<name>_legacy.pt`, the same checkpoint in torch's pre-1.6 (non-zip)
        serialization, which is what the published 2019/2020 robustness checkpoints use.
        `BIGROC_RESNET_FULL_DIR=DIR cargo test -p bigroc-models --test resnet_parity` checks them.

Everything runs on the CPU in float32 and is seeded; reruns give byte-identical files. The PGD stability
screen makes the run take a few minutes.

Models are the reference code itself: robustness' `cifar_models.resnet` for the CIFAR layout and
torchvision's `ResNet`/`Bottleneck` (via its own `_make_layer`) for the ImageNet layout, each wrapped in
robustness' `AttackerModel`, whose `InputNormalize` clamps to [0, 1] and normalizes. Random weights are
the default init with batch-norm statistics measured on random inputs and then perturbed, random
batch-norm affine parameters, and a head rescaled to a trained-like logit spread.

Inputs are uniform pixels of which ~17% are exactly 0 or 1 (saturated). Note that with scalar bounds,
the pinned torch's `clamp` passes no gradient at x == bound, so `input_grad` is 0 at those pixels.

The PGD outputs come from robustness' own `Attacker` (called through `AttackerModel(..., make_adv=True)`)
with targeted=True, use_best=True, random_start=False. It calls `.cuda()` on its input; this script
replaces `torch.Tensor.cuda` by the identity so it runs on the CPU. Targets are redrawn until the result
is stable under rounding-level perturbations (see `pgd_instability`).

Layout of resnet_<case>.safetensors (case = cifar18, cifar50, imagenet50):
    model.<key>        every entry of the bare classifier's state dict (num_batches_tracked included)
    input, target      (N,3,H,W) f32 pixels in [0,1]; (N,) i64 labels
    logits, input_grad logits of AttackerModel(input); d mean_n CE(logits_n, target_n) / d input
    features           input of the final linear layer
    input_odd, target_odd, logits_odd, input_grad_odd    imagenet50 only: a 40x36 input
    checkpoint_logits  cifar18 only: logits of `input` after loading robustness_cifar18.pt through
                       robustness' make_and_restore_model (equal to `logits`)
    pgd.<case>.target, .output, .logits (of .output), .losses (8,N: per-sample CE of the iterate each of
        the 7 steps starts from, then of the final iterate), .best_loss (N), .debias (l2_pseudo only),
        .iterates (8,N,3,H,W; cifar18 l2_gt/linf_gt/l2_overshoot and imagenet50 l2_gt)
    __metadata__["config"] = JSON {"case", "resnet_config" (serde form of bigroc's ResNetConfig), and for
        cifar18/imagenet50 "pgd": {case: {"constraint", "eps", "step_size", "steps", "targeted",
        "use_best", "random_start", "targets", "attempts", "instability", "iterates"}}, "pgd_input"}
resnet_maxpool.safetensors: <prefix>_input, _output, _gout, _grad for the cases listed in
    __metadata__["config"] = {"cases": [{"prefix", "kernel", "stride", "padding"}, ...]}
"""
import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402  (must come before robustness)

import dill  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from robustness import attacker, datasets, model_utils  # noqa: E402
from robustness.cifar_models import resnet as cifar_resnet  # noqa: E402
from robustness.imagenet_models import resnet as imagenet_resnet  # noqa: E402

# robustness' Attacker moves `orig_input` to CUDA unconditionally; on this CPU-only run it is the identity.
torch.Tensor.cuda = lambda self, *args, **kwargs: self

FIXTURES = "tests/fixtures"
LOGIT_SPREAD = 2.0  # standard deviation of the logits across classes, on random inputs
torch.set_num_threads(2)


class TorchvisionResNet(torchvision.models.resnet.ResNet):
    """torchvision's ResNet, accepting (and refusing to use) the keyword arguments AttackerModel passes."""

    def forward(self, x, with_latent=False, fake_relu=False, no_relu=False):
        assert not (with_latent or fake_relu or no_relu)
        return super().forward(x)


def randomize_batchnorm(model, normalizer, hw):
    """Realistic but random batch norm: running statistics measured on random inputs (so activations keep
    a healthy scale through the depth), then perturbed, with random affine parameters, so a wrong
    batch-norm formula shows. The head is rescaled so the logits spread like a trained classifier's
    (decisive, yet far from a saturated softmax whose exact-zero losses would make PGD's use-best choice
    a tie)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(normalizer(make_input(16, *hw)))
    for m in bns:
        c = m.num_features
        with torch.no_grad():
            m.running_mean.add_(0.1 * torch.randn(c))
            m.running_var.mul_(0.7 + 0.6 * torch.rand(c))
            m.weight.copy_(0.6 + 0.8 * torch.rand(c))
            m.bias.copy_(0.2 * torch.randn(c))
        m.momentum = 0.1
        m.num_batches_tracked.fill_(100)
    model.eval()
    head = model.fc if hasattr(model, "fc") else model.linear
    with torch.no_grad():
        logits = model(normalizer(make_input(16, *hw)))
        head.weight.mul_(LOGIT_SPREAD / logits.std(dim=1).mean())
    return model


def make_input(n, h, w):
    """Pixels in [0, 1] with a few percent exactly 0 or 1 (saturated pixels of real images),
    so the clamp's gradient at its bounds is exercised."""
    return (torch.rand(n, 3, h, w) * 1.2 - 0.1).clamp(0, 1)


def reduced_torchvision_resnet50(num_classes):
    """torchvision's Bottleneck ResNet with blocks [2,1,1,1] and widths 8,16,32,64, rebuilt with the
    model's own `_make_layer` so the forward code is torchvision's."""
    block = torchvision.models.resnet.Bottleneck
    m = TorchvisionResNet(block, [2, 1, 1, 1], num_classes=num_classes)
    m.inplanes = 8
    m.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(8)
    m.layer1 = m._make_layer(block, 8, 2)
    m.layer2 = m._make_layer(block, 16, 1, stride=2)
    m.layer3 = m._make_layer(block, 32, 1, stride=2)
    m.layer4 = m._make_layer(block, 64, 1, stride=2)
    m.fc = nn.Linear(64 * block.expansion, num_classes)
    return m


def head_input(model, head, normalized):
    """Pre-head features: the input of the final linear layer."""
    seen = []
    handle = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    with torch.no_grad():
        model(normalized)
    handle.remove()
    return seen[0]


def logits_and_grad(am, x, target):
    """Logits of AttackerModel `am` on pixels `x` and d mean(CE) / d x."""
    x = x.clone().requires_grad_(True)
    logits, _ = am(x)
    loss = F.cross_entropy(logits, target)
    (grad,) = torch.autograd.grad(loss, [x])
    return logits.detach(), grad.detach()


def state_dict_entries(model, prefix="model."):
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


PGD_STEPS = 7
PGD_CASES = {
    # name: (constraint, eps, step_size, targets); the step size is robustness' usual 1.5 * eps / steps
    # except for l2_overshoot, whose large steps overshoot, so use_best keeps an earlier iterate and the
    # eps-ball projection cuts the step.
    "l2_gt": ("2", 0.5, 1.5 * 0.5 / PGD_STEPS, "random"),
    "linf_gt": ("inf", 8.0 / 255.0, 1.5 * (8.0 / 255.0) / PGD_STEPS, "random"),
    "l2_pseudo": ("2", 0.5, 1.5 * 0.5 / PGD_STEPS, "pseudo"),
    "l2_bigeps": ("2", 3.0, 1.5 * 3.0 / PGD_STEPS, "random"),
    "l2_overshoot": ("2", 3.0, 2.5, "random"),
}

PGD_SCREEN_TOL = 1e-5  # normal float32 noise on the outputs is ~5e-7
PGD_SCREEN_RUNS = 8
PGD_MAX_ATTEMPTS = 20


def attack(am, x, target, constraint, eps, step_size, orig_input=None):
    """robustness' targeted PGD as BIGRoC calls it; returns (logits of the result, result)."""
    logits, adv = am(x, target, make_adv=True, constraint=constraint, eps=eps, step_size=step_size,
                     iterations=PGD_STEPS, targeted=True, use_best=True, random_start=False,
                     orig_input=orig_input)
    return logits.detach(), adv.detach()


def pgd_instability(am, x, target, case, adv, gen):
    """How far the attack's result moves when the arithmetic changes at rounding level: rerun in float64,
    and in float32 from starting points perturbed by 1e-7 (unsaturated pixels only, same eps-ball centre).
    PGD is discontinuous (the clamp passes no gradient at pixels exactly 0 or 1, ReLU and max-pool
    switch, use_best compares losses), so for some targets a rounding-level difference moves a pixel by
    ~1e-2; such a fixture could not tell a correct reimplementation from a wrong one, so it is redrawn."""
    constraint, eps, step_size, _ = PGD_CASES[case]
    runs = [attack(copy.deepcopy(am).double(), x.double(), target, constraint, eps, step_size)[1].float()]
    inside = (x > 0) & (x < 1)
    for _ in range(PGD_SCREEN_RUNS):
        xp = torch.where(inside, x + 1e-7 * torch.randn(x.shape, generator=gen), x)
        runs.append(attack(am, xp, target, constraint, eps, step_size, orig_input=x)[1])
    return max((r - adv).abs().max().item() for r in runs)


def run_pgd(am, x, logits, num_classes, keep_iterates):
    """Targeted PGD with robustness' Attacker for every case of PGD_CASES; returns tensors and metadata.
    Targets (and the pseudo-label debias vector) are redrawn until the result is stable under
    rounding-level changes (see `pgd_instability`)."""
    tensors, meta = {}, {}
    n = x.shape[0]
    gen = torch.Generator().manual_seed(99)
    for name, (constraint, eps, step_size, targets) in PGD_CASES.items():
        for attempt in range(1, PGD_MAX_ATTEMPTS + 1):
            debias = None
            if targets == "random":
                target = torch.randint(0, num_classes, (n,))
            else:
                debias = 2.0 * torch.randn(num_classes)
                target = (logits + debias).argmax(dim=1)
            # Every call of the attacker's normalizer sees one PGD iterate (the 7 iterates the steps
            # start from, then the final one).
            iterates = []
            hook = am.attacker.normalize.register_forward_pre_hook(
                lambda mod, args: iterates.append(args[0].detach().clone()))
            adv_logits, adv = attack(am, x, target, constraint, eps, step_size)
            hook.remove()
            assert len(iterates) == PGD_STEPS + 1, len(iterates)
            instability = pgd_instability(am, x, target, name, adv, gen)
            if instability <= PGD_SCREEN_TOL:
                break
            print(f"  pgd {name}: attempt {attempt} unstable (moves {instability:.1e}), redrawing targets")
        else:
            raise RuntimeError(f"no stable targets for PGD case {name}")
        with torch.no_grad():
            losses = torch.stack([
                F.cross_entropy(am(it, with_image=False), target, reduction="none") for it in iterates])
        if debias is not None:
            tensors[f"pgd.{name}.debias"] = debias
        tensors[f"pgd.{name}.target"] = target
        tensors[f"pgd.{name}.output"] = adv
        tensors[f"pgd.{name}.logits"] = adv_logits
        tensors[f"pgd.{name}.losses"] = losses
        tensors[f"pgd.{name}.best_loss"] = losses.min(dim=0).values
        if name in keep_iterates:
            tensors[f"pgd.{name}.iterates"] = torch.stack(iterates)
        meta[name] = {"constraint": constraint, "eps": eps, "step_size": step_size,
                      "steps": PGD_STEPS, "targeted": True, "use_best": True,
                      "random_start": False, "targets": targets, "attempts": attempt,
                      "instability": instability, "iterates": name in keep_iterates}
        changed = (adv - x).flatten(1)
        print(f"  pgd {name}: |delta|_2 {[round(v, 4) for v in changed.norm(dim=1).tolist()]} "
              f"loss {[round(v, 3) for v in losses[0].tolist()]} -> best "
              f"{[round(v, 3) for v in losses.min(dim=0).values.tolist()]} "
              f"at iterate {losses.argmin(dim=0).tolist()}, instability {instability:.1e}")
    return tensors, meta


def fixture_case(name, model, dataset, config, n, hw, pgd=False, odd_hw=None, head=None):
    am = attacker.AttackerModel(model, dataset).eval()
    randomize_batchnorm(model, am.normalizer, hw)
    num_classes = config["num_classes"]
    tensors = state_dict_entries(model)

    x = make_input(n, *hw)
    target = torch.randint(0, num_classes, (n,))
    logits, grad = logits_and_grad(am, x, target)
    tensors.update(input=x, target=target, logits=logits, input_grad=grad,
                   features=head_input(model, head, am.normalizer(x)))
    print(f"{name}: logits |max| {logits.abs().max():.3g}, grad |max| {grad.abs().max():.3g}, "
          f"saturated pixels {((x == 0) | (x == 1)).float().mean():.3f}")
    if odd_hw is not None:
        xo = make_input(n, *odd_hw)
        to = torch.randint(0, num_classes, (n,))
        lo, go = logits_and_grad(am, xo, to)
        tensors.update(input_odd=xo, target_odd=to, logits_odd=lo, input_grad_odd=go)
    meta = {"case": name, "resnet_config": config,
            "input_grad": "d mean_n CE(logits_n, target_n) / d input",
            "features": "input of the final linear layer"}
    if pgd:
        keep = {"cifar18": ("l2_gt", "linf_gt", "l2_overshoot"), "imagenet50": ("l2_gt",)}[name]
        pgd_tensors, pgd_meta = run_pgd(am, x, logits, num_classes, keep_iterates=keep)
        tensors.update(pgd_tensors)
        meta["pgd"] = pgd_meta
        meta["pgd_input"] = "input"
    return am, tensors, meta


def save(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"config": json.dumps(meta)})
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


def save_robustness_checkpoint(am, path, x, legacy=False):
    """A checkpoint laid out like robustness' train.py writes it: DataParallel(AttackerModel) state dict
    (keys `module.normalizer.*`, `module.model.*`, `module.attacker.normalize.*`,
    `module.attacker.model.*`), SGD optimizer state with momentum buffers, schedule, epoch; pickled
    with dill as robustness does."""
    dp = nn.DataParallel(am)
    opt = torch.optim.SGD(dp.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    logits, _ = dp(x)
    logits.sum().backward()
    opt.step()  # lr 0: fills the momentum buffers, leaves the weights as they are
    opt.param_groups[0]["lr"] = 0.1
    opt.zero_grad()
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=50)
    sd_info = {"model": dp.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
               "epoch": 1, "amp": None}
    torch.save(sd_info, path, pickle_module=dill, _use_new_zipfile_serialization=not legacy)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


def restored_logits(arch, dataset, path, x):
    """Logits after loading `path` through robustness' own `make_and_restore_model`."""
    original_load = torch.load
    # torch >= 2.6 defaults to weights_only=True, which refuses the explicit dill pickle_module robustness
    # passes; the checkpoint only holds tensors and plain Python values.
    torch.load = lambda *a, **k: original_load(*a, **{**k, "weights_only": False})
    try:
        am, _ = model_utils.make_and_restore_model(arch=arch, dataset=dataset, resume_path=path)
    finally:
        torch.load = original_load
    am.eval()
    with torch.no_grad():
        return am(x, with_image=False)


def maxpool_fixture():
    """torch.nn.functional.max_pool2d forward and backward, with ties (flat zero regions, values on a
    coarse grid) and sizes that make the padding matter."""
    torch.manual_seed(4)
    tensors, cases = {}, []
    for prefix, (k, s, p), shape in [
        ("maxpool", (3, 2, 1), (2, 3, 11, 10)),
        ("maxpool_k2s2p0", (2, 2, 0), (2, 3, 8, 9)),
        ("maxpool_k3s1p1", (3, 1, 1), (1, 2, 7, 6)),
        ("maxpool_k3s2p0", (3, 2, 0), (1, 2, 9, 8)),
        ("maxpool_k5s3p2", (5, 3, 2), (1, 2, 13, 11)),
    ]:
        x = (torch.randn(shape) * 2).round() / 2  # coarse grid: many ties
        x = x.clamp(min=0)                          # ReLU output: flat zero regions
        x[0, 0, :4, :4] = 0.0                       # an all-zero block
        x[-1, -1, -3:, -3:] = -1.0                  # negative values next to the padding
        x.requires_grad_(True)
        y = F.max_pool2d(x, k, s, p)
        gout = torch.randn_like(y)
        (g,) = torch.autograd.grad(y, [x], gout)
        tensors.update({f"{prefix}_input": x.detach(), f"{prefix}_output": y.detach(),
                        f"{prefix}_gout": gout, f"{prefix}_grad": g})
        cases.append({"prefix": prefix, "kernel": k, "stride": s, "padding": p})
    save(f"{FIXTURES}/resnet_maxpool.safetensors", tensors, {"cases": cases})


def full_size(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(5)
    for name, model, dataset, hw, arch_kind in [
        ("robustness_cifar_resnet50", cifar_resnet.ResNet50(num_classes=10), datasets.CIFAR("/tmp/unused"),
         (32, 32), "cifar"),
        ("robustness_imagenet_resnet50", imagenet_resnet.resnet50(num_classes=1000),
         datasets.ImageNet("/tmp/unused"), (224, 224), "imagenet"),
    ]:
        am = attacker.AttackerModel(model, dataset).eval()
        randomize_batchnorm(model, am.normalizer, hw)
        x = make_input(2, *hw)
        target = torch.randint(0, 10, (2,))
        logits, grad = logits_and_grad(am, x, target)
        tensors = state_dict_entries(model)
        tensors.update(input=x, target=target, logits=logits, input_grad=grad)
        # The same in float64: at full depth a few ReLU pre-activations lie within float32 rounding of
        # zero, so float32 input gradients of two implementations can differ locally by ~1e-3 (each
        # rounds differently); the float64 reference pins the model itself down to rounding.
        logits64, grad64 = logits_and_grad(copy.deepcopy(am).double(), x.double(), target)
        tensors.update(logits_f64=logits64, input_grad_f64=grad64)
        if arch_kind == "cifar":
            config = {"layout": "cifar", "block": "bottleneck", "blocks": [3, 4, 6, 3], "widths": [64, 128, 256, 512],
                      "num_classes": 10, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
        else:
            config = {"layout": "imagenet", "block": "bottleneck", "blocks": [3, 4, 6, 3],
                      "widths": [64, 128, 256, 512], "num_classes": 1000,
                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        save(f"{out_dir}/{name}_check.safetensors", tensors, {"case": name, "resnet_config": config})
        save_robustness_checkpoint(am, f"{out_dir}/{name}.pt", x)
        save_robustness_checkpoint(am, f"{out_dir}/{name}_legacy.pt", x, legacy=True)
        fresh = cifar_resnet.ResNet50(num_classes=10) if arch_kind == "cifar" else imagenet_resnet.resnet50()
        back = restored_logits(fresh, dataset, f"{out_dir}/{name}.pt", x)
        assert torch.equal(back, logits), "checkpoint round trip through robustness changed the logits"


def small_fixtures():
    """The committed fixtures: reduced-width networks, PGD runs, a small checkpoint, max pooling."""
    os.makedirs(FIXTURES, exist_ok=True)
    cifar = datasets.CIFAR("/tmp/unused")  # only its mean/std are used; no data is read
    imagenet = datasets.ImageNet("/tmp/unused")
    cifar_mean, cifar_std = cifar.mean.tolist(), cifar.std.tolist()
    imagenet_mean, imagenet_std = imagenet.mean.tolist(), imagenet.std.tolist()

    # cifar18: robustness CIFAR ResNet-18 at 1/8 width (widths 8, 16, 32, 64), with PGD fixtures and a
    # small robustness-format checkpoint.
    torch.manual_seed(11)
    m = cifar_resnet.ResNet18(wm=0.125, num_classes=10)
    cfg = {"layout": "cifar", "block": "basic", "blocks": [2, 2, 2, 2], "widths": [8, 16, 32, 64],
           "num_classes": 10, "mean": cifar_mean, "std": cifar_std}
    am, tensors, meta = fixture_case("cifar18", m, cifar, cfg, n=4, hw=(32, 32), pgd=True, head=m.linear)
    ckpt = f"{FIXTURES}/robustness_cifar18.pt"
    save_robustness_checkpoint(am, ckpt, tensors["input"])
    back = restored_logits(cifar_resnet.ResNet18(wm=0.125, num_classes=10), cifar, ckpt, tensors["input"])
    assert torch.equal(back, tensors["logits"])
    tensors["checkpoint_logits"] = back
    meta["checkpoint"] = {"file": "robustness_cifar18.pt", "logits": "checkpoint_logits", "of": "input"}
    save(f"{FIXTURES}/resnet_cifar18.safetensors", tensors, meta)

    # cifar50: robustness CIFAR ResNet-50 at 1/16 width (widths 4, 8, 16, 32; features 128).
    torch.manual_seed(12)
    m = cifar_resnet.ResNet50(wm=0.0625, num_classes=10)
    cfg = {"layout": "cifar", "block": "bottleneck", "blocks": [3, 4, 6, 3], "widths": [4, 8, 16, 32],
           "num_classes": 10, "mean": cifar_mean, "std": cifar_std}
    _, tensors, meta = fixture_case("cifar50", m, cifar, cfg, n=2, hw=(32, 32), head=m.linear)
    save(f"{FIXTURES}/resnet_cifar50.safetensors", tensors, meta)

    # imagenet50: torchvision's Bottleneck ResNet, blocks [2,1,1,1], widths 8..64, 64x64 and 40x36 inputs.
    torch.manual_seed(13)
    m = reduced_torchvision_resnet50(10)
    cfg = {"layout": "imagenet", "block": "bottleneck", "blocks": [2, 1, 1, 1], "widths": [8, 16, 32, 64],
           "num_classes": 10, "mean": imagenet_mean, "std": imagenet_std}
    _, tensors, meta = fixture_case("imagenet50", m, imagenet, cfg, n=2, hw=(64, 64), pgd=True,
                                    odd_hw=(40, 36), head=m.fc)
    save(f"{FIXTURES}/resnet_imagenet50.safetensors", tensors, meta)

    maxpool_fixture()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", metavar="DIR", help="also write full-size checkpoints into DIR (not committed)")
    parser.add_argument("--skip-small", action="store_true",
                        help="with --full: only the full-size files (leaves the committed fixtures as they are)")
    args = parser.parse_args()
    if args.skip_small and not args.full:
        parser.error("--skip-small needs --full DIR")
    if not args.skip_small:
        small_fixtures()
    if args.full:
        full_size(args.full)


if __name__ == "__main__":
    main()
