//! Weights files: self-describing safetensors, strict key checking, and imports of the original
//! PyTorch checkpoints.
//!
//! A bigroc weights file is a plain safetensors file whose `__metadata__` says what it holds:
//! `format` = [`FORMAT`], `kind` (e.g. `resnet`), `config` (JSON of the architecture's config, enough
//! to build the model with no other flags) and `info` (JSON: class names, training threat model,
//! provenance). Tensor names stay those of the original checkpoints.

pub mod hub;
pub mod pytorch;
mod strict;

pub use strict::{strict_var_builder, KeyUsage};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::output::atomic_write;

/// Value of `__metadata__.format` in files written by this version.
pub const FORMAT: &str = "bigroc/1";

/// What a weights file says about itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Which architecture family the tensors belong to (`resnet`, `adm-unet`, ...).
    pub kind: String,
    /// The architecture's configuration, as its config struct serializes.
    pub config: serde_json::Value,
    /// Everything else a user should know: classes, threat model, provenance.
    pub info: serde_json::Value,
}

/// A loaded weights file.
pub struct Checkpoint {
    /// Where the tensors came from (a resolved local path, also for `hf://` specs).
    pub path: PathBuf,
    pub header: Header,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Loads a bigroc safetensors file from a local path or `hf://OWNER/REPO[@REV]/FILE`.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        if let Some(name) = spec.strip_prefix(crate::defaults::EMBEDDED_PREFIX) {
            return Self::from_bytes(crate::defaults::embedded(name)?, PathBuf::from(spec), device);
        }
        let path = hub::resolve(spec)?;
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read weights file {}", path.display()))?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses a bigroc safetensors file already in memory; `path` names it in messages.
    pub fn from_bytes(bytes: &[u8], path: PathBuf, device: &Device) -> Result<Self> {
        let header = read_header(bytes, &path)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, device)
            .with_context(|| format!("{}: cannot load tensors", path.display()))?;
        Ok(Self { path, header, tensors })
    }

    /// Fails unless the file holds weights of the given kind.
    pub fn expect_kind(&self, kind: &str) -> Result<()> {
        if self.header.kind != kind {
            bail!(
                "{}: holds `{}` weights, but a `{kind}` model is needed here",
                self.path.display(),
                self.header.kind
            );
        }
        Ok(())
    }

    /// The architecture config stored in the header.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.header.config.clone())
            .with_context(|| format!("{}: invalid `config` in the metadata", self.path.display()))
    }

    /// A var builder over the tensors that records which keys the model asks for; call
    /// [`KeyUsage::finish`] after building the model to reject leftover keys.
    pub fn var_builder(&self, dtype: DType) -> (VarBuilder<'static>, KeyUsage) {
        let device = self.tensors.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        strict_var_builder(self.tensors.clone(), dtype, &device, &self.path.display().to_string())
    }
}

/// Reads and validates the `__metadata__` of a safetensors buffer.
fn read_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a safetensors file ({e}); PyTorch checkpoints must be converted first with `bigroc convert`",
            path.display()
        )
    })?;
    let meta = meta.metadata().clone().unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        Some(other) => bail!("{}: metadata format `{other}` is not `{FORMAT}`", path.display()),
        None => bail!(
            "{} has no bigroc metadata (no `format` in __metadata__); write it with `bigroc convert`",
            path.display()
        ),
    }
    let field = |name: &str| -> Result<serde_json::Value> {
        match meta.get(name) {
            None => Ok(serde_json::Value::Null),
            Some(s) => serde_json::from_str(s)
                .with_context(|| format!("{}: metadata `{name}` is not valid JSON", path.display())),
        }
    };
    let kind = meta
        .get("kind")
        .cloned()
        .with_context(|| format!("{}: metadata has no `kind`", path.display()))?;
    Ok(Header { kind, config: field("config")?, info: field("info")? })
}

/// Writes tensors and header as a bigroc safetensors file, atomically (never half-written).
pub fn save(path: &Path, header: &Header, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let metadata: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("kind".to_string(), header.kind.clone()),
        ("config".to_string(), header.config.to_string()),
        ("info".to_string(), header.info.to_string()),
    ]
    .into();
    // Sorted for reproducible files; contiguous CPU copies because safetensors writes raw bytes.
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let data = names
        .into_iter()
        .map(|k| Ok((k.clone(), tensors[k].to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    atomic_write(path, |tmp| {
        safetensors::serialize_to_file(data.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata), tmp)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_foreign_files_are_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        let header = Header {
            kind: "resnet".into(),
            config: serde_json::json!({"depth": 18}),
            info: serde_json::json!({"classes": ["a", "b"]}),
        };
        let t = Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((2, 3))?;
        save(&path, &header, &HashMap::from([("w".to_string(), t)]))?;
        let ck = Checkpoint::load(path.to_str().unwrap(), &Device::Cpu)?;
        assert_eq!(ck.header, header);
        assert_eq!(ck.tensors["w"].dims(), &[2, 3]);
        assert!(ck.expect_kind("adm-unet").unwrap_err().to_string().contains("`resnet` weights"));

        // A safetensors file without our metadata, and a file that is no safetensors at all.
        let plain = dir.path().join("plain.safetensors");
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), ck.tensors["w"].clone())]), &plain)?;
        let err = Checkpoint::load(plain.to_str().unwrap(), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("plain.safetensors") && err.contains("no bigroc metadata"), "{err}");
        let junk = dir.path().join("junk.pt");
        std::fs::write(&junk, b"PK\x03\x04 not really")?;
        let err = Checkpoint::load(junk.to_str().unwrap(), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("junk.pt") && err.contains("not a safetensors file"), "{err}");
        Ok(())
    }
}
