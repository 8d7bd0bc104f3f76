//! Developer tasks: `cargo xtask <task>`.
//!
//! - `venv`: create `.venv` with the pinned PyTorch reference packages (xtask/reference/).
//! - `fixtures [--full DIR]`: regenerate the committed parity fixtures from the reference packages
//!   (and, with --full, the full-size random-weight checkpoints that are never committed).
//! - `static`: build the `bigroc` binary statically linked (glibc, crt-static).
//! - `bench [--only NAME] [--reps N] [--rounds N] [--threads N] [--peak-gflops G] [--dtype D]`: run each workload
//!   of the performance issue (refine with the cifar and the imagenet ResNet-50, one guided sampling
//!   step, one adversarial training step) in the PyTorch reference and in bigroc, alternately, and print
//!   one markdown table: throughputs, their ratio, the FLOPs per unit of work (counted on the
//!   reference side) and the GFLOP/s achieved (see `bench.rs`).
//! - `cuda-build [--toolkit DIR] [--out DIR]`: build `--features cuda` without a GPU (nvcc from
//!   PATH, $CUDA_HOME, or NVIDIA's pip wheels installed into DIR) and pack it, xz-compressed, with a
//!   `run-on-gpu.sh` wrapper for a GPU machine without a Rust toolchain.
//! - `guidance-table`: the sampling issue's table (no guidance, vanilla and robust guidance at each
//!   scale; FID, precision, recall), one resumable row at a time through `bigroc sample` and `eval`.
//! - `lease-pack`: everything a GPU lease needs that is not in the repository (the CUDA build, this
//!   xtask, the CIFAR-10 tars, the FID Inception in parts), packed into one folder per device call
//!   under the call's 64 MiB limit; `xtask/device/lease.sh` runs the lease's work from them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod cuda;
mod lease;
mod table;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Create .venv with the reference packages pinned in xtask/reference/.
    Venv,
    /// Regenerate tests/fixtures from the reference implementations.
    Fixtures {
        /// Also write full-size random-weight checkpoints (hundreds of MB) into DIR.
        #[arg(long)]
        full: Option<PathBuf>,
        /// Only the scripts whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
    /// Time the workloads in bigroc and in the PyTorch reference side by side, with FLOP counts.
    Bench {
        /// Timed repetitions per workload and side, after one warm-up (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Rounds per workload: PyTorch, then bigroc, repeated, each run a fresh process with its own
        /// warm-up; each side reports the median over the rounds and the ratio is the median of the
        /// rounds' ratios (on a shared machine whose speed drifts, alternating keeps the comparison fair).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Threads for both sides (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Only workloads whose name contains this (refine-cifar50, refine-imagenet50, guided-step,
        /// train-step).
        #[arg(long)]
        only: Option<String>,
        /// Device of both sides (cpu, cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Peak f32 GFLOP/s the achieved rates are compared with [default on cpu: 157, i.e. 2 cores
        /// x 2.45 GHz x 32 FLOP/cycle with AVX2 FMA].
        #[arg(long)]
        peak_gflops: Option<f64>,
        /// Compute dtype of the guided-step row's networks (f32, f16 as guided-diffusion's use_fp16,
        /// bf16 on bigroc's side only); the other rows are f32.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Build a statically linked release binary (target/x86_64-unknown-linux-gnu/release/bigroc).
    Static {
        /// Extra cargo features, e.g. cuda.
        #[arg(long)]
        features: Option<String>,
    },
    /// Build the CUDA binary without a GPU and pack it (xz) with a run-on-gpu.sh wrapper.
    CudaBuild {
        /// Compute capability to compile the kernels for (H100: 90; A100: 80).
        #[arg(long, default_value = "90")]
        compute_cap: String,
        /// Where the packed binaries and run-on-gpu.sh go [default: .device/ in the repo root].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use the CUDA toolkit of NVIDIA's pip wheels in DIR, installing them there first if absent
        /// (otherwise nvcc is looked for on PATH, in $CUDA_HOME and in /usr/local/cuda).
        #[arg(long, value_name = "DIR")]
        toolkit: Option<PathBuf>,
        /// Also build and pack this example (repeatable), e.g. refine_throughput.
        #[arg(long = "example", value_name = "NAME")]
        examples: Vec<String>,
        /// Also build and pack this bench (repeatable), e.g. guided_step.
        #[arg(long = "bench", value_name = "NAME")]
        benches: Vec<String>,
        /// Convolutions through cuDNN (feature `cudnn`; needs cuDNN 9 on the GPU machine, which
        /// PyTorch's CUDA wheels bring).
        #[arg(long)]
        cudnn: bool,
    },
    /// FID and precision/recall of one diffusion model unguided and guided by a vanilla and a robust
    /// time-dependent classifier at each scale, on the same seeds; resumable row by row.
    GuidanceTable(table::Options),
    /// Pack a GPU lease's payload into .device/lease/callN folders (see xtask/device/lease.sh).
    LeasePack {
        /// As `cuda-build --toolkit`.
        #[arg(long, value_name = "DIR")]
        toolkit: Option<PathBuf>,
        /// Reuse the CUDA build already in .device/lease/build instead of building again.
        #[arg(long)]
        no_build: bool,
        /// The folder with data/cifar10/*.tar and models/inception-2015-12-05.pt.
        #[arg(long, default_value = "../shared")]
        shared: PathBuf,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// The reference Python: $BIGROC_PYTHON, else .venv/bin/python.
fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BIGROC_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = root().join(".venv/bin/python");
    if !venv.is_file() {
        bail!("no reference environment: run `cargo xtask venv` first (or set BIGROC_PYTHON)");
    }
    Ok(venv)
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let root = root();
    match Cli::parse().task {
        Task::Venv => {
            let venv = root.join(".venv");
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            let pip = venv.join("bin/pip");
            let reference = root.join("xtask/reference");
            run(Command::new(&pip).args(["install", "-r"]).arg(reference.join("requirements.txt")))?;
            run(Command::new(&pip).args(["install", "--no-deps", "-r"]).arg(reference.join("nodeps.txt")))?;
        }
        Task::Fixtures { full, only } => {
            let python = python()?;
            let mut scripts: Vec<PathBuf> = std::fs::read_dir(root.join("xtask/reference"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with("_fixtures.py"))
                .filter(|p| only.as_ref().is_none_or(|o| p.to_string_lossy().contains(o.as_str())))
                .collect();
            scripts.sort();
            for script in scripts {
                let mut cmd = Command::new(&python);
                cmd.arg(&script).current_dir(&root);
                if let Some(dir) = &full {
                    std::fs::create_dir_all(dir)?;
                    cmd.arg("--full").arg(dir);
                }
                run(&mut cmd)?;
            }
        }
        Task::Bench { reps, rounds, threads, only, device, peak_gflops, dtype } => {
            bench::bench(&root, bench::Options { reps, rounds, threads, only, device, peak_gflops, dtype })?
        }
        Task::Static { features } => {
            let mut cmd = cargo();
            cmd.args(["build", "--release", "-p", "bigroc", "--target", "x86_64-unknown-linux-gnu"])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(&root);
            if let Some(f) = features {
                cmd.args(["--features", &f]);
            }
            run(&mut cmd)?;
        }
        Task::CudaBuild { compute_cap, out, toolkit, examples, benches, cudnn } => {
            let default_out = out.is_none();
            let out = out.unwrap_or_else(|| root.join(".device"));
            if default_out {
                exclude_from_git(&root, "/.device/")?;
            }
            cuda::cuda_build(&root, cuda::Options { compute_cap, out, toolkit, examples, benches, cudnn })?;
        }
        Task::GuidanceTable(options) => table::guidance_table(&options)?,
        Task::LeasePack { toolkit, no_build, shared } => {
            exclude_from_git(&root, "/.device/")?;
            let shared = if shared.is_absolute() { shared } else { root.join(shared) };
            lease::pack(&root, &shared, toolkit, !no_build)?
        }
    }
    Ok(())
}

/// Writes `path` through a temporary beside it, so a reader never sees half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// `xz PRESET -T0` of `source` into `target` (through a temporary beside it), unless `target` is
/// already newer than `source`.
pub(crate) fn xz_into(source: &Path, target: &Path, preset: &str) -> Result<()> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if !source.is_file() {
        bail!("{}: no such file", source.display());
    }
    if let (Some(s), Some(t)) = (modified(source), modified(target)) {
        if t >= s {
            return Ok(());
        }
    }
    let tmp = target.with_extension("partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    run(Command::new("xz").args([preset, "-T0", "-c"]).arg(source).stdout(file)).context("xz (xz-utils) is needed to pack")?;
    std::fs::rename(&tmp, target).with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))
}

/// A cargo command without the package variables `cargo run` gave this process (CARGO_PKG_NAME
/// and the like): build scripts that declare `rerun-if-env-changed` on them (ring's does) would
/// otherwise rebuild now, and again at the next plain cargo command (about 12 minutes on 2 cores).
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

/// Adds `pattern` to the repository's local exclude file (.git/info/exclude, shared by worktrees),
/// so packed binaries are never committed by accident; .gitignore stays as it is.
fn exclude_from_git(root: &Path, pattern: &str) -> Result<()> {
    let out = Command::new("git").args(["rev-parse", "--git-common-dir"]).current_dir(root).output();
    let Some(common) = out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else {
        return Ok(()); // not a git checkout
    };
    let exclude = root.join(common).join("info/exclude");
    let current = std::fs::read_to_string(&exclude).unwrap_or_default();
    if !current.lines().any(|l| l.trim() == pattern) {
        std::fs::create_dir_all(exclude.parent().expect("info/"))?;
        let sep = if current.is_empty() || current.ends_with('\n') { "" } else { "\n" };
        std::fs::write(&exclude, format!("{current}{sep}{pattern}\n"))?;
        eprintln!("added {pattern} to {}", exclude.display());
    }
    Ok(())
}
