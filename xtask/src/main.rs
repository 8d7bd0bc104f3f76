//! Developer tasks: `cargo xtask <task>`.
//!
//! - `venv`: create `.venv` with the pinned PyTorch reference packages (xtask/reference/).
//! - `fixtures [--full DIR]`: regenerate the committed parity fixtures from the reference packages
//!   (and, with --full, the full-size random-weight checkpoints that are never committed).
//! - `static`: build the `bigroc` binary statically linked (glibc, crt-static).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
    /// Build a statically linked release binary (target/x86_64-unknown-linux-gnu/release/bigroc).
    Static {
        /// Extra cargo features, e.g. cuda.
        #[arg(long)]
        features: Option<String>,
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
    }
    Ok(())
}
