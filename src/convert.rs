//! Importing published classifier checkpoints into self-describing bigroc weights files.
//!
//! The robustness library saves `{'model': state_dict, 'optimizer': ..., 'epoch': ...}` from a
//! `DataParallel(AttackerModel)`, so every network weight appears twice (`module.model.*` and
//! `module.attacker.model.*`) next to the input normalizer (`module.normalizer.new_mean/new_std`).
//! We keep the network's own key names, move the normalizer into the config, and check the
//! result against the native model: missing, mis-shaped and unknown keys are errors naming the key.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bigroc_models::resnet::{Layout, ResNetConfig};
use candle_core::{DType, Device, Tensor};

use crate::classifier::{Classifier, ClassifierInfo, ThreatModel};
use crate::weights::{self, pytorch, Checkpoint};

/// The datasets whose published robust classifiers we import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    Cifar10,
    Imagenet,
}

impl Dataset {
    pub fn layout(self) -> Layout {
        match self {
            Self::Cifar10 => Layout::Cifar,
            Self::Imagenet => Layout::Imagenet,
        }
    }

    pub fn class_names(self) -> Vec<String> {
        let list = match self {
            Self::Cifar10 => "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n",
            Self::Imagenet => include_str!("classes_imagenet.txt"),
        };
        list.lines().map(str::to_string).collect()
    }

    pub fn image_size(self) -> usize {
        match self {
            Self::Cifar10 => 32,
            Self::Imagenet => 224,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cifar10 => "cifar10",
            Self::Imagenet => "imagenet",
        }
    }
}

/// What to import.
pub struct ResNetImport<'a> {
    pub checkpoint: &'a Path,
    /// ResNet depth: 18, 34, 50, 101 or 152.
    pub depth: usize,
    pub dataset: Dataset,
    pub threat_model: Option<ThreatModel>,
    pub default_refine_eps: Option<f64>,
}

/// Reads a robustness-library checkpoint and returns the converted weights file contents.
pub fn from_robustness(import: &ResNetImport) -> Result<(weights::Header, HashMap<String, Tensor>)> {
    let path = import.checkpoint;
    let raw = match pytorch::read_state_dict(path, Some("model")) {
        Ok(t) => t,
        // Some re-saved checkpoints hold the state dict at the top level.
        Err(_) => pytorch::read_state_dict(path, None)
            .with_context(|| format!("{}: neither a robustness checkpoint ({{'model': ...}}) nor a state dict", path.display()))?,
    };
    let mut tensors = HashMap::new();
    let (mut mean, mut std) = (None, None);
    for (key, t) in raw {
        let key = key.strip_prefix("module.").unwrap_or(&key).to_string();
        if let Some(k) = key.strip_prefix("model.") {
            tensors.insert(k.to_string(), t);
        } else if key.starts_with("attacker.") {
            continue; // the attacker wraps the same network and normalizer again
        } else if key == "normalizer.new_mean" {
            mean = Some(vec3(&t, path, &key)?);
        } else if key == "normalizer.new_std" {
            std = Some(vec3(&t, path, &key)?);
        } else {
            bail!("{}: unexpected key `{key}` for a robustness checkpoint", path.display());
        }
    }
    if tensors.is_empty() {
        bail!("{}: no `module.model.*` weights; is this a robustness-library checkpoint?", path.display());
    }
    let mean = mean.with_context(|| format!("{}: no `module.normalizer.new_mean`", path.display()))?;
    let std = std.with_context(|| format!("{}: no `module.normalizer.new_std`", path.display()))?;
    finish(import, tensors, mean, std)
}

/// Reads a plain torchvision ResNet state dict (ImageNet normalization).
pub fn from_torchvision(import: &ResNetImport) -> Result<(weights::Header, HashMap<String, Tensor>)> {
    let tensors = pytorch::read_state_dict(import.checkpoint, None)?;
    finish(import, tensors, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
}

fn finish(
    import: &ResNetImport,
    mut tensors: HashMap<String, Tensor>,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<(weights::Header, HashMap<String, Tensor>)> {
    let path = import.checkpoint;
    tensors.retain(|k, _| !k.ends_with("num_batches_tracked"));
    let head = match import.dataset.layout() {
        Layout::Cifar => "linear.weight",
        Layout::Imagenet => "fc.weight",
    };
    let num_classes = tensors
        .get(head)
        .with_context(|| format!("{}: no `{head}`; is this a {} ResNet?", path.display(), import.dataset.name()))?
        .dim(0)?;
    let mut config = match import.dataset.layout() {
        Layout::Cifar => {
            // The width multiplier shows in the stem's output channels.
            let stem = tensors.get("conv1.weight").with_context(|| format!("{}: no `conv1.weight`", path.display()))?;
            ResNetConfig::cifar(import.depth, stem.dim(0)? as f64 / 64.0, num_classes)?
        }
        Layout::Imagenet => ResNetConfig::imagenet(import.depth, num_classes)?,
    };
    config.mean = mean;
    config.std = std;
    let classes = import.dataset.class_names();
    let info = ClassifierInfo {
        classes: if classes.len() == num_classes { classes } else { Vec::new() },
        dataset: Some(import.dataset.name().to_string()),
        image_size: Some(import.dataset.image_size()),
        threat_model: import.threat_model,
        default_refine_eps: import.default_refine_eps,
        provenance: Some(format!("converted by bigroc {} from {}", env!("CARGO_PKG_VERSION"), path.display())),
    };
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    let header = Classifier::header(&config, &info);
    // Build the native model from exactly these tensors: names the key at fault if any is off.
    let check = Checkpoint { path: path.to_path_buf(), header: header.clone(), tensors: tensors.clone() };
    Classifier::from_checkpoint(&check)?;
    Ok((header, tensors))
}

fn vec3(t: &Tensor, path: &Path, key: &str) -> Result<[f32; 3]> {
    let v = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    v.try_into().map_err(|v: Vec<f32>| anyhow::anyhow!("{}: `{key}` has {} values, expected 3", path.display(), v.len()))
}
