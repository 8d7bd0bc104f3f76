//! A training run's resumable state and its metrics log, in a work directory:
//! `checkpoint.safetensors` (every variable under `model.`, the optimizer's buffers under `opt.`,
//! the run's configuration and position in the metadata; written atomically) and
//! `metrics.jsonl` (one JSON object per logged step or evaluation).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::train::optim::Optimizer;
use crate::weights::{self, Checkpoint, Header};

/// Where a run stands: `step` iterations done, which is batch `batch` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    pub step: usize,
    pub epoch: usize,
    pub batch: usize,
}

pub struct WorkDir {
    pub dir: PathBuf,
    /// The checkpoint's `kind` (what is being trained).
    kind: String,
}

impl WorkDir {
    /// Opens `dir` for a run of `kind`. Without `resume`, a directory that already holds a
    /// checkpoint is refused rather than overwritten.
    pub fn open(dir: &Path, kind: &str, resume: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create work directory {}", dir.display()))?;
        let this = Self { dir: dir.to_path_buf(), kind: kind.to_string() };
        if !resume && this.checkpoint_path().exists() {
            bail!(
                "{} already holds a training checkpoint: pass --resume to continue it, or choose another --work-dir",
                this.checkpoint_path().display()
            )
        }
        Ok(this)
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    /// Saves every variable, the optimizer's buffers, `config` and `position`.
    pub fn save(&self, config: &impl Serialize, position: Position, vars: &VarMap, opt: &Optimizer) -> Result<()> {
        self.save_with_extra(config, position, vars, opt, &HashMap::new())
    }

    /// [`WorkDir::save`] plus `extra` tensors under their own names (which must not start with
    /// `model.` or `opt.`), e.g. an EMA of the weights.
    pub fn save_with_extra(
        &self,
        config: &impl Serialize,
        position: Position,
        vars: &VarMap,
        opt: &Optimizer,
        extra: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = extra.clone();
        for (name, var) in vars.data().lock().expect("var map lock").iter() {
            tensors.insert(format!("model.{name}"), var.as_tensor().clone());
        }
        for (name, t) in opt.state() {
            tensors.insert(format!("opt.{name}"), t);
        }
        let header = Header {
            kind: self.kind.clone(),
            config: serde_json::to_value(config)?,
            info: serde_json::to_value(position)?,
        };
        weights::save(&self.checkpoint_path(), &header, &tensors)
    }

    /// Restores a checkpoint into `vars` and `opt` after checking it was made with `config`;
    /// returns its position. Every variable must be present with its shape.
    pub fn restore<C: Serialize>(&self, config: &C, vars: &VarMap, opt: &mut Optimizer, device: &Device) -> Result<Position> {
        Ok(self.restore_with_extra(config, vars, opt, device)?.0)
    }

    /// [`WorkDir::restore`], also returning the checkpoint's other tensors (those saved as
    /// `extra` by [`WorkDir::save_with_extra`]).
    pub fn restore_with_extra<C: Serialize>(
        &self,
        config: &C,
        vars: &VarMap,
        opt: &mut Optimizer,
        device: &Device,
    ) -> Result<(Position, HashMap<String, Tensor>)> {
        let path = self.checkpoint_path();
        let (ck, differences) = load_checked(&path, &self.kind, &serde_json::to_value(config)?, device)?;
        if let Some(differences) = differences {
            bail!(
                "{}: the checkpoint was made with other settings ({differences}); rerun with the same flags or another --work-dir",
                path.display()
            )
        }
        let position: Position = serde_json::from_value(ck.header.info.clone())
            .with_context(|| format!("{}: no training position in the metadata", path.display()))?;
        set_vars(vars, &ck.tensors, "model.", &path)?;
        let opt_state: HashMap<String, Tensor> = ck
            .tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("opt.").map(|k| (k.to_string(), t.clone())))
            .collect();
        opt.load_state(&opt_state, position.step)
            .with_context(|| format!("{}: optimizer state", path.display()))?;
        let extra = ck
            .tensors
            .into_iter()
            .filter(|(k, _)| !k.starts_with("model.") && !k.starts_with("opt."))
            .collect();
        Ok((position, extra))
    }

    /// The metrics log, truncated to the records at or before `keep_until_step` (a resumed run
    /// rewrites what came after its checkpoint).
    pub fn metrics(&self, keep_until_step: usize) -> Result<MetricsLog> {
        let path = self.metrics_path();
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s as usize <= keep_until_step)
                })
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut file = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        for line in kept {
            writeln!(file, "{line}")?;
        }
        Ok(MetricsLog { file, path })
    }
}

/// Sets every variable of `vars` from the weights file at `path`, which must hold `kind` weights
/// made with the configuration `config` (as its header stores it): a warm start, where another
/// run's written weights go on training under a fresh optimizer (e.g. on a machine the checkpoint,
/// with its optimizer state, cannot be moved to). Every variable must be in the file with its
/// shape, and the file may hold nothing else.
pub fn warm_start(vars: &VarMap, path: &Path, kind: &str, config: &serde_json::Value, device: &Device) -> Result<()> {
    let (ck, differences) = load_checked(path, kind, config, device)?;
    if let Some(differences) = differences {
        bail!("{}: made for another network than this run's ({differences})", path.display())
    }
    set_vars(vars, &ck.tensors, "", path)?;
    let data = vars.data().lock().expect("var map lock");
    if let Some(extra) = ck.tensors.keys().find(|k| !data.contains_key(*k)) {
        bail!("{}: `{extra}` is not a weight of this network", path.display())
    }
    Ok(())
}

/// Loads the file at `path`, which must hold `kind` weights, with the fields in which the
/// configuration its header stores differs from `config` (None when it is the same).
fn load_checked(path: &Path, kind: &str, config: &serde_json::Value, device: &Device) -> Result<(Checkpoint, Option<String>)> {
    let ck = Checkpoint::load(path.to_str().with_context(|| format!("non-UTF-8 path {}", path.display()))?, device)?;
    ck.expect_kind(kind)?;
    // Through text, as the stored copy went (serde_json's float parsing is not exact).
    let wanted: serde_json::Value = serde_json::from_str(&config.to_string())?;
    let differences = (ck.header.config != wanted).then(|| differing_fields(&ck.header.config, &wanted));
    Ok((ck, differences))
}

/// Sets every variable of `vars` from the tensor named `prefix` + its name in `tensors` (read
/// from `path`, for the messages).
fn set_vars(vars: &VarMap, tensors: &HashMap<String, Tensor>, prefix: &str, path: &Path) -> Result<()> {
    for (name, var) in vars.data().lock().expect("var map lock").iter() {
        let key = format!("{prefix}{name}");
        let t = tensors.get(&key).with_context(|| format!("{}: missing `{key}`", path.display()))?;
        var.set(&t.to_dtype(var.dtype())?).with_context(|| format!("{}: `{key}` does not fit the model", path.display()))?;
    }
    Ok(())
}

/// Appends one JSON object per line; every record carries the `step` it belongs to.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn write(&mut self, record: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").with_context(|| format!("cannot write {}", self.path.display()))?;
        self.file.flush()?;
        Ok(())
    }
}

fn differing_fields(found: &serde_json::Value, wanted: &serde_json::Value) -> String {
    let mut differences = Vec::new();
    collect_differences("", found, wanted, &mut differences);
    differences.join("; ")
}

/// The fields in which two JSON values differ, by dotted path, descending into objects.
fn collect_differences(path: &str, found: &serde_json::Value, wanted: &serde_json::Value, out: &mut Vec<String>) {
    match (found.as_object(), wanted.as_object()) {
        (Some(f), Some(w)) => {
            let mut keys: Vec<&String> = f.keys().chain(w.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let field = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (f.get(k), w.get(k)) {
                    (Some(a), Some(b)) => collect_differences(&field, a, b, out),
                    (a, b) => {
                        let show = |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
                        out.push(format!("{field}: checkpoint {} vs now {}", show(a), show(b)));
                    }
                }
            }
        }
        _ if found != wanted => {
            let field = if path.is_empty() { "value" } else { path };
            out.push(format!("{field}: checkpoint {found} vs now {wanted}"));
        }
        _ => {}
    }
}
