//! ADM weights files: the diffusion UNet (`kind` [`UNET_KIND`], its config holding the network
//! and the diffusion it was trained with) and the time-dependent classifier ([`CLASSIFIER_KIND`]),
//! as self-describing bigroc safetensors; and their import from guided-diffusion /
//! improved-diffusion checkpoints (plain `torch.save(model.state_dict())` files), keeping the
//! original key names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use bigroc_models::adm::{EncoderUNetConfig, EncoderUNetModel, UNetConfig, UNetModel};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::diffusion::DiffusionConfig;
use crate::weights::{pytorch, Checkpoint, Header};

/// `kind` of diffusion UNet weights files.
pub const UNET_KIND: &str = "adm-unet";
/// `kind` of time-dependent classifier weights files.
pub const CLASSIFIER_KIND: &str = "adm-classifier";

/// The `config` of a diffusion UNet weights file: the network, and the diffusion process it was
/// trained for (steps, schedule, learned sigma, timestep rescaling; the respacing is chosen at
/// sampling time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetFileConfig {
    pub model: UNetConfig,
    pub diffusion: DiffusionConfig,
}

/// The `info` of ADM weights files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdmInfo {
    /// Class names in index order (empty when unknown).
    #[serde(default)]
    pub classes: Vec<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    /// The bigroc preset the configuration came from, if any.
    #[serde(default)]
    pub preset: Option<String>,
    /// For classifiers: how it was trained (`robust`, `vanilla`), when known.
    #[serde(default)]
    pub training: Option<String>,
    /// The original script flags the network was built with.
    #[serde(default)]
    pub flags: serde_json::Value,
    #[serde(default)]
    pub provenance: Option<String>,
}

fn read_info(ck: &Checkpoint) -> Result<AdmInfo> {
    if ck.header.info.is_null() {
        return Ok(AdmInfo::default());
    }
    serde_json::from_value(ck.header.info.clone())
        .map_err(|e| anyhow::anyhow!("{}: invalid `info` in the metadata: {e}", ck.path.display()))
}

fn check_classes(ck: &Checkpoint, info: &AdmInfo, n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        if !info.classes.is_empty() && info.classes.len() != n {
            bail!("{}: {} class names for {n} classes", ck.path.display(), info.classes.len());
        }
    }
    Ok(())
}

/// A diffusion UNet with the diffusion it was trained for.
pub struct DiffusionModel {
    pub unet: UNetModel,
    pub diffusion: DiffusionConfig,
    pub info: AdmInfo,
    /// The weights file, for messages.
    pub source: String,
}

impl DiffusionModel {
    /// Loads a weights file (local path or `hf://...`); `dtype` is the torso's compute dtype.
    pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(spec, device)?, dtype)
    }

    pub fn from_checkpoint(ck: &Checkpoint, dtype: DType) -> Result<Self> {
        ck.expect_kind(UNET_KIND)?;
        let config: UNetFileConfig = ck.config()?;
        let info = read_info(ck)?;
        let (vb, usage) = ck.var_builder(dtype);
        let unet = UNetModel::new(&config.model, vb)?;
        usage.finish(|_| false)?;
        check_classes(ck, &info, config.model.num_classes)?;
        Ok(Self {
            unet,
            diffusion: config.diffusion,
            info,
            source: ck.path.display().to_string(),
        })
    }

    pub fn header(config: &UNetFileConfig, info: &AdmInfo) -> Header {
        Header {
            kind: UNET_KIND.to_string(),
            config: serde_json::to_value(config).expect("config serializes"),
            info: serde_json::to_value(info).expect("info serializes"),
        }
    }

    pub fn config(&self) -> &UNetConfig {
        self.unet.config()
    }

    /// Classes of a class-conditional model.
    pub fn num_classes(&self) -> Option<usize> {
        self.config().num_classes
    }
}

/// A time-dependent classifier p(y | x_t, t).
pub struct TimeClassifier {
    pub model: EncoderUNetModel,
    pub info: AdmInfo,
    pub source: String,
}

impl TimeClassifier {
    pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(spec, device)?, dtype)
    }

    pub fn from_checkpoint(ck: &Checkpoint, dtype: DType) -> Result<Self> {
        ck.expect_kind(CLASSIFIER_KIND)?;
        let config: EncoderUNetConfig = ck.config()?;
        let info = read_info(ck)?;
        let (vb, usage) = ck.var_builder(dtype);
        let model = EncoderUNetModel::new(&config, vb)?;
        usage.finish(|_| false)?;
        check_classes(ck, &info, Some(config.out_channels))?;
        Ok(Self {
            model,
            info,
            source: ck.path.display().to_string(),
        })
    }

    pub fn header(config: &EncoderUNetConfig, info: &AdmInfo) -> Header {
        Header {
            kind: CLASSIFIER_KIND.to_string(),
            config: serde_json::to_value(config).expect("config serializes"),
            info: serde_json::to_value(info).expect("info serializes"),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.model.config().out_channels
    }
}

/// The state dict of a guided-diffusion checkpoint as f32 tensors (a `module.` prefix, left by
/// data-parallel training, is dropped).
fn read_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>> {
    let raw = pytorch::read_state_dict(path, None)?;
    raw.into_iter()
        .map(|(k, t)| {
            let k = k.strip_prefix("module.").unwrap_or(&k).to_string();
            Ok((k, t.to_dtype(DType::F32)?))
        })
        .collect()
}

/// The remedy for the most common mismatch, the class count (the scripts hard-code 1000).
fn check_label_emb(path: &Path, tensors: &HashMap<String, Tensor>, model: &UNetConfig) -> Result<()> {
    match (tensors.get("label_emb.weight"), model.num_classes) {
        (Some(t), Some(n)) if t.dim(0)? != n => bail!(
            "{}: key `label_emb.weight` holds {} classes, the configuration {n} (pass --num_classes {})",
            path.display(),
            t.dim(0)?,
            t.dim(0)?
        ),
        (Some(_), None) => bail!(
            "{}: key `label_emb.weight` is present but the configuration is unconditional (pass --class_cond True)",
            path.display()
        ),
        (None, Some(_)) => bail!(
            "{}: key `label_emb.weight` is missing but the configuration is class-conditional (pass --class_cond False)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Reads a guided-diffusion (or improved-diffusion) UNet checkpoint and returns the converted
/// weights file contents, checked against the native model: missing, mis-shaped and unknown keys
/// are errors naming the key.
pub fn import_unet(
    checkpoint: &Path,
    config: &UNetFileConfig,
    info: AdmInfo,
) -> Result<(Header, HashMap<String, Tensor>)> {
    let tensors = read_checkpoint(checkpoint)?;
    check_label_emb(checkpoint, &tensors, &config.model)?;
    let header = DiffusionModel::header(config, &info);
    let ck = Checkpoint {
        path: checkpoint.to_path_buf(),
        header: header.clone(),
        tensors,
    };
    DiffusionModel::from_checkpoint(&ck, DType::F32)
        .with_context(|| format!("{} does not fit the configuration", checkpoint.display()))?;
    Ok((header, ck.tensors))
}

/// Reads a guided-diffusion classifier checkpoint; as [`import_unet`].
pub fn import_classifier(
    checkpoint: &Path,
    config: &EncoderUNetConfig,
    info: AdmInfo,
) -> Result<(Header, HashMap<String, Tensor>)> {
    let tensors = read_checkpoint(checkpoint)?;
    let header = TimeClassifier::header(config, &info);
    let ck = Checkpoint {
        path: checkpoint.to_path_buf(),
        header: header.clone(),
        tensors,
    };
    TimeClassifier::from_checkpoint(&ck, DType::F32)
        .with_context(|| format!("{} does not fit the configuration", checkpoint.display()))?;
    Ok((header, ck.tensors))
}
