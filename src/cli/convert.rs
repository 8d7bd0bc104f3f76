//! `bigroc convert`: published PyTorch checkpoints to self-describing safetensors.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use bigroc::classifier::ThreatModel;
use bigroc::convert::{self, Dataset, ResNetImport};
use bigroc::refine::Norm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// A robustness-library checkpoint ({'model': ..., 'epoch': ...}, `module.model.` keys).
    Robustness,
    /// A plain torchvision ResNet state dict.
    Torchvision,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Which codebase wrote the checkpoint.
    #[arg(long = "from", value_enum)]
    source: Source,
    /// The PyTorch checkpoint (.pt/.pth, torch.save zip format).
    checkpoint: PathBuf,
    /// Architecture: resnet18, resnet34, resnet50, resnet101 or resnet152.
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// The dataset the classifier was trained on (sets the layout, classes and input size).
    #[arg(long, value_enum)]
    dataset: Option<Dataset>,
    /// The attack it was trained against, e.g. l2:0.5 or linf:0.0314 (pixels in [0,1]); recorded
    /// in the metadata and used as the default refine eps.
    #[arg(long, value_parser = parse_threat_model)]
    threat_model: Option<ThreatModel>,
    /// The refine eps (pixels in [0,1]) to use when `refine` gets no --eps.
    #[arg(long)]
    default_eps: Option<f64>,
    #[arg(long)]
    output: PathBuf,
}

fn parse_threat_model(s: &str) -> Result<ThreatModel, String> {
    let (norm, eps) = s.split_once(':').ok_or_else(|| format!("`{s}`: expected l2:EPS or linf:EPS"))?;
    let norm = Norm::from_str(norm, true).map_err(|_| format!("`{norm}`: expected l2 or linf"))?;
    let eps = eps.parse::<f64>().map_err(|_| format!("`{eps}`: not a number"))?;
    Ok(ThreatModel { norm, eps })
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let depth: usize = a
        .arch
        .strip_prefix("resnet")
        .and_then(|d| d.parse().ok())
        .with_context(|| format!("--arch {}: expected resnet18, resnet34, resnet50, resnet101 or resnet152", a.arch))?;
    let dataset = match (a.source, a.dataset) {
        (_, Some(d)) => d,
        (Source::Torchvision, None) => Dataset::Imagenet,
        (Source::Robustness, None) => bail!("--dataset is required for robustness checkpoints (cifar10 or imagenet)"),
    };
    let import = ResNetImport {
        checkpoint: &a.checkpoint,
        depth,
        dataset,
        threat_model: a.threat_model,
        default_refine_eps: a.default_eps,
    };
    let (header, tensors) = match a.source {
        Source::Robustness => convert::from_robustness(&import)?,
        Source::Torchvision => convert::from_torchvision(&import)?,
    };
    bigroc::weights::save(&a.output, &header, &tensors)?;
    println!("wrote {} ({} tensors, {} {})", a.output.display(), tensors.len(), dataset.name(), a.arch);
    Ok(())
}
