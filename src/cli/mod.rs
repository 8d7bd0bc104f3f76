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


/// The Inception network flags `stats` and `eval` share.
#[derive(Debug, clap::Args)]
pub(crate) struct InceptionArgs {
    /// Inception weights (TorchScript inception-2015-12-05.pt or pytorch-fid's .pth);
    /// default $BIGROC_INCEPTION.
    #[arg(long)]
    pub inception: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl InceptionArgs {
    /// The network, loaded on first use (a stats file needs none).
    pub(crate) fn network(&self) -> Result<bigroc::eval::pipeline::LazyInception> {
        Ok(bigroc::eval::pipeline::LazyInception::new(self.inception.clone(), bigroc::device::parse_device(&self.device)?))
    }

    pub(crate) fn batch(&self) -> usize {
        self.batch_size.max(1)
    }
}
