//! A var-builder backend that names the key at fault: missing keys, mis-shaped tensors, and (after
//! the model is built) keys the model never asked for.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

struct StrictTensors {
    tensors: HashMap<String, Tensor>,
    used: Arc<Mutex<BTreeSet<String>>>,
    source: String,
}

impl SimpleBackend for StrictTensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{}: key `{name}` has shape {:?}, the model expects {:?}",
                self.source,
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(t) = self.tensors.get(name) else {
            candle_core::bail!("{}: key `{name}` is missing", self.source);
        };
        self.used.lock().unwrap().insert(name.to_string());
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Which keys a model took from a [`strict_var_builder`].
pub struct KeyUsage {
    all: BTreeSet<String>,
    used: Arc<Mutex<BTreeSet<String>>>,
    source: String,
}

impl KeyUsage {
    /// Fails, naming them, if keys remain that the model did not use (except those `ignore` accepts,
    /// such as BatchNorm's `num_batches_tracked`).
    pub fn finish(&self, ignore: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.lock().unwrap();
        let unused: Vec<&String> = self.all.iter().filter(|k| !used.contains(*k) && !ignore(k)).collect();
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(5).map(|s| s.as_str()).collect();
            bail!(
                "{}: {} unexpected key(s) the model does not have: {}{}",
                self.source,
                unused.len(),
                shown.join(", "),
                if unused.len() > 5 { ", ..." } else { "" }
            );
        }
        Ok(())
    }
}

/// A var builder over `tensors` whose errors name `source` and the key; see [`KeyUsage`].
pub fn strict_var_builder(
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    source: &str,
) -> (VarBuilder<'static>, KeyUsage) {
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let usage = KeyUsage { all: tensors.keys().cloned().collect(), used: used.clone(), source: source.to_string() };
    let backend = StrictTensors { tensors, used, source: source.to_string() };
    (VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_missing_misshaped_and_unused_keys() {
        let dev = Device::Cpu;
        let t = |n: usize| Tensor::zeros(n, DType::F32, &dev).unwrap();
        let tensors = HashMap::from([("a.w".to_string(), t(3)), ("extra".to_string(), t(1))]);
        let (vb, usage) = strict_var_builder(tensors, DType::F32, &dev, "ck.safetensors");
        assert!(vb.pp("a").get(3, "w").is_ok());
        let err = vb.pp("a").get(4, "w").unwrap_err().to_string();
        assert!(err.contains("`a.w`") && err.contains("[3]") && err.contains("[4]"), "{err}");
        let err = vb.get(1, "b").unwrap_err().to_string();
        assert!(err.contains("key `b` is missing"), "{err}");
        let err = usage.finish(|_| false).unwrap_err().to_string();
        assert!(err.contains("ck.safetensors") && err.contains("extra"), "{err}");
        assert!(usage.finish(|k| k == "extra").is_ok());
    }
}
