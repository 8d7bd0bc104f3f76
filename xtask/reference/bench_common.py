"""What the reference scripts of `cargo xtask bench` (bench_*.py) share: the device and thread set-up,
the FLOP count, the timing protocol and the one JSON line each workload prints.

Protocol, per workload: one warm-up run, during which the FLOPs are counted, then `reps` timed runs;
the median (the middle one of the sorted times) is reported. The bigroc examples the harness runs
next to these scripts time themselves the same way (a warm-up, then the median of `reps`).

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode`: convolutions and matrix products
(mm, addmm, bmm, ...; forward and whatever backward actually ran; an `autograd.grad` with respect to
the input alone computes no weight gradients), each multiply-add counted as 2 FLOPs. Elementwise
ops, normalization, softmax and reductions are not counted.
"""
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# robustness' Attacker moves its input to CUDA unconditionally; on a CPU-only run (and on a CUDA run,
# where everything already is there) that must be the identity.
torch.Tensor.cuda = lambda self, *a, **k: self


class _NoModuleTracking:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks on module inputs make
    `torch.autograd.grad` with respect to a leaf input fail ("A leaf node was passed to
    _will_engine_execute_node", torch 2.15); only the global total is needed here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flop_counter():
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


def setup(threads, device, seed=0):
    """Sets the thread count and seed; returns the torch device and a function that waits for it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return dev, sync


def measure(run, reps, sync):
    """Warm-up (FLOPs counted), then `reps` timed runs: (median seconds, FLOPs of one run)."""
    with flop_counter() as counter:
        run()
    sync()
    flops = counter.get_total_flops()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], flops


def report(workload, seconds, flops, device, **fields):
    """Prints the workload's JSON line (seconds per unit of work, FLOPs per unit)."""
    print(json.dumps({"workload": workload, "seconds": seconds, "flops": flops, "threads": torch.get_num_threads(),
                      "device": device, "torch": torch.__version__, **fields}), flush=True)
