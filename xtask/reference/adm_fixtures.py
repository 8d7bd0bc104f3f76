"""Reference fixtures for bigroc's ADM networks (bigroc-models `adm`) and the diffusion sampler
(bigroc `diffusion`), made with guided-diffusion-sdk==1.0.0.

Run from the repository root:

    /tmp/refvenv/bin/python xtask/reference/adm_fixtures.py
        writes tests/fixtures/adm_*.safetensors (small widths, < 10 MB together).

    /tmp/refvenv/bin/python xtask/reference/adm_fixtures.py --full DIR [--only NAME,...]
        additionally writes full-size random-weight checkpoints of every published configuration
        into DIR (NOT committed; several GB): `<preset>.pt` (a plain state dict saved with
        torch.save, the format of OpenAI's released checkpoints) and `<preset>_check.safetensors`
        (`input`, `timesteps`, `y`, `output`, `__metadata__["config"]`). The checks run with
        `BIGROC_ADM_FULL_DIR=DIR cargo test --test adm_full`.

Everything runs on the CPU in float32 and is seeded, so reruns give the same files.

Random weights: PyTorch's default init, except that the layers guided-diffusion zero-initializes
(`zero_module`: every ResBlock's last conv, attention `proj_out`, the UNet's `out.2`, the adaptive
pool's conv) get their default init back, and every GroupNorm gets a random affine
(weight ~ N(1, 0.1), bias ~ N(0, 0.1)); otherwise large parts of the network would be the identity
and parity would hold trivially. All weights are then rounded to float16-representable values and
stored as f16 (exact, half the size); inputs, outputs and all computation are float32.

The improved-diffusion UNet (the robust-guidance paper's CIFAR-10 model; improved-diffusion is not
on PyPI) is built as guided-diffusion's UNetModel with the equivalent flags: legacy attention head
order (improved-diffusion's QKVAttention splits heads first, exactly as QKVAttentionLegacy),
num_heads instead of num_head_channels, no resblock up/down (Downsample/Upsample with convs),
channel_mult (1, 2, 2, 2) for 32x32, and rescale_timesteps=True in the diffusion (the model then
receives float timesteps t * 1000 / original_num_steps). The parameter names of the two code bases
are identical (in_layers/emb_layers/out_layers/skip_connection, norm/qkv/proj_out, time_embed,
label_emb, out).

Noise: guided-diffusion draws its noise with `th.randn_like`; to record trajectories with given
noise this script temporarily replaces `torch.randn_like` with a function that returns the next
tensor of a prepared list (and checks its shape).

Every file carries `__metadata__["config"]`, a JSON string describing the case.
"""
import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refenv  # noqa: F401,E402

import numpy as np  # noqa: E402
import torch as th  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from guided_diffusion import gaussian_diffusion as gd  # noqa: E402
from guided_diffusion.respace import SpacedDiffusion, space_timesteps  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel, UNetModel  # noqa: E402

FIXTURES = "tests/fixtures"
th.set_num_threads(2)


# ---------------------------------------------------------------------------------------------
# models


def unet_kwargs(cfg):
    """The UNetModel constructor arguments for a config dict in bigroc's `UNetConfig` layout."""
    return dict(
        image_size=cfg["image_size"],
        in_channels=cfg["in_channels"],
        model_channels=cfg["model_channels"],
        out_channels=cfg["out_channels"],
        num_res_blocks=cfg["num_res_blocks"],
        attention_resolutions=tuple(cfg["attention_resolutions"]),
        dropout=cfg["dropout"],
        channel_mult=tuple(cfg["channel_mult"]),
        conv_resample=cfg["conv_resample"],
        num_classes=cfg["num_classes"],
        num_heads=cfg["num_heads"],
        num_head_channels=-1 if cfg["num_head_channels"] is None else cfg["num_head_channels"],
        num_heads_upsample=-1 if cfg["num_heads_upsample"] is None else cfg["num_heads_upsample"],
        use_scale_shift_norm=cfg["use_scale_shift_norm"],
        resblock_updown=cfg["resblock_updown"],
        use_new_attention_order=cfg["use_new_attention_order"],
    )


def encoder_kwargs(cfg):
    return dict(
        image_size=cfg["image_size"],
        in_channels=cfg["in_channels"],
        model_channels=cfg["model_channels"],
        out_channels=cfg["out_channels"],
        num_res_blocks=cfg["num_res_blocks"],
        attention_resolutions=tuple(cfg["attention_resolutions"]),
        dropout=cfg["dropout"],
        channel_mult=tuple(cfg["channel_mult"]),
        conv_resample=cfg["conv_resample"],
        num_heads=cfg["num_heads"],
        num_head_channels=-1 if cfg["num_head_channels"] is None else cfg["num_head_channels"],
        use_scale_shift_norm=cfg["use_scale_shift_norm"],
        resblock_updown=cfg["resblock_updown"],
        use_new_attention_order=cfg["use_new_attention_order"],
        pool=cfg["pool"],
    )


def unet_config(**over):
    cfg = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=[2],
        dropout=0.0,
        channel_mult=[1, 2],
        conv_resample=True,
        num_classes=None,
        num_heads=2,
        num_head_channels=None,
        num_heads_upsample=None,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_new_attention_order=False,
    )
    cfg.update(over)
    return cfg


def encoder_config(**over):
    cfg = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=10,
        num_res_blocks=1,
        attention_resolutions=[2],
        dropout=0.0,
        channel_mult=[1, 2],
        conv_resample=True,
        num_heads=1,
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        pool="attention",
    )
    cfg.update(over)
    return cfg


def randomize(model):
    """Default init, plus the zero-initialized layers re-initialized and random GroupNorm affines."""
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            with th.no_grad():
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            if not m.weight.detach().abs().sum():
                m.reset_parameters()
    model.eval()
    return round_f16(model)


def round_f16(model):
    """Round every weight to a float16-representable value: the files store weights as f16 (half
    the size) and both sides compute in f32 with exactly these values."""
    with th.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def make_unet(cfg):
    return randomize(UNetModel(**unet_kwargs(cfg)))


def make_encoder(cfg):
    return randomize(EncoderUNetModel(**encoder_kwargs(cfg)))


def weights(model, prefix="model."):
    """The state dict under `prefix`, stored as f16 (exact: see `randomize`)."""
    out = {}
    for k, v in model.state_dict().items():
        h = v.detach().half()
        assert th.equal(h.float(), v), k
        out[prefix + k] = h.contiguous()
    return out


def save(name, tensors, config):
    path = os.path.join(FIXTURES, name + ".safetensors")
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"config": json.dumps(config)})
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


def classifier_grad(classifier, x, t, y):
    """What guided-diffusion's classifier_sample.py cond_fn computes (scale 1): the gradient of
    sum_i log_softmax(classifier(x, t))_i[y_i] with respect to x."""
    with th.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        log_probs = F.log_softmax(logits, dim=-1)
        selected = log_probs[range(len(logits)), y.view(-1)]
        return th.autograd.grad(selected.sum(), x_in)[0]


# ---------------------------------------------------------------------------------------------
# network cases

UNET_CASES = {
    # legacy head order, scale-shift norm, resample by plain avg-pool/nearest (conv_resample off),
    # fewer heads in the up path, class-conditional with learned sigma
    "adm_unet_legacy": unet_config(
        channel_mult=[1, 1],
        attention_resolutions=[1, 2],
        conv_resample=False,
        num_classes=10,
        out_channels=6,
        num_heads=2,
        num_heads_upsample=1,
    ),
    # new head order with num_head_channels, resblock up/down, no scale-shift, unconditional,
    # a channel change inside the down path (1x1 skip convs)
    "adm_unet_new_updown": unet_config(
        channel_mult=[1, 2],
        attention_resolutions=[2],
        num_head_channels=16,
        use_new_attention_order=True,
        use_scale_shift_norm=False,
        resblock_updown=True,
    ),
    # the improved-diffusion layout (CIFAR-10 model of the robust-guidance paper) at small width:
    # three levels, strided-conv/conv resampling, 4 legacy heads, float (rescaled) timesteps
    "adm_unet_improved": unet_config(
        channel_mult=[1, 1, 1],
        num_res_blocks=1,
        attention_resolutions=[2, 4],
        num_heads=4,
        num_classes=10,
        out_channels=6,
    ),
}

ENCODER_CASES = {
    "adm_encoder_adaptive": encoder_config(pool="adaptive", attention_resolutions=[1, 2]),
    # the ADM classifier layout: depth 2, scale-shift, resblock up/down, legacy head order blocks
    "adm_encoder_attention": encoder_config(pool="attention", num_res_blocks=2, channel_mult=[1, 1]),
    # spatial pools on a narrower torso (their 2048-wide hidden layer dominates the file size)
    "adm_encoder_spatial": encoder_config(
        pool="spatial", channel_mult=[1, 1], use_scale_shift_norm=False, resblock_updown=False,
        num_head_channels=None, num_heads=2, use_new_attention_order=True,
    ),
    "adm_encoder_spatial_v2": encoder_config(
        pool="spatial_v2", channel_mult=[1, 1], resblock_updown=False, conv_resample=False,
        num_head_channels=16,
    ),
}


def unet_case(name, cfg, seed):
    th.manual_seed(seed)
    model = make_unet(cfg)
    n = 2
    x = th.randn(n, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if name == "adm_unet_improved":
        timesteps = th.tensor([0.0, 537.5])  # rescale_timesteps passes floats
    else:
        timesteps = th.tensor([3, 999])
    tensors = weights(model)
    tensors.update(input=x, timesteps=timesteps.float())
    kwargs = {}
    if cfg["num_classes"] is not None:
        y = th.tensor([1, 7])
        kwargs["y"] = y
        tensors["y"] = y
    with th.no_grad():
        out = model(x, timesteps, **kwargs)
    tensors["output"] = out
    save(name, tensors, {"kind": "unet", "model": cfg})


def encoder_case(name, cfg, seed):
    th.manual_seed(seed)
    model = make_encoder(cfg)
    n = 2
    x = th.randn(n, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    timesteps = th.tensor([10, 750])
    y = th.tensor([3, 8])
    with th.no_grad():
        logits = model(x, timesteps)
    grad = classifier_grad(model, x, timesteps, y)
    tensors = weights(model)
    tensors.update(input=x, timesteps=timesteps.float(), y=y, output=logits, grad=grad)
    save(name, tensors, {"kind": "encoder", "model": cfg})


# ---------------------------------------------------------------------------------------------
# schedules

RESPACINGS = [
    ("linear", 1000, "250"),
    ("linear", 1000, "50,50,50,50"),
    ("linear", 1000, "ddim25"),
    ("linear", 1000, "ddim50"),
    ("linear", 1000, "10"),
    ("linear", 1000, "10,20,30"),
    ("linear", 1000, "25"),  # a fractional stride that hits .5: Python rounds half to even
    ("linear", 1000, "1000"),
    ("cosine", 1000, "100"),
    ("cosine", 4000, "250"),
    ("cosine", 4000, "ddim100"),
    ("linear", 100, "7,3,1"),  # also hits .5
]

SCHEDULE_ARRAYS = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


def schedules():
    tensors = {}
    cases = []
    for schedule in ["linear", "cosine"]:
        for steps in [1000]:
            base = gd.GaussianDiffusion(
                betas=gd.get_named_beta_schedule(schedule, steps),
                model_mean_type=gd.ModelMeanType.EPSILON,
                model_var_type=gd.ModelVarType.FIXED_SMALL,
                loss_type=gd.LossType.MSE,
            )
            for arr in SCHEDULE_ARRAYS:
                tensors[f"{schedule}_{steps}.{arr}"] = th.from_numpy(np.asarray(getattr(base, arr), dtype=np.float64))
    for i, (schedule, steps, spacing) in enumerate(RESPACINGS):
        use = space_timesteps(steps, spacing)
        sd = SpacedDiffusion(
            use_timesteps=use,
            betas=gd.get_named_beta_schedule(schedule, steps),
            model_mean_type=gd.ModelMeanType.EPSILON,
            model_var_type=gd.ModelVarType.LEARNED_RANGE,
            loss_type=gd.LossType.MSE,
        )
        tensors[f"respaced{i}.timestep_map"] = th.tensor(sd.timestep_map, dtype=th.int64)
        tensors[f"respaced{i}.betas"] = th.from_numpy(np.asarray(sd.betas, dtype=np.float64))
        cases.append({"key": f"respaced{i}", "schedule": schedule, "steps": steps, "respacing": spacing})
    errors = []
    for steps, spacing in [(1000, "ddim999"), (10, "11"), (1000, "300,300,300,300")]:
        try:
            space_timesteps(steps, spacing)
            errors.append({"steps": steps, "respacing": spacing, "error": None})
        except ValueError as e:
            errors.append({"steps": steps, "respacing": spacing, "error": str(e)})
    save("adm_schedules", tensors, {"kind": "schedules", "respaced": cases, "invalid": errors})


# ---------------------------------------------------------------------------------------------
# p_mean_variance for every variance type, from a given model output


def gaussian_case():
    th.manual_seed(11)
    n, c, hw = 3, 3, 4
    x = th.randn(n, c, hw, hw)
    out6 = th.randn(n, 2 * c, hw, hw) * 0.8
    tensors = {"x": x, "model_output": out6}
    cases = []
    for var_type, learn in [("fixed_small", False), ("fixed_large", False), ("learned_range", True)]:
        diffusion = create_gaussian_diffusion(
            steps=1000, learn_sigma=learn, sigma_small=(var_type == "fixed_small"),
            noise_schedule="linear", timestep_respacing="20",
        )
        for t_idx in [0, 1, 13, 19]:
            for clip in [True, False]:
                out = out6 if learn else out6[:, :c]
                t = th.tensor([t_idx] * n)
                r = diffusion.p_mean_variance(lambda x_, t_, **k: out, x, t, clip_denoised=clip)
                key = f"{var_type}.t{t_idx}.{'clip' if clip else 'noclip'}"
                for name in ["mean", "variance", "log_variance", "pred_xstart"]:
                    tensors[f"{key}.{name}"] = r[name].float()
                cases.append({"key": key, "var_type": var_type, "t": t_idx, "clip_denoised": clip})
    # q_sample with per-example timesteps (respaced indices)
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="20")
    t = th.tensor([0, 9, 19])
    noise = th.randn_like(x)
    tensors["q_sample.t"] = t
    tensors["q_sample.noise"] = noise
    tensors["q_sample.out"] = diffusion.q_sample(x, t, noise)
    save("adm_gaussian", tensors, {
        "kind": "gaussian", "steps": 1000, "noise_schedule": "linear", "timestep_respacing": "20",
        "cases": cases,
        "q_sample": {"noise_schedule": "cosine", "steps": 1000, "timestep_respacing": "20"},
    })


# ---------------------------------------------------------------------------------------------
# guided sampling


@contextlib.contextmanager
def given_noise(noises):
    """Make th.randn_like return the given tensors in order (guided-diffusion draws all its
    sampling noise with it)."""
    it = iter(noises)
    orig = th.randn_like

    def fake(x, *args, **kwargs):
        z = next(it)
        assert z.shape == x.shape, (z.shape, x.shape)
        return z.to(x.dtype)

    th.randn_like = fake
    try:
        yield
    finally:
        th.randn_like = orig


SAMPLER_UNET = unet_config(
    image_size=8, channel_mult=[1, 1], attention_resolutions=[2], num_classes=10, out_channels=6,
    num_heads=2, resblock_updown=True, use_new_attention_order=True, num_head_channels=16,
)
IMPROVED_UNET = unet_config(
    image_size=8, channel_mult=[1, 1], attention_resolutions=[2], num_classes=10, out_channels=6,
    num_heads=4,
)
SAMPLER_CLASSIFIER = encoder_config(
    image_size=8, channel_mult=[1, 1], num_res_blocks=1, attention_resolutions=[2]
)
SAMPLER_MODELS = {}


def sampler_models():
    """The tiny networks every sampling fixture uses, saved once in adm_sampler_models."""
    if not SAMPLER_MODELS:
        th.manual_seed(20)
        for key, cfg in [("unet", SAMPLER_UNET), ("improved", IMPROVED_UNET)]:
            model = make_unet(cfg)
            # scale the random eps prediction down so that the x0 predictions are mostly inside
            # [-1, 1] and the trajectory is not all clipping
            with th.no_grad():
                model.out[2].weight.mul_(0.25)
                model.out[2].bias.mul_(0.25)
            SAMPLER_MODELS[key] = round_f16(model)
        classifier = make_encoder(SAMPLER_CLASSIFIER)
        # spread the logits like a trained classifier's, so that the guidance gradient moves the
        # samples by much more than the parity tolerance
        with th.no_grad():
            classifier.out[2].c_proj.weight.mul_(16.0)
        SAMPLER_MODELS["classifier"] = round_f16(classifier)
        tensors = {}
        for key, m in SAMPLER_MODELS.items():
            tensors.update(weights(m, key + "."))
        save("adm_sampler_models", tensors, {
            "kind": "sampler_models", "unet": SAMPLER_UNET, "improved": IMPROVED_UNET,
            "classifier": SAMPLER_CLASSIFIER,
        })
    return SAMPLER_MODELS


def make_fns(model, classifier, scale):
    def model_fn(x, t, y=None):
        return model(x, t, y)

    def cond_fn(x, t, y=None):
        return classifier_grad(classifier, x, t, y) * scale

    return model_fn, cond_fn


def p_sample_case():
    th.manual_seed(21)
    models = sampler_models()
    model, classifier = models["unet"], models["classifier"]
    scale = 2.5
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing="10,0,0"
    )
    model_fn, cond_fn = make_fns(model, classifier, scale)
    n = 2
    x = 0.6 * th.randn(n, 3, 8, 8)
    y = th.tensor([2, 5])
    tensors = {"x": x, "y": y}
    steps = []
    for t_idx in [6, 0]:
        t = th.tensor([t_idx] * n)
        noise = th.randn(n, 3, 8, 8)
        with th.no_grad():
            pmv = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=True, model_kwargs={"y": y})
        mapped = th.tensor(diffusion.timestep_map)[t]
        grad = classifier_grad(classifier, x, mapped, y)
        with given_noise([noise]), th.no_grad():
            out = diffusion.p_sample(model_fn, x, t, clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": y})
        key = f"t{t_idx}"
        tensors.update({
            f"{key}.noise": noise,
            f"{key}.mean": pmv["mean"],
            f"{key}.variance": pmv["variance"],
            f"{key}.pred_xstart": pmv["pred_xstart"],
            f"{key}.grad": grad,
            f"{key}.sample": out["sample"],
        })
        steps.append({"key": key, "t": t_idx})
    save("adm_p_sample", tensors, {
        "kind": "p_sample", "model": "unet", "classifier": "classifier",
        "models_file": "adm_sampler_models",
        "diffusion": {"steps": 1000, "noise_schedule": "linear", "learn_sigma": True,
                      "timestep_respacing": "10,0,0", "rescale_timesteps": False},
        "classifier_scale": scale, "clip_denoised": True, "steps": steps,
    })


def trajectory_case(name, method, eta, unet_key, respacing, rescale, seed, scale):
    models = sampler_models()
    th.manual_seed(seed)
    model, classifier = models[unet_key], models["classifier"]
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="linear", timestep_respacing=respacing,
        rescale_timesteps=rescale,
    )
    model_fn, cond_fn = make_fns(model, classifier, scale)
    n = 2
    # x_T at the scale of the data: with a random network, x0 predictions from pure noise at large
    # t would all be clipped, so the trajectories start at t <= T/3 (respacing "10,0,0")
    x_t = 0.6 * th.randn(n, 3, 8, 8)
    y = th.tensor([4, 9])
    num = diffusion.num_timesteps
    noises = [th.randn(n, 3, 8, 8) for _ in range(num)]
    tensors = {"x_T": x_t, "y": y, "noise": th.stack(noises)}
    with given_noise(noises), th.no_grad():
        if method == "ddim":
            steps = list(diffusion.ddim_sample_loop_progressive(
                model_fn, (n, 3, 8, 8), noise=x_t, clip_denoised=True, cond_fn=cond_fn,
                model_kwargs={"y": y}, eta=eta, device=th.device("cpu"),
            ))
        else:
            steps = list(diffusion.p_sample_loop_progressive(
                model_fn, (n, 3, 8, 8), noise=x_t, clip_denoised=True, cond_fn=cond_fn,
                model_kwargs={"y": y}, device=th.device("cpu"),
            ))
    tensors["samples"] = th.stack([s["sample"] for s in steps])
    tensors["pred_xstarts"] = th.stack([s["pred_xstart"] for s in steps])
    save(name, tensors, {
        "kind": "trajectory", "method": method, "eta": eta, "model": unet_key,
        "classifier": "classifier", "models_file": "adm_sampler_models",
        "diffusion": {"steps": 1000, "noise_schedule": "linear", "learn_sigma": True,
                      "timestep_respacing": respacing, "rescale_timesteps": rescale},
        "classifier_scale": scale, "clip_denoised": True,
        "note": "noise[k] is the noise of the k-th step (k=0 is the first, at the largest t)",
    })


# ---------------------------------------------------------------------------------------------
# full-size presets (not committed)

# The published command lines (flags exactly as in guided-diffusion's README / the issue).
PUBLISHED_FLAGS = {
    "adm128_diffusion": ("unet", dict(
        image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        num_heads=4, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
        class_cond=True)),
    "adm128_classifier": ("encoder", dict(
        image_size=128, classifier_width=128, classifier_depth=2,
        classifier_attention_resolutions="32,16,8", classifier_pool="attention",
        classifier_resblock_updown=True, classifier_use_scale_shift_norm=True)),
    "adm256_diffusion": ("unet", dict(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        num_heads=4, num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True,
        learn_sigma=True, class_cond=True)),
    "adm256_classifier": ("encoder", dict(
        image_size=256, classifier_width=128, classifier_depth=2,
        classifier_attention_resolutions="32,16,8", classifier_pool="attention",
        classifier_resblock_updown=True, classifier_use_scale_shift_norm=True)),
    # other flag sets, to pin down the defaults
    "defaults_64": ("unet", dict()),
    "defaults_64_classifier": ("encoder", dict()),
    "misc_64": ("unet", dict(
        channel_mult="1,2,2", num_heads_upsample=2, attention_resolutions="32", dropout=0.3,
        use_new_attention_order=True, use_scale_shift_norm=False)),
}


def script_config(kind, flags):
    """The constructor arguments guided-diffusion's script_util passes for these flags (captured by
    replacing the model class), in bigroc's config layout."""
    from guided_diffusion import script_util

    captured = {}

    def capture(**kwargs):
        captured.update(kwargs)
        return None

    name = "UNetModel" if kind == "unet" else "EncoderUNetModel"
    orig = getattr(script_util, name)
    setattr(script_util, name, capture)
    try:
        if kind == "unet":
            args = script_util.model_and_diffusion_defaults()
            args.update(flags)
            keys = th_inspect_args(script_util.create_model)
            script_util.create_model(**{k: args[k] for k in keys if k in args})
        else:
            args = script_util.classifier_defaults()
            args.update(flags)
            keys = th_inspect_args(script_util.create_classifier)
            script_util.create_classifier(**{k: args[k] for k in keys if k in args})
    finally:
        setattr(script_util, name, orig)
    cfg = dict(
        image_size=captured["image_size"],
        in_channels=captured["in_channels"],
        model_channels=captured["model_channels"],
        out_channels=captured["out_channels"],
        num_res_blocks=captured["num_res_blocks"],
        attention_resolutions=list(captured["attention_resolutions"]),
        dropout=float(captured.get("dropout", 0.0)),
        channel_mult=[float(m) for m in captured["channel_mult"]],
        conv_resample=True,
        num_heads=captured.get("num_heads", 1),
        num_head_channels=None if captured.get("num_head_channels", -1) == -1 else captured["num_head_channels"],
        use_scale_shift_norm=captured["use_scale_shift_norm"],
        resblock_updown=captured["resblock_updown"],
        use_new_attention_order=captured.get("use_new_attention_order", False),
    )
    if kind == "unet":
        cfg["num_classes"] = captured["num_classes"]
        nhu = captured.get("num_heads_upsample", -1)
        cfg["num_heads_upsample"] = None if nhu == -1 else nhu
    else:
        cfg["pool"] = captured["pool"]
    return cfg, args


def th_inspect_args(fn):
    import inspect
    return inspect.getfullargspec(fn).args


def script_flag_fixture():
    cases = []
    for name, (kind, flags) in PUBLISHED_FLAGS.items():
        cfg, args = script_config(kind, flags)
        cases.append({"name": name, "kind": kind, "flags": flags, "all_flags": args, "config": cfg})
    for name in ["cifar10_diffusion", "cifar10_classifier"]:
        kind, cfg = full_presets()[name]
        cfg = dict(cfg, channel_mult=[float(m) for m in cfg["channel_mult"]])
        cases.append({"name": name, "kind": kind, "flags": None, "config": cfg})
    save("adm_script_flags", {"dummy": th.zeros(1)}, {"kind": "script_flags", "cases": cases})


def full_presets():
    presets = {}
    for name in ["adm128_diffusion", "adm128_classifier", "adm256_diffusion", "adm256_classifier"]:
        kind, flags = PUBLISHED_FLAGS[name]
        presets[name] = (kind, script_config(kind, flags)[0])
    # guided-diffusion's create_model/create_classifier do not support 32x32; the robust-guidance
    # paper's CIFAR-10 models are built directly (improved-diffusion layout, see the docstring)
    presets["cifar10_diffusion"] = ("unet", dict(
        image_size=32, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
        attention_resolutions=[32 // 16, 32 // 8], dropout=0.1, channel_mult=[1, 2, 2, 2],
        conv_resample=True, num_classes=10, num_heads=4, num_head_channels=None,
        num_heads_upsample=None, use_scale_shift_norm=True, resblock_updown=False,
        use_new_attention_order=False))
    presets["cifar10_classifier"] = ("encoder", dict(
        image_size=32, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=2,
        attention_resolutions=[32 // 16, 32 // 8], dropout=0.0, channel_mult=[1, 2, 2, 2],
        conv_resample=True, num_heads=1, num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False, pool="attention"))
    return presets


def full(out_dir, only):
    os.makedirs(out_dir, exist_ok=True)
    for i, (name, (kind, cfg)) in enumerate(full_presets().items()):
        if only and name not in only:
            continue
        th.manual_seed(100 + i)
        model = make_unet(cfg) if kind == "unet" else make_encoder(cfg)
        th.save(model.state_dict(), os.path.join(out_dir, name + ".pt"))
        hw = cfg["image_size"]
        x = th.randn(1, 3, hw, hw)
        t = th.tensor([421])
        tensors = {"input": x, "timesteps": t.float()}
        with th.no_grad():
            if kind == "unet":
                y = th.tensor([7])
                tensors["y"] = y
                out = model(x, t, y)
            else:
                out = model(x, t)
        tensors["output"] = out
        if kind == "encoder":
            tensors["y"] = th.tensor([3])
            tensors["grad"] = classifier_grad(model, x, t, tensors["y"])
        path = os.path.join(out_dir, name + "_check.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path,
                  metadata={"config": json.dumps({"kind": kind, "preset": name, "model": cfg})})
        print(f"{out_dir}/{name}.pt and {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", metavar="DIR", help="also write full-size checkpoints into DIR")
    parser.add_argument("--only", default="", help="comma-separated presets for --full")
    parser.add_argument("--skip-small", action="store_true", help="with --full: only the full-size files")
    args = parser.parse_args()
    if not args.skip_small:
        os.makedirs(FIXTURES, exist_ok=True)
        for i, (name, cfg) in enumerate(UNET_CASES.items()):
            unet_case(name, cfg, seed=i)
        for i, (name, cfg) in enumerate(ENCODER_CASES.items()):
            encoder_case(name, cfg, seed=10 + i)
        schedules()
        script_flag_fixture()
        gaussian_case()
        p_sample_case()
        trajectory_case("adm_traj_ddim_eta0", "ddim", 0.0, "unet", "10,0,0", False, 31, 2.0)
        trajectory_case("adm_traj_ddim_eta05", "ddim", 0.5, "unet", "10,0,0", False, 32, 2.0)
        trajectory_case("adm_traj_p_sample_rescaled", "p_sample", 0.0, "improved", "10,0,0", True, 33, 2.0)
    if args.full:
        full(args.full, [s for s in args.only.split(",") if s])


if __name__ == "__main__":
    main()
