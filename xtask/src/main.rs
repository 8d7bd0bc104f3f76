//! Developer tasks: `cargo xtask <task>`.
//!
//! - `venv`: create `.venv` with the pinned PyTorch reference packages (xtask/reference/).
//! - `fixtures [--full DIR]`: regenerate the committed parity fixtures from the reference packages
//!   (and, with --full, the full-size random-weight checkpoints that are never committed).
//! - `static`: build the `bigroc` binary statically linked (glibc, crt-static).
//! - `bench`: run each workload in bigroc and in the PyTorch reference, print one table of
//!   throughputs and ratios.
//! - `cuda-build [--toolkit DIR] [--out DIR]`: build `--features cuda` without a GPU (nvcc from
//!   PATH, $CUDA_HOME, or NVIDIA's pip wheels installed into DIR) and pack it, xz-compressed, with a
//!   `run-on-gpu.sh` wrapper for a GPU machine without a Rust toolchain.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod cuda;

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
    /// Time the workloads in bigroc and in the PyTorch reference side by side.
    Bench {
        /// Repetitions per workload (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Threads for PyTorch (default: all cores, as bigroc uses).
        #[arg(long)]
        threads: Option<usize>,
        /// Only workloads whose name contains this.
        #[arg(long)]
        only: Option<String>,
        /// bigroc's device (cpu, cuda).
        #[arg(long, default_value = "cpu")]
        device: String,
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
        Task::Bench { reps, threads, only, device } => bench(&root, reps, threads, only, &device)?,
        Task::Static { features } => {
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--release", "-p", "bigroc", "--target", "x86_64-unknown-linux-gnu"])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(&root);
            if let Some(f) = features {
                cmd.args(["--features", &f]);
            }
            run(&mut cmd)?;
        }
        Task::CudaBuild { compute_cap, out, toolkit, examples, benches } => {
            let default_out = out.is_none();
            let out = out.unwrap_or_else(|| root.join(".device"));
            if default_out {
                exclude_from_git(&root, "/.device/")?;
            }
            cuda::cuda_build(&root, cuda::Options { compute_cap, out, toolkit, examples, benches })?;
        }
    }
    Ok(())
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

/// Runs the reference script (which also writes the shared random weights), then bigroc on the same
/// weights and shapes, and prints one table.
fn bench(root: &Path, reps: usize, threads: Option<usize>, only: Option<String>, device: &str) -> Result<()> {
    let out = root.join("target/bench");
    let python = match python() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("the PyTorch reference is not available ({e}); nothing to compare against");
            return Ok(());
        }
    };
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("xtask/reference/bench_refine.py"))
        .arg("--out")
        .arg(&out)
        .args(["--threads", &threads.to_string(), "--reps", &reps.to_string()]);
    if let Some(o) = &only {
        cmd.args(["--only", o]);
    }
    eprintln!("+ {cmd:?}");
    let reference = cmd.output().context("running the reference benchmark")?;
    if !reference.status.success() {
        bail!("reference benchmark failed: {}", String::from_utf8_lossy(&reference.stderr));
    }
    let mut rows = Vec::new();
    let mut torch_version = String::from("?");
    for line in String::from_utf8_lossy(&reference.stdout).lines() {
        let r: serde_json::Value = serde_json::from_str(line).with_context(|| format!("bad reference output: {line}"))?;
        torch_version = r["torch"].as_str().unwrap_or("?").to_string();
        let name = r["workload"].as_str().unwrap_or_default().trim_start_matches("refine-").to_string();
        let (batch, size) = (r["batch"].as_u64().unwrap_or(1), r["size"].as_u64().unwrap_or(32));
        let ours = Command::new(env!("CARGO"))
            .args(["run", "--quiet", "--release", "-p", "bigroc", "--example", "refine_throughput", "--"])
            .arg(out.join(format!("{name}.safetensors")))
            .args([batch.to_string(), size.to_string(), reps.to_string(), device.to_string()])
            .current_dir(root)
            .output()
            .context("running bigroc's side")?;
        if !ours.status.success() {
            bail!("bigroc benchmark failed: {}", String::from_utf8_lossy(&ours.stderr));
        }
        let o: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&ours.stdout).trim())?;
        let (theirs_ips, ours_ips) = (r["img_per_s"].as_f64().unwrap_or(0.0), o["img_per_s"].as_f64().unwrap_or(0.0));
        rows.push(format!(
            "| refine {name} (batch {batch}, {size}x{size}, 7 L2 steps) | {theirs_ips:.2} | {ours_ips:.2} | {:.2} |",
            ours_ips / theirs_ips.max(1e-12)
        ));
    }
    println!("| workload | PyTorch {torch_version} img/s ({threads} threads) | bigroc img/s ({device}) | bigroc / PyTorch |");
    println!("| --- | --- | --- | --- |");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
