"""Fixtures for the labelled-dataset readers (tests/data_formats.rs): the same 20 small images as
CIFAR-10 binary batches, CIFAR-10 python pickles and a PNG ImageFolder tar.

Run from the repo root: /tmp/refvenv/bin/python xtask/reference/data_fixtures.py
Writes tests/fixtures/data/:
- cifar-10-batches-bin/data_batch_{1,2}.bin (12 + 8 records: 1 label byte, then the R, G and B
  planes of 32x32) and batches.meta.txt (one class name a line), as in the official archive;
- cifar-10-batches-py/data_batch_{1,2} and batches.meta: pickles laid out like the official ones,
  which Python 2's cPickle wrote with protocol 2 (byte strings as SHORT_BINSTRING/BINSTRING, the
  array through `numpy.core.multiarray._reconstruct`); a Python-3 pickler writes bytes through
  `_codecs.encode` instead, so `Py2Pickler` below reproduces the Python-2 opcodes;
- imagefolder.tar: `train/<class>/NNNN.png` (NNNN = the image's index in the batches), written in
  reverse order so that readers must sort, with directory members as in real archives.

Pixel values follow `pixel()` below, which tests/data_formats.rs recomputes; labels are
`(7 * i + 1) % 3`. The script checks its own output with the reference readers: `pickle.load`
(encoding="bytes" as the CIFAR-10 page documents, and "latin1" as torchvision's CIFAR10 uses),
numpy on the binary records, and torchvision's `ImageFolder` on the extracted tar (class order and
image order, which the Rust reader must reproduce).
"""
import io
import os
import pickle
import struct
import tarfile
import tempfile

import numpy as np
from PIL import Image

OUT = os.path.join("tests", "fixtures", "data")
N = 20
SPLIT = 12  # data_batch_1 holds images 0..12, data_batch_2 the rest
CLASSES = ["bird", "cat", "deer"]


def pixel(i, c, y, x):
    """Smooth gradients (so the PNGs stay small) that differ per image and channel."""
    return (29 * i + 80 * c + (3 + i % 4) * y + (1 + c) * x + (x * y) // 7) % 256


def make_images():
    i, c, y, x = np.meshgrid(np.arange(N), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    chw = pixel(i, c, y, x).astype(np.uint8)  # (N, 3, 32, 32)
    labels = [(7 * k + 1) % 3 for k in range(N)]
    return chw, labels


class Py2Pickler(pickle._Pickler):
    """Writes protocol 2 the way Python 2's cPickle did for these files: native strings (here both
    `str` and `bytes`) as SHORT_BINSTRING / BINSTRING, globals under their Python-2 module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def py2_pickle(obj, path):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_bin(chw, labels):
    d = os.path.join(OUT, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)
    for b, (lo, hi) in enumerate([(0, SPLIT), (SPLIT, N)], start=1):
        with open(os.path.join(d, f"data_batch_{b}.bin"), "wb") as f:
            for k in range(lo, hi):
                f.write(bytes([labels[k]]) + chw[k].tobytes())
        # The reference reading of the format: a record is 1 + 3072 bytes.
        raw = np.fromfile(os.path.join(d, f"data_batch_{b}.bin"), dtype=np.uint8).reshape(-1, 3073)
        assert (raw[:, 0] == labels[lo:hi]).all() and (raw[:, 1:].reshape(-1, 3, 32, 32) == chw[lo:hi]).all()
    with open(os.path.join(d, "batches.meta.txt"), "w") as f:
        f.write("".join(name + "\n" for name in CLASSES) + "\n")


def write_py(chw, labels):
    d = os.path.join(OUT, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    for b, (lo, hi) in enumerate([(0, SPLIT), (SPLIT, N)], start=1):
        path = os.path.join(d, f"data_batch_{b}")
        # Python 2 str keys and values, as in the official files.
        py2_pickle(
            {
                "batch_label": f"training batch {b} of 2",
                "labels": labels[lo:hi],
                "data": chw[lo:hi].reshape(hi - lo, 3072),
                "filenames": [f"image_{k:04}.png" for k in range(lo, hi)],
            },
            path,
        )
        with open(path, "rb") as f:
            as_bytes = pickle.load(f, encoding="bytes")
        assert sorted(as_bytes) == [b"batch_label", b"data", b"filenames", b"labels"]
        assert as_bytes[b"data"].dtype == np.uint8 and as_bytes[b"data"].shape == (hi - lo, 3072)
        assert (as_bytes[b"data"].reshape(-1, 3, 32, 32) == chw[lo:hi]).all()
        assert as_bytes[b"labels"] == labels[lo:hi]
        with open(path, "rb") as f:
            as_latin1 = pickle.load(f, encoding="latin1")  # torchvision's CIFAR10 reading
        assert (as_latin1["data"] == as_bytes[b"data"]).all() and as_latin1["labels"] == labels[lo:hi]
    meta = os.path.join(d, "batches.meta")
    py2_pickle({"num_cases_per_batch": SPLIT, "label_names": CLASSES, "num_vis": 3072}, meta)
    with open(meta, "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"label_names"] == [c.encode() for c in CLASSES]


def write_tar(chw, labels):
    path = os.path.join(OUT, "imagefolder.tar")

    def info(name, size=0, kind=tarfile.REGTYPE):
        ti = tarfile.TarInfo(name)
        ti.size, ti.type, ti.mtime, ti.mode = size, kind, 1577836800, 0o755 if kind == tarfile.DIRTYPE else 0o644
        return ti

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info("train", kind=tarfile.DIRTYPE))
        for name in CLASSES:
            tar.addfile(info(f"train/{name}", kind=tarfile.DIRTYPE))
        for k in reversed(range(N)):
            buf = io.BytesIO()
            Image.fromarray(chw[k].transpose(1, 2, 0)).save(buf, format="PNG", optimize=True)
            tar.addfile(info(f"train/{CLASSES[labels[k]]}/{k:04}.png", len(buf.getvalue())), io.BytesIO(buf.getvalue()))

    # torchvision's ImageFolder on the extracted tree: sorted classes, images by (class, path).
    from torchvision.datasets import ImageFolder

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        ds = ImageFolder(os.path.join(tmp, "train"))
        assert ds.classes == CLASSES
        expected = sorted(range(N), key=lambda k: (labels[k], k))
        assert [lab for _, lab in ds.samples] == [labels[k] for k in expected]
        for j, k in enumerate(expected):
            img, lab = ds[j]
            assert lab == labels[k] and (np.asarray(img) == chw[k].transpose(1, 2, 0)).all()


def main():
    chw, labels = make_images()
    write_bin(chw, labels)
    write_py(chw, labels)
    write_tar(chw, labels)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
