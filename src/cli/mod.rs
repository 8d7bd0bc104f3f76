//! The `bigroc` command line: one file per subcommand, each only parsing flags and calling the
//! library.

mod calibrate;
mod convert;
mod convert_adm;
mod merge;
mod refine;
mod sample;

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
    /// Sample images from a diffusion model with (robust) classifier guidance.
    Sample(sample::SampleArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Refine(args) => refine::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Sample(args) => sample::run(args),
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
