//! The `bigroc` command line: one file per subcommand, each only parsing flags and calling the
//! library.

mod eval;
mod stats;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bigroc",
    version,
    about = "Image synthesis driven by adversarially robust classifiers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compute and cache reference statistics (mu, sigma, Inception features) of an image set.
    Stats(stats::StatsArgs),
    /// FID, precision/recall and Inception Score of samples against a reference.
    Eval(eval::EvalArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Stats(args) => stats::run(args),
        Command::Eval(args) => eval::run(args),
    }
}

/// `--device cpu|cuda|cuda:N|auto`.
pub(crate) fn parse_device(spec: &str) -> Result<candle_core::Device> {
    use candle_core::Device;
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        other => {
            let ordinal = match other.strip_prefix("cuda") {
                Some("") => 0,
                Some(n) => match n.strip_prefix(':').and_then(|n| n.parse().ok()) {
                    Some(n) => n,
                    None => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
                },
                None => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {other}: this build has no CUDA support (rebuild with `--features cuda`)");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}

/// Progress of a feature extraction: a bar with images/s on a terminal, else (CI, logs, nohup) a
/// log line every 10% with the rate.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    what: String,
    start: std::time::Instant,
    next_log: usize,
}

impl Progress {
    pub(crate) fn new(what: &str) -> Self {
        Progress {
            bar: image_bar(what),
            what: what.to_string(),
            start: std::time::Instant::now(),
            next_log: 0,
        }
    }

    pub(crate) fn update(&mut self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        if self.bar.is_hidden() && (done >= self.next_log || done == total) {
            let secs = self.start.elapsed().as_secs_f64();
            tracing::info!(
                "{}: {done}/{total} images, {:.2} img/s",
                self.what,
                done as f64 / secs.max(1e-9)
            );
            self.next_log = done + total.div_ceil(10).max(1);
        }
    }

    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// A progress bar over images with throughput, hidden when stderr is not a terminal.
fn image_bar(what: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressState, ProgressStyle};
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} images, {rate} img/s, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template")
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.2}", s.per_sec());
        })
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
