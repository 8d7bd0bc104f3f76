"""Reference fixtures for training robustness' CIFAR ResNets (bigroc-models `ResNet::forward_t(x, true)`,
and the adversarial training step of `bigroc train classifier`).

Run from the repository root:

    /tmp/refvenv/bin/python xtask/reference/resnet_train_fixtures.py
        writes tests/fixtures/resnet_train_{cifar18,cifar50,cifar18_adv}.safetensors

Everything runs on the CPU and is seeded; reruns give identical files.

Models are robustness' own `cifar_models.resnet` wrapped in its `AttackerModel` (InputNormalize: clamp to
[0, 1], then normalize), with the random weights of resnet_fixtures.py (`randomize_batchnorm`: running
statistics measured on random inputs and perturbed, random batch-norm affine parameters, a head rescaled
to a trained-like logit spread), so running statistics are far from their 0/1 initial values.

A training step is what robustness' `train._model_loop` does for one batch with the model in train mode:
`output, final_inp = model(inp, target=target, make_adv=adv, **attack_kwargs)`,
`loss = CrossEntropyLoss()(output, target)`, `loss.backward()` (the optimizer step is not part of the
fixture). In train mode batch norm normalizes with the batch statistics (biased variance) and updates its
running statistics (momentum 0.1, unbiased variance) once per forward.

The expected outputs of the step are computed in float64 from the float32 weights and input (stored
as float32): in float32, a ReLU input within rounding of zero flips between implementations and moves the
gradients of earlier layers by up to ~1e-2, so torch's float32 gradients are not a reference to 1e-4. The
batch is redrawn until torch's own float32 step, and variants of it that differ at rounding level
(batch permuted, input moved by ~1e-7), are within DEVIATION_TOL of float64 (`reference_step`).

Layout of resnet_train_<case>.safetensors:
    model.<key>     the bare classifier's state dict BEFORE the step (num_batches_tracked included)
    input, target   (N,3,32,32) f32 pixels in [0,1] (some exactly 0 or 1); (N,) i64 labels
    logits          train-mode logits of the batch (for _adv: of the attacked batch `adv`)
    loss            (1,) mean cross entropy of `logits`
    grad.<key>      d loss / d parameter, for every parameter (`named_parameters()`) of the classifier
    running.<key>   every running_mean / running_var after the step
    cifar18_adv only:
    adv             the attacked batch robustness' AttackerModel returned in float32 (`final_inp`)
    adv.iterates    (iterations + 1, N, 3, 32, 32): the point each PGD step starts from, then the final
                    iterate, as the attacker's normalizer saw them (all in eval mode)
    adv.losses      (iterations + 1, N): per-sample eval-mode cross entropy of those iterates; `adv` is,
                    per sample, the iterate with the largest loss (use_best, first one on ties)
    __metadata__["config"] = JSON {"case", "resnet_config" (serde form of bigroc's ResNetConfig),
        "mode": "train", "loss", "reference", "momentum", "eps", "num_batches_tracked_before"/"_after",
        "float32_deviation" (of torch's float32 steps from the reference), "attempts", "screened"
        (cifar18, cifar50 only; false for cifar50, see main), and for
        cifar18_adv "attack_kwargs" (exactly the keyword arguments train._model_loop passes to
        AttackerModel when training), "attacker_defaults" (the Attacker.forward defaults those leave in
        force), "attack_mode", "robustness_train_defaults" (defaults.py's values for CIFAR),
        "attack_instability" (how far the attacked batch moves when the attack runs in float64),
        "adv_fields"}

The attack is robustness' own `Attacker`, called through `AttackerModel.forward(make_adv=True)`, which
switches the whole model to eval() for the attack (running statistics used, not updated) and back to
train() for the forward whose loss is trained on. Its input is redrawn until the attacked batch is stable
under rounding-level changes (float64 rerun moves it by at most INSTABILITY_TOL), so a correct float32
reimplementation reproduces `adv` to ~1e-6.
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402  (must come before robustness)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from robustness import attacker, datasets, defaults  # noqa: E402
from robustness.cifar_models import resnet as cifar_resnet  # noqa: E402

# Shared conventions: random realistic batch norm, saturated input pixels, `model.` prefix, writing.
# (Importing it also makes robustness' Attacker's `.cuda()` calls the identity on this CPU-only run.)
from resnet_fixtures import FIXTURES, make_input, randomize_batchnorm, save, state_dict_entries  # noqa: E402

BATCH = 8
HW = (32, 32)
# What robustness' train._model_loop passes to AttackerModel when adversarially training (its
# attack_kwargs, keys renamed from the args: step_size = attack_lr, iterations = attack_steps): eps 0.5
# and attack_lr 0.1 are this fixture's choice (both are required args), attack_steps is 3 instead of
# the default 7 to keep the fixture small, random_start / use_best are the PGD_ARGS defaults (0 / 1),
# custom_loss is None without args.custom_adv_loss, and random_restarts is forced to 0 in training.
ATTACK_KWARGS = {
    "constraint": "2",
    "eps": 0.5,
    "step_size": 0.1,
    "iterations": 3,
    "random_start": False,
    "custom_loss": None,
    "random_restarts": 0,
    "use_best": True,
}
INSTABILITY_TOL = 1e-5  # largest move of the attacked batch between float32 and float64
DEVIATION_TOL = 2e-5  # largest relative deviation of torch's float32 training steps from float64
SCREEN_RUNS = 3  # float32 variants per kind (batch permuted, input moved at rounding level)
MAX_ATTEMPTS = 40


def cifar_config(block, blocks, widths, cifar):
    return {"layout": "cifar", "block": block, "blocks": blocks, "widths": widths, "num_classes": 10,
            "mean": cifar.mean.tolist(), "std": cifar.std.tolist()}


def running_stats(model, prefix="running."):
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith("running_mean") or k.endswith("running_var")}


def train_step(am, x, target, attack_kwargs=None):
    """One training step of robustness' _model_loop on AttackerModel `am` (train mode), up to the
    backward; returns (logits, loss, the input the loss was computed on)."""
    am.train()
    am.zero_grad(set_to_none=True)
    if attack_kwargs is None:
        output, final_inp = am(x, target=target, make_adv=False)
    else:
        output, final_inp = am(x, target=target, make_adv=True, **attack_kwargs)
    loss = nn.CrossEntropyLoss()(output, target)
    loss.backward()
    return output.detach(), loss.detach(), final_inp.detach()


def step_outputs(am, x, target, dtype, perm=None):
    """The training step on a copy of `am` in `dtype` (`am` is left untouched): `logits`, `loss`,
    `grad.<key>`, `running.<key>`. With `perm`, the batch goes through in that order (the same step
    mathematically; only the summation order inside batch norm changes) and the logits are put back."""
    am_ = copy.deepcopy(am).to(dtype)
    x, target = x.to(dtype), target
    if perm is not None:
        x, target = x[perm], target[perm]
    logits, loss, _ = train_step(am_, x, target)
    if perm is not None:
        logits = logits[torch.argsort(perm)]
    tensors = {"logits": logits, "loss": loss.reshape(1)}
    for name, p in am_.model.named_parameters():
        assert p.grad is not None, name
        tensors[f"grad.{name}"] = p.grad.detach().clone()
    tensors.update(running_stats(am_.model))
    return tensors


def reference_step(am, x, target, gen):
    """The training step (no attack) in float64 from `am`'s float32 weights and the input `x`, and how
    far float32 steps can land from it: (tensors, deviation), the tensors being `logits`, `loss`,
    `grad.<key>` and `running.<key>` as float32, the deviation the largest max-abs relative difference
    from them over torch's float32 step, the same with the batch permuted, and with the unsaturated
    pixels moved by ~1e-7 (SCREEN_RUNS runs each).

    The reference is computed in float64 because deep in a random network a few ReLU inputs lie
    within float32 rounding of zero: where one flips, the gradients of the earlier layers move by up
    to ~1e-2 relative (torch's own float32 step does so on about half the batches for the narrow
    ResNet-50), so float32 against float32 could not tell a right reimplementation from a wrong one.
    Batches where any of the rounding-level variants deviates by more than DEVIATION_TOL are redrawn,
    so that a float32 implementation as accurate as torch's lands within 1e-4 of the reference."""
    f64 = step_outputs(am, x, target, torch.float64)
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
    deviation = 0.0
    inside = (x > 0) & (x < 1)
    for run in range(1 + 2 * SCREEN_RUNS):
        if run == 0:
            f32 = step_outputs(am, x, target, torch.float32)
        elif run <= SCREEN_RUNS:
            f32 = step_outputs(am, x, target, torch.float32, perm=torch.randperm(len(x), generator=gen))
        else:
            xp = torch.where(inside, x + 1e-7 * torch.randn(x.shape, generator=gen), x)
            f32 = step_outputs(am, xp, target, torch.float32)
        deviation = max(deviation, max(rel(f32[k], f64[k]) for k in f32))
        if deviation > DEVIATION_TOL:
            break
    return {k: v.float() for k, v in f64.items()}, deviation


def base_meta(case, config, before):
    """Metadata of a case; `before` holds the `model.`-prefixed state dict before the step."""
    nbt = {k: int(v) for k, v in before.items() if k.endswith("num_batches_tracked")}
    assert len(set(nbt.values())) == 1
    return {"case": case, "resnet_config": config, "mode": "train",
            "loss": "CrossEntropyLoss() (mean over the batch) of logits and target",
            "reference": "float64 computation from the float32 weights and input, stored as float32",
            "momentum": 0.1, "eps": 1e-5, "num_batches_tracked_before": next(iter(nbt.values())),
            "num_batches_tracked_after": next(iter(nbt.values())) + 1}


def standard_case(case, model, cifar, config, seed, screen=True):
    torch.manual_seed(seed)
    am = attacker.AttackerModel(model, cifar)
    randomize_batchnorm(model, am.normalizer, HW)
    before = state_dict_entries(model)
    gen = torch.Generator().manual_seed(seed)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        x = make_input(BATCH, *HW)
        target = torch.randint(0, config["num_classes"], (BATCH,))
        reference, deviation = reference_step(am, x, target, gen)
        if deviation <= DEVIATION_TOL or not screen:
            break
        print(f"  {case}: attempt {attempt}: float32 step {deviation:.1e} from float64, redrawing")
    else:
        raise RuntimeError(f"no stable batch for {case}")
    tensors = dict(before, input=x, target=target, **reference)
    moved = max((tensors[k] - before["model." + k[len("running."):]]).abs().max().item()
                for k in tensors if k.startswith("running."))
    print(f"{case}: loss {reference['loss'].item():.4f}, logits |max| {reference['logits'].abs().max():.3g}, "
          f"running stats moved by up to {moved:.3g}, float32 deviation {deviation:.1e}")
    meta = base_meta(case, config, before)
    meta.update(float32_deviation=deviation, attempts=attempt, screened=screen)
    save(f"{FIXTURES}/resnet_train_{case}.safetensors", tensors, meta)


def attacked(am, x, target):
    """robustness' attack as train mode calls it, in float32 and (for the stability screen) float64;
    returns the float32 result, its iterates and their per-sample losses, and the instability."""
    iterates = []
    hook = am.attacker.normalize.register_forward_pre_hook(
        lambda mod, args: iterates.append(args[0].detach().clone()))
    am.train()
    snapshot = copy.deepcopy(am.state_dict())
    _, adv = am(x, target=target, make_adv=True, with_image=True, **ATTACK_KWARGS)
    hook.remove()
    am.load_state_dict(snapshot)  # undo the train-mode forward's running-statistics update
    am64 = copy.deepcopy(am).double()
    am64.train()
    _, adv64 = am64(x.double(), target=target, make_adv=True, **ATTACK_KWARGS)
    instability = (adv64.float() - adv).abs().max().item()
    am.eval()
    with torch.no_grad():
        losses = torch.stack([nn.functional.cross_entropy(am(it, with_image=False), target, reduction="none")
                              for it in iterates])
    return adv.detach(), torch.stack(iterates), losses, instability


def adversarial_case(case, model, cifar, config, seed):
    torch.manual_seed(seed)
    am = attacker.AttackerModel(model, cifar)
    randomize_batchnorm(model, am.normalizer, HW)
    before = state_dict_entries(model)
    gen = torch.Generator().manual_seed(seed)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        x = make_input(BATCH, *HW)
        target = torch.randint(0, config["num_classes"], (BATCH,))
        adv, iterates, losses, attack_instability = attacked(am, x, target)
        reference, deviation = reference_step(am, adv, target, gen)
        if attack_instability <= INSTABILITY_TOL and deviation <= DEVIATION_TOL:
            break
        print(f"  {case}: attempt {attempt} unstable (float64 rerun: attack moves {attack_instability:.1e}, "
              f"step deviates {deviation:.1e}), redrawing")
    else:
        raise RuntimeError(f"no stable batch for {case}")
    assert len(iterates) == ATTACK_KWARGS["iterations"] + 1, len(iterates)
    # robustness' own training step (float32) attacks the same way and trains on the same batch.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before["model." + k]), k
    _, _, final_inp = train_step(am, x, target, ATTACK_KWARGS)
    assert torch.equal(final_inp, adv), "the training step's attack differs from the screened one"
    best = losses.argmax(dim=0)
    assert torch.equal(iterates[best, torch.arange(BATCH)], adv), "adv is not the best iterate"
    tensors = dict(before, input=x, target=target, adv=adv, **reference)
    tensors["adv.iterates"] = iterates
    tensors["adv.losses"] = losses
    meta = base_meta(case, config, before)
    meta.update(
        attack_kwargs=ATTACK_KWARGS,
        attacker_defaults={"targeted": False, "should_normalize": True, "orig_input": None,
                           "do_tqdm": False, "est_grad": None, "mixed_precision": False},
        attack_mode="AttackerModel.forward(make_adv=True): eval() during the attack, train() after",
        robustness_train_defaults={
            "pgd_args": {a[0]: a[3] for a in defaults.PGD_ARGS},
            "training_args": {a[0]: a[3] for a in defaults.TRAINING_ARGS
                              if a[0] in ("lr", "momentum", "step-lr-gamma", "lr-interpolation")},
            "cifar": defaults.TRAINING_DEFAULTS[datasets.CIFAR],
            "optimizer": "SGD(model.parameters(), lr, momentum, weight_decay)",
            "random_restarts_in_training": 0,
        },
        attack_instability=attack_instability, float32_deviation=deviation, attempts=attempt,
        adv_fields={"adv": "final_inp returned by AttackerModel",
                    "adv.iterates": "start of each PGD step, then the final iterate",
                    "adv.losses": "eval-mode per-sample CE of adv.iterates"})
    delta = (adv - x).flatten(1).norm(dim=1)
    print(f"{case}: loss {reference['loss'].item():.4f}, |adv - input|_2 {[round(v, 3) for v in delta.tolist()]}, "
          f"best iterate {best.tolist()}, attack instability {attack_instability:.1e}, "
          f"float32 deviation {deviation:.1e}")
    save(f"{FIXTURES}/resnet_train_{case}.safetensors", tensors, meta)


def main():
    os.makedirs(FIXTURES, exist_ok=True)
    cifar = datasets.CIFAR("/tmp/unused")  # only its mean/std are used; no data is read

    # cifar18: ResNet-18 at 1/8 width (widths 8, 16, 32, 64).
    torch.manual_seed(21)
    m = cifar_resnet.ResNet18(wm=0.125, num_classes=10)
    standard_case("cifar18", m, cifar, cifar_config("basic", [2, 2, 2, 2], [8, 16, 32, 64], cifar), 22)

    # cifar50: Bottleneck ResNet-50 at 1/16 width (widths 4, 8, 16, 32; features 128). Not screened: at
    # this depth every batch tried (40, also at 1/8 width and batches of 2 to 16) has some ReLU input
    # within float32 rounding of zero, so torch's own float32 gradients deviate from float64 by 3e-5 to
    # 2e-1 (an early layer's batch-norm gradient is a sum of near-cancelling terms, so one flipped unit
    # moves it by ~1%). Its float32 gradients are no 1e-4 reference for anyone; the float64 step is.
    torch.manual_seed(23)
    m = cifar_resnet.ResNet50(wm=0.0625, num_classes=10)
    standard_case("cifar50", m, cifar, cifar_config("bottleneck", [3, 4, 6, 3], [4, 8, 16, 32], cifar), 24,
                  screen=False)

    # cifar18_adv: ResNet-18 at 1/16 width (widths 4, 8, 16, 32), adversarial training step.
    torch.manual_seed(25)
    m = cifar_resnet.ResNet18(wm=0.0625, num_classes=10)
    adversarial_case("cifar18_adv", m, cifar, cifar_config("basic", [2, 2, 2, 2], [4, 8, 16, 32], cifar), 26)


if __name__ == "__main__":
    main()
