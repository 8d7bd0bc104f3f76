//! A robust image classifier ready for refinement: the native ResNet plus what its weights file
//! says about it (classes, input size, the threat model it was trained against).

use anyhow::{bail, Result};
use bigroc_models::resnet::{Layout, ResNet, ResNetConfig};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::refine::Norm;
use crate::weights::{Checkpoint, Header};

/// `kind` of ResNet classifier weights files.
pub const KIND: &str = "resnet";

/// The attack a classifier was adversarially trained against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThreatModel {
    pub norm: Norm,
    /// In units of pixels in [0, 1].
    pub eps: f64,
}

/// The `info` part of a classifier's weights header.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// Class names in index order (may be empty when unknown).
    #[serde(default)]
    pub classes: Vec<String>,
    /// The dataset the classifier was trained on (`cifar10`, `imagenet`).
    #[serde(default)]
    pub dataset: Option<String>,
    /// The side of the square images it was trained on.
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default)]
    pub threat_model: Option<ThreatModel>,
    /// The refine eps (pixels in [0, 1]) used when `--eps` is not given.
    #[serde(default)]
    pub default_refine_eps: Option<f64>,
    /// Where the weights came from and how they were made.
    #[serde(default)]
    pub provenance: Option<String>,
}

pub struct Classifier {
    pub model: ResNet,
    pub config: ResNetConfig,
    pub info: ClassifierInfo,
    /// The weights file, for messages.
    pub source: String,
}

impl Classifier {
    /// Loads a classifier weights file (local path or `hf://...`).
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(spec, device)?)
    }

    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        ck.expect_kind(KIND)?;
        let config: ResNetConfig = ck.config()?;
        let info: ClassifierInfo = if ck.header.info.is_null() {
            ClassifierInfo::default()
        } else {
            serde_json::from_value(ck.header.info.clone())
                .map_err(|e| anyhow::anyhow!("{}: invalid `info` in the metadata: {e}", ck.path.display()))?
        };
        let (vb, usage) = ck.var_builder(DType::F32);
        let model = ResNet::new(&config, vb)?;
        usage.finish(|k| k.ends_with("num_batches_tracked"))?;
        if !info.classes.is_empty() && info.classes.len() != config.num_classes {
            bail!("{}: {} class names for {} classes", ck.path.display(), info.classes.len(), config.num_classes);
        }
        Ok(Self { model, config, info, source: ck.path.display().to_string() })
    }

    /// The header a converted or trained classifier is saved with.
    pub fn header(config: &ResNetConfig, info: &ClassifierInfo) -> Header {
        Header {
            kind: KIND.to_string(),
            config: serde_json::to_value(config).expect("config serializes"),
            info: serde_json::to_value(info).expect("info serializes"),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    /// Logits for pixels in [0, 1], f32 NCHW (the normalization is inside the model).
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.model.forward(x)
    }

    /// Fails with the remedy when images of this size cannot go through the network.
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<()> {
        match self.config.layout {
            Layout::Cifar => {
                let side = self.info.image_size.unwrap_or(32);
                if (height, width) != (side, side) {
                    bail!(
                        "classifier {} (cifar layout) takes {side}x{side} images; the input is {width}x{height} (pass --resize {side})",
                        self.source
                    );
                }
            }
            Layout::Imagenet => {
                if height < 32 || width < 32 {
                    bail!("classifier {} needs images of at least 32x32; the input is {width}x{height} (pass --resize)", self.source);
                }
            }
        }
        Ok(())
    }
}
