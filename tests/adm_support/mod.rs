//! Loading of the guided-diffusion fixtures (`xtask/reference/adm_fixtures.py`) and error measures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub struct Fixture {
    pub name: String,
    pub tensors: HashMap<String, Tensor>,
    pub config: serde_json::Value,
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"))
}

impl Fixture {
    pub fn load(name: &str) -> Result<Self> {
        let path = fixture_path(name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let config = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .with_context(|| format!("{}: no __metadata__.config", path.display()))?;
        let config = serde_json::from_str(config)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Self {
            name: name.to_string(),
            tensors,
            config,
        })
    }

    pub fn get(&self, key: &str) -> Result<Tensor> {
        self.tensors
            .get(key)
            .cloned()
            .with_context(|| format!("fixture {}: no tensor '{key}'", self.name))
    }

    /// A VarBuilder over the tensors under `prefix.` (weights are stored as f16, loaded as `dtype`).
    pub fn var_builder(&self, prefix: &str, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, &Device::Cpu).pp(prefix)
    }

    pub fn config_of<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let v = self
            .config
            .get(key)
            .with_context(|| format!("fixture {}: config has no '{key}'", self.name))?;
        Ok(serde_json::from_value(v.clone())?)
    }
}

/// max |a - b| / max |b|: the error relative to the reference's largest magnitude.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-30))
}

/// Asserts `rel_err(actual, expected) <= tol` and prints the measured figure.
pub fn check(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) -> Result<f64> {
    let e = rel_err(actual, expected)?;
    println!("{what}: max rel err {e:.3e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    Ok(e)
}
