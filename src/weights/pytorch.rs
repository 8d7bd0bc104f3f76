//! Reading original PyTorch checkpoints (`torch.save` zip archives) in pure Rust.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;

/// Reads the tensors of a `torch.save` archive; `key` selects a nested state dict, as in
/// robustness checkpoints (`{'model': state_dict, 'optimizer': ..., 'epoch': ...}`).
pub fn read_state_dict(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        anyhow::bail!("checkpoint {} does not exist", path.display());
    }
    let tensors = candle_core::pickle::read_all_with_key(path, key).with_context(|| {
        let what = key.map(|k| format!(" (entry `{k}`)")).unwrap_or_default();
        format!("{}: cannot read it as a PyTorch checkpoint{what}", path.display())
    })?;
    if tensors.is_empty() {
        anyhow::bail!("{}: no tensors found in the checkpoint", path.display());
    }
    Ok(tensors.into_iter().collect())
}
