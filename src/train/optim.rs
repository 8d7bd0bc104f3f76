//! The two optimizers the reference trainers use, with PyTorch's update rules: SGD with momentum
//! and coupled weight decay (robustness' classifiers) and AdamW (guided-diffusion and the robust
//! time-dependent classifier).
//!
//! Written here rather than taken from candle-nn because a resumable trainer must save and restore
//! the optimizer's buffers, which candle-nn's optimizers keep private (and candle-nn has no SGD
//! momentum).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use bigroc_models::optimizer_step::AdamW;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// torch.optim.SGD: `buf = momentum * buf + (g + wd * p)`, `p -= lr * buf`.
    Sgd,
    /// torch.optim.AdamW: decoupled decay `p *= 1 - lr * wd`, then the bias-corrected Adam step.
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    /// SGD momentum (0 disables the buffer).
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl OptimizerConfig {
    pub fn sgd(momentum: f64, weight_decay: f64) -> Self {
        Self { kind: OptimizerKind::Sgd, weight_decay, momentum, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    pub fn adamw(weight_decay: f64) -> Self {
        Self { kind: OptimizerKind::Adamw, weight_decay, momentum: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// An optimizer over named parameters. Its state is a set of named tensors so that a checkpoint
/// can hold it next to the weights.
pub struct Optimizer {
    cfg: OptimizerConfig,
    params: Vec<(String, Var)>,
    /// Per parameter: SGD `[momentum]`, AdamW `[exp_avg, exp_avg_sq]`; empty before the first step.
    buffers: Vec<Vec<Tensor>>,
    /// Steps taken (AdamW's bias correction counts from 1).
    steps: usize,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig, params: Vec<(String, Var)>) -> Self {
        let buffers = vec![Vec::new(); params.len()];
        Self { cfg, params, buffers, steps: 0 }
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// One update with learning rate `lr` from the gradients in `grads`. A parameter without a
    /// gradient is left alone (PyTorch skips parameters whose `.grad` is None).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.cfg;
        for ((_, var), buffers) in self.params.iter().zip(self.buffers.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            // Detached: a gradient computed from variables records its ops, and a buffer derived
            // from it would keep every earlier step's graph (and activations) alive.
            let (g, p) = (&g.detach(), &var.as_tensor().detach());
            match c.kind {
                OptimizerKind::Sgd => {
                    let d = if c.weight_decay != 0.0 { (g + (p * c.weight_decay)?)? } else { g.clone() };
                    let d = if c.momentum != 0.0 {
                        let buf = match buffers.first() {
                            Some(buf) => ((buf * c.momentum)? + d)?,
                            None => d,
                        };
                        *buffers = vec![buf.clone()];
                        buf
                    } else {
                        d
                    };
                    var.set(&(p - (d * lr)?)?)?;
                }
                OptimizerKind::Adamw => {
                    let (m, v) = match buffers.as_slice() {
                        [m, v] => (m.clone(), v.clone()),
                        _ => (g.zeros_like()?, g.zeros_like()?),
                    };
                    // One kernel on CUDA in f32, candle ops elsewhere: the same arithmetic.
                    let settings = AdamW { lr, weight_decay: c.weight_decay, beta1: c.beta1, beta2: c.beta2, eps: c.eps, step: self.steps };
                    let (p, m, v) = settings.update(p, g, &m, &v)?;
                    var.set(&p)?;
                    *buffers = vec![m, v];
                }
            }
        }
        Ok(())
    }

    fn buffer_names(&self) -> &'static [&'static str] {
        match self.cfg.kind {
            OptimizerKind::Sgd => &["momentum"],
            OptimizerKind::Adamw => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// The buffers as `<buffer>.<parameter name>` tensors (none before the first step).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let names = self.buffer_names();
        let mut out = HashMap::new();
        for ((name, _), buffers) in self.params.iter().zip(&self.buffers) {
            for (b, t) in names.iter().zip(buffers) {
                out.insert(format!("{b}.{name}"), t.clone());
            }
        }
        out
    }

    /// Restores buffers saved by [`Optimizer::state`] after `steps` updates.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        let names = self.buffer_names();
        for ((name, var), buffers) in self.params.iter().zip(self.buffers.iter_mut()) {
            let found: Vec<Option<&Tensor>> = names.iter().map(|b| state.get(&format!("{b}.{name}"))).collect();
            *buffers = match (found.iter().all(Option::is_some), found.iter().any(Option::is_some)) {
                (true, _) => found
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        if t.dims() != var.dims() {
                            bail!("optimizer state for `{name}` has shape {:?}, the parameter {:?}", t.dims(), var.dims())
                        }
                        t.to_device(var.device())?.to_dtype(var.dtype()).context("optimizer state")
                    })
                    .collect::<Result<_>>()?,
                (false, false) => Vec::new(),
                (false, true) => bail!("optimizer state for `{name}` is incomplete"),
            };
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on a quadratic, against the update rules written out by hand.
    #[test]
    fn sgd_and_adamw_follow_torch_rules() -> Result<()> {
        let dev = Device::Cpu;
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adamw] {
            let cfg = match kind {
                OptimizerKind::Sgd => OptimizerConfig::sgd(0.9, 0.1),
                OptimizerKind::Adamw => OptimizerConfig::adamw(0.1),
            };
            let w = Var::new(&[1.0f32, -2.0], &dev)?;
            let mut opt = Optimizer::new(cfg, vec![("w".into(), w.clone())]);
            let (mut p, mut buf, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
            let lr = 0.05;
            for t in 1..=3 {
                let loss = w.as_tensor().sqr()?.sum_all()?; // gradient 2w
                opt.step(&loss.backward()?, lr)?;
                for i in 0..2 {
                    let g = 2.0 * p[i];
                    match kind {
                        OptimizerKind::Sgd => {
                            let d = g + 0.1 * p[i];
                            buf[i] = if t == 1 { d } else { 0.9 * buf[i] + d };
                            p[i] -= lr * buf[i];
                        }
                        OptimizerKind::Adamw => {
                            p[i] *= 1.0 - lr * 0.1;
                            m[i] = 0.9 * m[i] + 0.1 * g;
                            v[i] = 0.999 * v[i] + 0.001 * g * g;
                            let (b1, b2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
                            p[i] -= lr / b1 * m[i] / ((v[i] / b2).sqrt() + 1e-8);
                        }
                    }
                }
                let got = w.as_tensor().to_vec1::<f32>()?;
                for i in 0..2 {
                    assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{kind:?} step {t}: {got:?} vs {p:?}");
                }
            }
            // The state round-trips into a fresh optimizer that then takes the same step.
            let state = opt.state();
            let w2 = Var::new(w.as_tensor().to_vec1::<f32>()?.as_slice(), &dev)?;
            let mut opt2 = Optimizer::new(cfg, vec![("w".into(), w2.clone())]);
            opt2.load_state(&state, opt.steps())?;
            opt.step(&w.as_tensor().sqr()?.sum_all()?.backward()?, lr)?;
            opt2.step(&w2.as_tensor().sqr()?.sum_all()?.backward()?, lr)?;
            assert_eq!(w.as_tensor().to_vec1::<f32>()?, w2.as_tensor().to_vec1::<f32>()?);
        }
        Ok(())
    }
}
