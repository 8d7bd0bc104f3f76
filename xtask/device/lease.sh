#!/usr/bin/env bash
# The work of a GPU lease, run on the GPU machine from the repository's root (the device tool's
# working directory). `cargo xtask lease-pack` packs the payload into .device/lease/callN folders
# here; each device call carries one of them and begins with `install`.
#
#   bash xtask/device/lease.sh install            keep what this call carried; say what is missing
#   bash xtask/device/lease.sh train MINUTES [diffusion] [vanilla] [robust]
#                                                  train (all three at once by default) for MINUTES,
#                                                  resuming a run this machine began, else starting
#                                                  from weights/NAME.safetensors if the repo has it
#   bash xtask/device/lease.sh table [NUM [FLAGS]] the sampling table (9 rows of NUM samples, 5000 by
#                                                  default; FLAGS go to `xtask guidance-table`),
#                                                  resumable; train-split statistics first
#   bash xtask/device/lease.sh check              the crate's own CUDA kernels against candle ops, once
#                                                  per machine (train and table run it first); if it
#                                                  fails, they go on with BIGROC_CUDA_KERNELS=off
#   bash xtask/device/lease.sh bench              one diffusion training step (batch 128) with the
#                                                  crate's kernels, without its convolutions
#                                                  (BIGROC_CUDA_KERNELS=no-conv) and with none (off),
#                                                  twice each: bench.jsonl (about 90 s)
#   bash xtask/device/lease.sh status
#
# Everything lasting lives in $BIGROC_LEASE_STORE (default ~/bigroc-lease), outside the repository
# copy, which each call replaces: it lasts while the machine stays warm (30 s after a call). What a
# call should bring back goes to $OUT (at most 8 files): the weights, one tar of logs and metrics,
# one tar of the table.
set -euo pipefail

store=${BIGROC_LEASE_STORE:-$HOME/bigroc-lease}
out=${OUT:-$store/out}
# For a trial on a machine without a GPU: BIGROC_LEASE_DEVICE=cpu, BIGROC=target/release/bigroc,
# XTASK=target/debug/xtask.
device=${BIGROC_LEASE_DEVICE:-cuda}
mkdir -p "$store/data" "$store/runs" "$out"

# The training commands of the sampling defaults (written into weights/manifest.json with the
# figures): the small CIFAR-10 ADM UNet (64 channels, learned sigma), and the paper's CIFAR-10
# time-dependent classifier (width 32) plain and with its early-stopping L2 PGD (eps 0.5, 7 steps).
# The learning rate and EMA rate suit runs of thousands, not hundreds of thousands, of iterations.
common="--device $device --tf32 --half"
diffusion_flags="--lr 2e-4 --ema-rate 0.9995 --batch-size 128 --checkpoint-every 1000 --log-every 100"
vanilla_flags="--iterations 6000 --batch-size 128 --checkpoint-every 500 --log-every 100"
robust_flags="--adversarial --iterations 3000 --batch-size 128 --checkpoint-every 500 --log-every 50"

bigroc_cmd=${BIGROC:-$store/run-on-gpu.sh bigroc}
# shellcheck disable=SC2086
bigroc() { $bigroc_cmd "$@"; }
xtask=${XTASK:-$store/xtask}

# The newest weights of NAME: this machine's run, else the repository's.
weights_of() {
    if [ -f "$store/runs/$1.safetensors" ]; then echo "$store/runs/$1.safetensors"; else echo "weights/$1.safetensors"; fi
}

# Decompresses $1 into $2 (through $2.tmp): xz, or Python's lzma on a machine without xz.
unxz_to() {
    if command -v xz >/dev/null 2>&1; then
        xz -dc "$1" > "$2.tmp"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1" > "$2.tmp"
    fi && mv "$2.tmp" "$2"
}

install() {
    local got=0 f
    for f in .device/lease/call*/*; do
        [ -e "$f" ] || continue
        got=1
        case "$f" in
            *.tar.xz) unxz_to "$f" "$store/data/$(basename "$f" .xz)" ;;
            *xtask.xz) unxz_to "$f" "$store/xtask" && chmod +x "$store/xtask" ;;
            *) cp "$f" "$store/" ;;
        esac
    done
    [ "$got" = 1 ] || echo "install: this call carried no .device/lease/callN folder"
    if [ ! -f "$store/inception.pt" ] && [ -f "$store/inception.sha256" ]; then
        cat "$store"/inception.pt.part* > "$store/inception.pt.tmp"
        if [ "$(sha256sum "$store/inception.pt.tmp" | cut -d' ' -f1)" = "$(cat "$store/inception.sha256")" ]; then
            mv "$store/inception.pt.tmp" "$store/inception.pt" && rm -f "$store"/inception.pt.part*
        else
            rm -f "$store/inception.pt.tmp"
            echo "install: the Inception's parts here ($(ls "$store" | grep -c 'inception.pt.part' || true)) do not join into it yet"
        fi
    fi
    status
}

status() {
    local f
    for f in run-on-gpu.sh bigroc-cuda.xz cuda_kernels_check-cuda.xz diffusion_train_step-cuda.xz xtask data/train.tar data/test.tar inception.pt; do
        if [ -e "$store/$f" ]; then echo "have    $f"; else echo "MISSING $f"; fi
    done
    ls "$store/runs" 2>/dev/null | sed 's/^/run     /'
    nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null || true
}

# Starts one trainer in the background: resume, else warm-start from the repo's weights, else fresh.
start_trainer() {
    local name=$1 minutes=$2 kind flags start file
    case "$name" in
        diffusion) kind=diffusion; flags=$diffusion_flags; file=diffusion-cifar10 ;;
        vanilla) kind=timed-classifier; flags="$vanilla_flags --test $store/data/test.tar"; file=time-classifier-cifar10-vanilla ;;
        robust) kind=timed-classifier; flags="$robust_flags --test $store/data/test.tar"; file=time-classifier-cifar10-robust ;;
        *) echo "train: no trainer named $name (diffusion, vanilla, robust)" >&2; return 2 ;;
    esac
    local output="$store/runs/$file.safetensors"
    if [ -d "$output.train" ]; then
        start="--resume"
    elif [ -f "weights/$file.safetensors" ]; then
        start="--init-from weights/$file.safetensors"
    else
        start=""
    fi
    echo "train $name: ${start:-from a fresh initialization}"
    # shellcheck disable=SC2086
    bigroc train $kind --data "$store/data/train.tar" --output "$output" $flags $common $start \
        --stop-after-minutes "$minutes" > "$store/runs/$name.log" 2>&1 &
}

# The kernel check, once per machine: a failure is reported and turns the failing kinds of the
# crate's kernels off for every later bigroc run here (candle's own kernels then do the same
# arithmetic, slower).
check() {
    if [ "$device" != cuda ]; then return 0; fi
    if [ ! -f "$store/kernels.ok" ] && [ ! -f "$store/kernels.off" ]; then
        if "$store/run-on-gpu.sh" cuda_kernels_check > "$store/kernels-check.log" 2>&1; then
            touch "$store/kernels.ok"
        else
            touch "$store/kernels.off"
        fi
        tail -n 5 "$store/kernels-check.log"
        cp "$store/kernels-check.log" "$out/"
    fi
    if [ -f "$store/kernels.off" ]; then
        # The check's last line names the kinds that failed (BIGROC_CUDA_KERNELS=no-conv,...); any
        # other failure (a crash) turns them all off.
        local setting
        setting=$(grep -o '^BIGROC_CUDA_KERNELS=[a-z,-]*$' "$store/kernels-check.log" | tail -n 1 | cut -d= -f2 || true)
        export BIGROC_CUDA_KERNELS=${setting:-off}
        echo "check: the crate's CUDA kernels FAILED their check ($store/kernels-check.log); running with BIGROC_CUDA_KERNELS=$BIGROC_CUDA_KERNELS"
    fi
}

train() {
    local minutes=$1 name pids=() failed=0
    shift
    check
    [ $# -gt 0 ] || set -- diffusion vanilla robust
    for name in "$@"; do
        start_trainer "$name" "$minutes"
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    for name in "$@"; do tail -n 3 "$store/runs/$name.log"; done
    cp "$store"/runs/*.safetensors "$out/" 2>/dev/null || true
    tar -C "$store/runs" -cf "$out/train-logs.tar" --exclude '*.safetensors' --exclude 'checkpoint*' \
        $(cd "$store/runs" && ls *.log *.train/metrics.jsonl 2>/dev/null)
    ls -la "$out"
    return "$failed"
}

bench() {
    check
    local round kernels
    for round in 1 2; do
        for kernels in on no-conv off; do
            echo "{\"round\": $round, \"kernels\": \"$kernels\", \"step\": $(BIGROC_CUDA_KERNELS=$kernels "$store/run-on-gpu.sh" diffusion_train_step 128 5 "$device")}"
        done
    done | tee "$out/bench.jsonl"
}

table() {
    local num=${1:-5000}
    shift || true
    check
    if [ ! -f "$store/train-stats.npz" ]; then
        bigroc stats --input "$store/data/train.tar" --output "$store/train-stats.npz" \
            --inception "$store/inception.pt" --device "$device" --batch-size 250
    fi
    local status=0 carry=()
    # Rows an earlier lease finished with the same weights, committed to the repository.
    if [ -d "docs/guidance-table-$num" ]; then carry=(--carry-rows "docs/guidance-table-$num"); fi
    "$xtask" guidance-table --bigroc "$bigroc_cmd" --device "$device" ${carry[@]+"${carry[@]}"} \
        --model "$(weights_of diffusion-cifar10)" \
        --vanilla "$(weights_of time-classifier-cifar10-vanilla)" \
        --robust "$(weights_of time-classifier-cifar10-robust)" \
        --reference "$store/train-stats.npz" --inception "$store/inception.pt" \
        --out "$store/table-$num" --num "$num" "$@" || status=$?
    tar -C "$store" -cf "$out/table-$num.tar" --exclude '*.npz' "table-$num"
    cat "$store/table-$num/table.md" 2>/dev/null || true
    return "$status"
}

cmd=${1:-status}
shift || true
case "$cmd" in
    install) install ;;
    status) status ;;
    check) check ;;
    bench) bench ;;
    train) [ $# -ge 1 ] || { echo "usage: lease.sh train MINUTES [diffusion] [vanilla] [robust]" >&2; exit 2; }; train "$@" ;;
    table) table "$@" ;;
    *) echo "lease.sh: unknown command $cmd (install, check, bench, train, table, status)" >&2; exit 2 ;;
esac
