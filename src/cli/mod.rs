//! The `bigroc` command line: one file per subcommand, each only parsing flags and calling the
//! library.

mod accuracy;
mod calibrate;
mod convert;
mod convert_adm;
mod eval;
mod merge;
mod refine;
mod sample;
mod stats;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bigroc", version, about = "Image synthesis driven by adversarially robust classifiers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Refine generated images with a robust classifier (BIGRoC).
    Refine(refine::RefineArgs),
    /// Compute BIGRoC's debiasing vector d = 1 - mean logits over a generated set.
    Calibrate(calibrate::CalibrateArgs),
    /// Convert a published PyTorch checkpoint into a self-describing safetensors file.
    // A repeated flag takes its last value, as with the original scripts' argparse.
    #[command(args_override_self = true)]
    Convert(convert::ConvertArgs),
    /// Join .npz shards written with --shard into one file, in input order.
    Merge(merge::MergeArgs),
    /// Compute and cache reference statistics (mu, sigma, Inception features) of an image set.
    Stats(stats::StatsArgs),
    /// FID, precision/recall and Inception Score of samples against a reference.
    Eval(eval::EvalArgs),
    /// Sample images from a diffusion model with (robust) classifier guidance.
    Sample(sample::SampleArgs),
    /// Train this project's models (robust classifiers).
    Train(train::TrainArgs),
    /// Clean and adversarial (PGD) accuracy of a classifier on labelled images.
    Accuracy(accuracy::AccuracyArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Refine(args) => refine::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Train(args) => train::run(args),
        Command::Accuracy(args) => accuracy::run(args),
    }
}

/// Parses `N` or `HxW` (e.g. `--resize 32`, `--resize 128x96`) as (height, width).
pub(crate) fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| n > 0);
    match s.split_once(['x', 'X']) {
        Some((h, w)) => parse(h).zip(parse(w)).ok_or_else(|| format!("`{s}`: expected N or HxW")),
        None => parse(s).map(|n| (n, n)).ok_or_else(|| format!("`{s}`: expected N or HxW")),
    }
}


/// Progress of a feature extraction: the shared image bar (images/s) on a terminal, else (CI,
/// logs, nohup) a log line every 10% with the rate.
pub(crate) struct Progress {
    bar: indicatif::ProgressBar,
    what: String,
    start: std::time::Instant,
    next_log: usize,
}

impl Progress {
    pub(crate) fn new(what: &str) -> Self {
        Progress {
            bar: bigroc::progress::images(0, 0, what),
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
            tracing::info!("{}: {done}/{total} images, {:.2} img/s", self.what, done as f64 / secs.max(1e-9));
            self.next_log = done + total.div_ceil(10).max(1);
        }
    }

    pub(crate) fn finish(self) {
        self.bar.finish_and_clear();
    }
}

