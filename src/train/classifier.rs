//! `bigroc train classifier`: standard or adversarial training of a CIFAR-layout ResNet, the way the
//! robustness library trains its robust models: for each batch, an untargeted PGD attack on the
//! model in eval mode (running batch-norm statistics, weights fixed), then one optimizer step on
//! the cross-entropy of the attacked batch with the model in train mode.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bigroc_models::resnet::{ResNet, ResNetConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::accuracy::{accuracy, correct};
use crate::classifier::{Classifier, ClassifierInfo, ThreatModel};
use crate::refine::pgd::{pgd, Goal, PgdConfig};
use crate::train::batches::{augmented_batch, epoch_order, ImageSet};
use crate::train::init::torch_default_init;
use crate::train::optim::{Optimizer, OptimizerConfig};
use crate::train::schedule::LrSchedule;
use crate::train::state::{Position, WorkDir};

/// `kind` of a classifier training checkpoint.
pub const CHECKPOINT_KIND: &str = "train-state/resnet";

/// Everything that determines a run's result (a resumed run must have the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierTraining {
    pub model: ResNetConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub optimizer: OptimizerConfig,
    /// The untargeted attack each batch is replaced by (None: standard training).
    pub attack: Option<PgdConfig>,
    /// Random-crop padding in pixels (0: no crop); horizontal flips always.
    pub crop_padding: usize,
    pub seed: u64,
}

impl ClassifierTraining {
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }
}

/// How to run (not part of the result).
pub struct RunOptions<'a> {
    pub device: Device,
    pub work_dir: &'a WorkDir,
    pub resume: bool,
    /// Save a checkpoint every this many iterations (and at every epoch end).
    pub checkpoint_every: usize,
    /// Log a metrics record every this many iterations.
    pub log_every: usize,
    /// Evaluate clean accuracy on this set after every epoch.
    pub test: Option<&'a ImageSet>,
    /// Stop after this many iterations in total (for tests and time-boxed runs); a later
    /// `--resume` continues.
    pub stop_after: Option<usize>,
    /// Stop after this much wall-clock time in this process (a GPU lease, a queue slot); a later
    /// `--resume` continues from the checkpoint written on stopping.
    pub time_limit: Option<Duration>,
    pub progress: bool,
}

impl RunOptions<'_> {
    /// Whether a run that began at `began` stops (with a checkpoint) before iteration `step`.
    pub fn stops_before(&self, step: usize, began: Instant) -> bool {
        self.stop_after.is_some_and(|s| step >= s) || self.time_limit.is_some_and(|t| began.elapsed() >= t)
    }
}

/// A model being trained: its variables and the network built on them.
pub struct TrainableResNet {
    pub vars: VarMap,
    pub model: ResNet,
}

impl TrainableResNet {
    /// A freshly initialized network (PyTorch's default initialization from `seed`).
    pub fn new(cfg: &ResNetConfig, seed: u64, device: &Device) -> Result<Self> {
        let vars = VarMap::new();
        let model = ResNet::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        torch_default_init(&vars, seed)?;
        Ok(Self { vars, model })
    }

    /// A network starting from given weights (bare state-dict names; `num_batches_tracked` and
    /// other extra entries are ignored, every variable must be present).
    pub fn from_tensors(cfg: &ResNetConfig, tensors: &std::collections::HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let this = Self::new(cfg, 0, device)?;
        for (name, var) in this.vars.data().lock().expect("var map lock").iter() {
            let t = tensors.get(name).with_context(|| format!("initial weights lack `{name}`"))?;
            var.set(&t.to_dtype(DType::F32)?.to_device(device)?).with_context(|| format!("initial weight `{name}`"))?;
        }
        Ok(this)
    }

    /// The trainable parameters (not the batch-norm running statistics), by sorted name.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let data = self.vars.data().lock().expect("var map lock");
        let mut params: Vec<(String, Var)> = data
            .iter()
            .filter(|(k, _)| !bigroc_models::resnet::is_buffer(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// The attacked batch (or `x` itself without an attack), found with the model in eval mode.
    pub fn attack(&self, x: &Tensor, y: &Tensor, attack: Option<&PgdConfig>) -> Result<Tensor> {
        Ok(match attack {
            Some(cfg) => pgd(&|t| self.model.forward_t(t, false), x, y, cfg, Goal::Away)?.images,
            None => x.clone(),
        })
    }

    /// Train-mode logits and mean cross-entropy of `x` (updates the running statistics).
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.model.forward_t(x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        Ok((logits, loss))
    }

    /// Weights as a classifier file's tensors (f32, or f16 storage with `half`).
    pub fn weights(&self, half: bool) -> Result<std::collections::HashMap<String, Tensor>> {
        let data = self.vars.data().lock().expect("var map lock");
        data.iter()
            .map(|(k, v)| {
                let t = v.as_tensor().detach();
                Ok((k.clone(), if half { t.to_dtype(DType::F16)? } else { t }))
            })
            .collect()
    }
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub finished: bool,
    pub seconds: f64,
    pub last_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
}

/// Trains (or resumes training) on `train`; the model is left in `net`.
pub fn train_classifier(cfg: &ClassifierTraining, train: &ImageSet, net: &TrainableResNet, opts: &RunOptions) -> Result<TrainReport> {
    train.validate("training data")?;
    if train.classes.len() != cfg.model.num_classes {
        bail!("the training data has {} classes, the model {}", train.classes.len(), cfg.model.num_classes)
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        bail!("--batch-size and --epochs must be positive")
    }
    let mut opt = Optimizer::new(cfg.optimizer, net.parameters());
    let start = if opts.resume && opts.work_dir.checkpoint_path().exists() {
        let p = opts.work_dir.restore(cfg, &net.vars, &mut opt, &opts.device)?;
        tracing::info!("resuming at step {} (epoch {}, batch {})", p.step, p.epoch, p.batch);
        p
    } else {
        Position::default()
    };
    let mut metrics = opts.work_dir.metrics(start.step)?;
    let per_epoch = cfg.steps_per_epoch(train.len());
    let total = per_epoch * cfg.epochs;
    let bar = crate::progress::steps(total, "training");
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(start.step as u64);
    let began = Instant::now();
    let mut window = (Instant::now(), 0usize); // images since the last log line
    let (mut sum_loss, mut sum_correct, mut seen) = (0f64, 0usize, 0usize);
    let mut last_loss = None;
    let mut test_accuracy = None;
    let mut step = start.step;
    for epoch in start.epoch..cfg.epochs {
        let order = epoch_order(train.len(), cfg.seed, epoch);
        let first_batch = if epoch == start.epoch { start.batch } else { 0 };
        for (b, indices) in order.chunks(cfg.batch_size).enumerate().skip(first_batch) {
            if opts.stops_before(step, began) {
                opts.work_dir.save(cfg, Position { step, epoch, batch: b }, &net.vars, &opt)?;
                bar.abandon();
                return Ok(TrainReport { steps: step, finished: false, seconds: began.elapsed().as_secs_f64(), last_loss, test_accuracy });
            }
            let lr = cfg.schedule.lr(cfg.lr, step, total, epoch);
            let (x, y) = augmented_batch(train, indices, cfg.crop_padding, cfg.seed, epoch, b, &opts.device)?;
            let x = net.attack(&x, &y, cfg.attack.as_ref())?;
            let (logits, loss) = net.loss(&x, &y)?;
            opt.step(&loss.backward()?, lr)?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                bail!("the training loss became {loss_value} at step {step} (epoch {epoch}, batch {b}): lower --lr")
            }
            sum_loss += loss_value * indices.len() as f64;
            sum_correct += correct(&logits.detach(), &y)?;
            seen += indices.len();
            window.1 += indices.len();
            last_loss = Some(loss_value);
            step += 1;
            bar.inc(1);
            if step % opts.log_every.max(1) == 0 || b + 1 == per_epoch {
                let rate = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                let (mean_loss, acc) = (sum_loss / seen as f64, sum_correct as f64 / seen as f64);
                bar.set_message(format!("epoch {epoch} loss {mean_loss:.3} acc {:.1}% {rate:.0} img/s", 100.0 * acc));
                if bar.is_hidden() {
                    tracing::info!("step {step}/{total} epoch {epoch} lr {lr:.5} loss {mean_loss:.4} train acc {:.2}% {rate:.1} img/s", 100.0 * acc);
                }
                metrics.write(json!({"step": step, "epoch": epoch, "lr": lr, "loss": mean_loss, "train_accuracy": acc, "images_per_s": rate}))?;
                (sum_loss, sum_correct, seen) = (0.0, 0, 0);
                window = (Instant::now(), 0);
            }
            let epoch_done = b + 1 == per_epoch;
            if epoch_done || step % opts.checkpoint_every.max(1) == 0 {
                let next = if epoch_done { Position { step, epoch: epoch + 1, batch: 0 } } else { Position { step, epoch, batch: b + 1 } };
                if epoch_done {
                    if let Some(test) = opts.test {
                        let acc = accuracy(&|t| net.model.forward_t(t, false), test, 500, None, &opts.device, &mut |_, _| {})?;
                        tracing::info!("epoch {epoch}: clean test accuracy {:.2}% ({} images)", 100.0 * acc.clean, acc.images);
                        metrics.write(json!({"step": step, "epoch": epoch, "test_accuracy": acc.clean, "test_images": acc.images}))?;
                        test_accuracy = Some(acc.clean);
                    }
                }
                opts.work_dir.save(cfg, next, &net.vars, &opt)?;
            }
        }
    }
    bar.finish_and_clear();
    Ok(TrainReport { steps: step, finished: true, seconds: began.elapsed().as_secs_f64(), last_loss, test_accuracy })
}

/// Writes the trained network as a classifier weights file `refine` and `accuracy` read.
pub fn save_classifier(path: &std::path::Path, cfg: &ClassifierTraining, net: &TrainableResNet, classes: &[String], dataset: Option<String>, image_size: usize, provenance: String, half: bool) -> Result<()> {
    let info = ClassifierInfo {
        classes: classes.to_vec(),
        dataset,
        image_size: Some(image_size),
        threat_model: cfg.attack.map(|a| ThreatModel { norm: a.norm, eps: a.eps }),
        default_refine_eps: None,
        provenance: Some(provenance),
    };
    crate::weights::save(path, &Classifier::header(&cfg.model, &info), &net.weights(half)?)
        .with_context(|| format!("writing {}", path.display()))
}
