//! `bigroc train timed-classifier`: training ADM's time-dependent classifier p(y | x_t, t)
//! (guided-diffusion's `EncoderUNetModel`), plainly (guided-diffusion's `classifier_train.py`:
//! the "vanilla" classifier) or adversarially (the robust classifier of Kawar, Ganz & Elad,
//! "Enhancing Diffusion-Based Image Synthesis with Robust Classifier Guidance", TMLR 2023).
//!
//! Every iteration: a batch of training images (random crop and flip), scaled to [-1, 1] as
//! guided-diffusion's loader does; one timestep per image, uniform over the diffusion's steps
//! (guided-diffusion's `UniformSampler`); x_t = q_sample(x_0, t, noise); with `attack`, x_t is
//! replaced by the paper's early-stopping L2 PGD example ([`early_stopping_pgd`], run on a frozen
//! view of the same weights); then one AdamW step on the mean cross-entropy of classifier(x_t, t)
//! against the labels. The classifier receives the integer timestep t, as in the reference
//! scripts (for a 1000-step diffusion this is also what `sample` passes it).
//!
//! # The attack's units
//! The official code (bahjat-kawar/enhancing-diffusion-robust, `cifar_rob_train.py` and
//! `classifier_rob_train.py`) attacks the noisy batch x_t itself, whose clean part lies in
//! guided-diffusion's [-1, 1] image scale, without any clamping; its `--attack_eps` default and
//! the paper's radius, 0.5, are therefore L2 distances in the [-1, 1] scale (0.25 in [0, 1]
//! pixel units). That is the convention here: `eps` is in the units of x_t. The step size is
//! eps/6 by default, the official ImageNet script's `attack_eps * 0.5 / 3` and the paper's
//! setting; the official CIFAR-10 script uses `2.5 * eps / steps` instead (0.179 for 7 steps),
//! which `--attack-step` can select.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use bigroc_models::adm::{EncoderUNetConfig, EncoderUNetModel, Pool};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::accuracy::correct;
use crate::adm::{AdmInfo, TimeClassifier, CLASSIFIER_KIND};
use crate::diffusion::{DiffusionConfig, GaussianDiffusion, NoiseSchedule};
use crate::train::batches::{augmented_batch, epoch_order, ImageSet};
use crate::train::classifier::{RunOptions, TrainReport};
use crate::train::early_stop_pgd::{early_stopping_pgd, EarlyStopPgd};
use crate::train::optim::{Optimizer, OptimizerConfig};
use crate::train::schedule::LrSchedule;
use crate::train::state::Position;

/// `kind` of a time-dependent classifier training checkpoint.
pub const CHECKPOINT_KIND: &str = "train-state/adm-classifier";

/// Everything that determines a run's result (a resumed run must have the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedClassifierTraining {
    pub model: EncoderUNetConfig,
    /// The diffusion whose noise levels the classifier learns (`create_gaussian_diffusion`).
    pub diffusion_steps: usize,
    pub noise_schedule: NoiseSchedule,
    pub iterations: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub optimizer: OptimizerConfig,
    /// The paper's attack on x_t (None: the vanilla classifier).
    pub attack: Option<EarlyStopPgd>,
    /// Random-crop padding in pixels (0: no crop); horizontal flips always.
    pub crop_padding: usize,
    pub seed: u64,
}

impl TimedClassifierTraining {
    /// The diffusion process of q_sample.
    pub fn diffusion(&self) -> Result<GaussianDiffusion> {
        GaussianDiffusion::new(&DiffusionConfig {
            steps: self.diffusion_steps,
            noise_schedule: self.noise_schedule,
            ..Default::default()
        })
    }

    /// Full batches per pass over `n` images (a last partial batch is dropped, as guided-diffusion's
    /// loader does; a set smaller than one batch is one batch).
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        (n / self.batch_size).max(1)
    }
}

/// The classifier's channel multipliers (a `--classifier_channel_mult` string) when none are given:
/// "1,2,2,4" at 32x32, the paper's CIFAR-10 classifier (the official code's
/// `create_classifier(is_cifar=True)`); otherwise empty, i.e. guided-diffusion's for the size.
pub fn default_channel_mult(image_size: usize) -> String {
    if image_size == 32 { "1,2,2,4".into() } else { String::new() }
}

/// guided-diffusion's initialization of `EncoderUNetModel`, from `seed`, in sorted-name order:
/// PyTorch's defaults (convolution and linear weights and biases uniform in +-1/sqrt(fan_in),
/// GroupNorm weight 1 and bias 0), zeros for the layers the reference wraps in `zero_module` (each
/// ResBlock's last convolution, each attention block's `proj_out`, the adaptive pool's
/// convolution), and the attention pool's positional embedding ~ N(0, 1) / sqrt(channels).
pub fn adm_classifier_init(vars: &VarMap, config: &EncoderUNetConfig, seed: u64) -> Result<()> {
    crate::train::init::adm_init(vars, seed, &|layer| {
        layer.ends_with("out_layers.3")
            || layer.ends_with("proj_out")
            || (config.pool == Pool::Adaptive && layer == "out.3")
    })
}

/// A classifier being trained: its variables, the network built on them, and a frozen view of the
/// same weights for the attack and evaluation.
pub struct TrainableTimeClassifier {
    pub vars: VarMap,
    /// Built on the variables: its outputs differentiate with respect to the weights.
    pub model: EncoderUNetModel,
    /// Built on detached views of the same storage (no copy): every optimizer update (`Var::set`
    /// writes in place) shows here too, and its backward computes input gradients only.
    pub frozen: EncoderUNetModel,
}

impl TrainableTimeClassifier {
    /// A freshly initialized network ([`adm_classifier_init`] from `seed`), in f32.
    pub fn new(config: &EncoderUNetConfig, seed: u64, device: &Device) -> Result<Self> {
        if config.dropout != 0.0 {
            bail!("dropout {} is not supported in training (the ADM classifiers use 0)", config.dropout)
        }
        let vars = VarMap::new();
        let model = EncoderUNetModel::new(config, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        adm_classifier_init(&vars, config, seed)?;
        let detached: HashMap<String, Tensor> = vars
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let frozen = EncoderUNetModel::new(config, VarBuilder::from_tensors(detached, DType::F32, device))?;
        Ok(Self { vars, model, frozen })
    }

    /// Every variable, by sorted name (all are trained, as guided-diffusion's AdamW does).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let data = self.vars.data().lock().expect("var map lock");
        let mut params: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// Logits and mean cross-entropy of `x_t` at `timesteps`, differentiable in the weights.
    pub fn loss(&self, x_t: &Tensor, timesteps: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.model.forward(x_t, timesteps)?;
        let loss = candle_nn::loss::cross_entropy(&logits, y)?;
        Ok((logits, loss))
    }

    /// Weights as a classifier file's tensors (f32, or f16 storage with `half`).
    pub fn weights(&self, half: bool) -> Result<HashMap<String, Tensor>> {
        let data = self.vars.data().lock().expect("var map lock");
        data.iter()
            .map(|(k, v)| {
                let t = v.as_tensor().detach();
                Ok((k.clone(), if half { t.to_dtype(DType::F16)? } else { t }))
            })
            .collect()
    }
}

/// A seed for the random draws of one (seed, stream, index) (splitmix64 of their combination).
fn seed_of(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Streams of [`seed_of`].
const NOISE_STREAM: u64 = 0x7469_6D65; // training timesteps and noise
const TEST_STREAM: u64 = 0x7465_7374; // evaluation timesteps and noise

/// One timestep per image (uniform over `steps`) and N(0, 1) noise of `shape`, from `seed`.
pub fn draw_timesteps_and_noise(seed: u64, n: usize, steps: usize, shape: &[usize], device: &Device) -> Result<(Vec<usize>, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t: Vec<usize> = (0..n).map(|_| rng.random_range(0..steps)).collect();
    let count: usize = shape.iter().product();
    let noise: Vec<f32> = (0..count).map(|_| rng.sample(StandardNormal)).collect();
    Ok((t, Tensor::from_vec(noise, shape, &Device::Cpu)?.to_device(device)?))
}

/// The timesteps as the network receives them: (N) f32.
fn timestep_tensor(t: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(t.iter().map(|&v| v as f32).collect::<Vec<f32>>(), t.len(), device)?)
}

/// Images in [0, 1] to guided-diffusion's [-1, 1].
fn to_model_range(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(2.0, -1.0)?)
}

/// Mean loss and accuracy of the frozen classifier on `test`, each image at its own timestep and
/// noise (fixed by `seed`, so successive evaluations see the same noisy images).
pub fn evaluate(net: &TrainableTimeClassifier, diffusion: &GaussianDiffusion, test: &ImageSet, seed: u64, device: &Device) -> Result<(f64, f64)> {
    let (mut loss_sum, mut hits) = (0f64, 0usize);
    let indices: Vec<usize> = (0..test.len()).collect();
    for (b, chunk) in indices.chunks(256).enumerate() {
        let (x, y) = test.batch(chunk, device)?;
        let x0 = to_model_range(&x)?;
        let (t, noise) = draw_timesteps_and_noise(seed_of(seed, TEST_STREAM, b as u64), chunk.len(), diffusion.num_timesteps(), x0.dims(), device)?;
        let x_t = diffusion.q_sample(&x0, &t, &noise)?;
        let logits = net.frozen.forward(&x_t, &timestep_tensor(&t, device)?)?;
        loss_sum += crate::refine::pgd::cross_entropy_per_sample(&logits, &y)?.sum_all()?.to_scalar::<f32>()? as f64;
        hits += correct(&logits, &y)?;
    }
    Ok((loss_sum / test.len() as f64, hits as f64 / test.len() as f64))
}

/// Checks a run's settings against its data before any work.
fn validate(cfg: &TimedClassifierTraining, train: &ImageSet) -> Result<()> {
    train.validate("training data")?;
    ensure!(train.classes.len() == cfg.model.out_channels, "the training data has {} classes, the classifier {}", train.classes.len(), cfg.model.out_channels);
    ensure!(
        train.height == cfg.model.image_size && train.width == cfg.model.image_size,
        "the training images are {}x{}, the classifier takes {}x{}",
        train.width, train.height, cfg.model.image_size, cfg.model.image_size
    );
    ensure!(cfg.batch_size > 0 && cfg.iterations > 0, "--batch-size and --iterations must be positive");
    if let Some(a) = &cfg.attack {
        ensure!(a.eps > 0.0 && a.step_size > 0.0 && a.steps > 0, "the attack needs a positive eps, step size and step count");
    }
    Ok(())
}

/// Trains (or resumes training) on `train`; the model is left in `net`. `opts.test`, when given,
/// is evaluated (noisy, clean of attacks) at every checkpoint.
pub fn train_timed_classifier(cfg: &TimedClassifierTraining, train: &ImageSet, net: &TrainableTimeClassifier, opts: &RunOptions) -> Result<TrainReport> {
    validate(cfg, train)?;
    let diffusion = cfg.diffusion()?;
    let mut opt = Optimizer::new(cfg.optimizer, net.parameters());
    let start = if opts.resume && opts.work_dir.checkpoint_path().exists() {
        let p = opts.work_dir.restore(cfg, &net.vars, &mut opt, &opts.device)?;
        tracing::info!("resuming at iteration {} (epoch {}, batch {})", p.step, p.epoch, p.batch);
        p
    } else {
        Position::default()
    };
    let mut metrics = opts.work_dir.metrics(start.step)?;
    let per_epoch = cfg.batches_per_epoch(train.len());
    let total = cfg.iterations;
    let bar = crate::progress::steps(total, "training");
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(start.step as u64);
    let began = Instant::now();
    let mut window = Instant::now();
    // Sums since the last log line: loss, hits, images, hits before the attack, attacked images.
    let (mut sum_loss, mut hits, mut seen, mut clean_hits, mut attacked) = (0f64, 0usize, 0usize, 0usize, 0usize);
    let (mut last_loss, mut test_accuracy) = (None, None);
    let mut order: Option<(usize, Vec<usize>)> = None;
    for step in start.step..total {
        if opts.stops_before(step, began) {
            let position = Position { step, epoch: step / per_epoch, batch: step % per_epoch };
            opts.work_dir.save(cfg, position, &net.vars, &opt)?;
            bar.abandon();
            return Ok(TrainReport { steps: step, finished: false, seconds: began.elapsed().as_secs_f64(), last_loss, test_accuracy });
        }
        let (epoch, b) = (step / per_epoch, step % per_epoch);
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, epoch_order(train.len(), cfg.seed, epoch)));
        }
        let indices = {
            let all = &order.as_ref().expect("set above").1;
            &all[b * cfg.batch_size..((b + 1) * cfg.batch_size).min(all.len())]
        };
        let lr = cfg.schedule.lr(cfg.lr, step, total, epoch);
        let (x, y) = augmented_batch(train, indices, cfg.crop_padding, cfg.seed, epoch, b, &opts.device)?;
        let x0 = to_model_range(&x)?;
        let (t, noise) = draw_timesteps_and_noise(seed_of(cfg.seed, NOISE_STREAM, step as u64), indices.len(), diffusion.num_timesteps(), x0.dims(), &opts.device)?;
        let timesteps = timestep_tensor(&t, &opts.device)?;
        let mut x_t = diffusion.q_sample(&x0, &t, &noise)?;
        if let Some(attack) = &cfg.attack {
            let out = early_stopping_pgd(&|x| net.frozen.forward(x, &timesteps), &x_t, &y, attack)?;
            clean_hits += out.clean_correct.unwrap_or(0);
            attacked += indices.len();
            x_t = out.images;
        }
        let (logits, loss) = net.loss(&x_t, &timesteps, &y)?;
        opt.step(&loss.backward()?, lr)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            bail!("the training loss became {loss_value} at iteration {step}: lower --lr")
        }
        sum_loss += loss_value * indices.len() as f64;
        hits += correct(&logits.detach(), &y)?;
        seen += indices.len();
        last_loss = Some(loss_value);
        let done = step + 1;
        bar.inc(1);
        if done % opts.log_every.max(1) == 0 || done == total {
            let rate = seen as f64 / window.elapsed().as_secs_f64().max(1e-9);
            let (mean_loss, acc) = (sum_loss / seen as f64, hits as f64 / seen as f64);
            let clean = (attacked > 0).then(|| clean_hits as f64 / attacked as f64);
            let adv = if clean.is_some() { "adv " } else { "" };
            bar.set_message(format!("loss {mean_loss:.3} {adv}acc {:.1}% {rate:.0} img/s", 100.0 * acc));
            if bar.is_hidden() {
                tracing::info!("iteration {done}/{total} lr {lr:.2e} loss {mean_loss:.4} {adv}train acc {:.2}% {rate:.1} img/s", 100.0 * acc);
            }
            let mut record = json!({"step": done, "epoch": epoch, "lr": lr, "loss": mean_loss, "train_accuracy": acc, "images_per_s": rate});
            if let Some(c) = clean {
                record["clean_train_accuracy"] = json!(c);
            }
            metrics.write(record)?;
            (sum_loss, hits, seen, clean_hits, attacked) = (0.0, 0, 0, 0, 0);
            window = Instant::now();
        }
        if done % opts.checkpoint_every.max(1) == 0 || done == total {
            if let Some(test) = opts.test {
                let (test_loss, acc) = evaluate(net, &diffusion, test, cfg.seed, &opts.device)?;
                tracing::info!("iteration {done}: noisy test accuracy {:.2}%, loss {test_loss:.4} ({} images)", 100.0 * acc, test.len());
                metrics.write(json!({"step": done, "test_loss": test_loss, "test_accuracy": acc, "test_images": test.len()}))?;
                test_accuracy = Some(acc);
            }
            let position = Position { step: done, epoch: done / per_epoch, batch: done % per_epoch };
            opts.work_dir.save(cfg, position, &net.vars, &opt)?;
        }
    }
    bar.finish_and_clear();
    Ok(TrainReport { steps: total, finished: true, seconds: began.elapsed().as_secs_f64(), last_loss, test_accuracy })
}

/// Starts `net` from the time-dependent classifier file at `path` (e.g. the weights a stopped run
/// wrote on another machine), which must be made for `cfg`'s network.
pub fn warm_start(net: &TrainableTimeClassifier, cfg: &TimedClassifierTraining, path: &std::path::Path, device: &Device) -> Result<()> {
    crate::train::state::warm_start(&net.vars, path, CLASSIFIER_KIND, &serde_json::to_value(&cfg.model)?, device)
}

/// Writes the trained network as the time-dependent classifier file `sample --classifier` reads
/// (`kind` adm-classifier; `info.training` is `robust` with an attack, else `vanilla`).
pub fn save_time_classifier(
    path: &std::path::Path,
    cfg: &TimedClassifierTraining,
    net: &TrainableTimeClassifier,
    classes: &[String],
    dataset: Option<String>,
    provenance: String,
    half: bool,
) -> Result<()> {
    let info = AdmInfo {
        classes: classes.to_vec(),
        dataset,
        preset: None,
        training: Some(if cfg.attack.is_some() { "robust" } else { "vanilla" }.to_string()),
        flags: serde_json::to_value(cfg)?,
        provenance: Some(provenance),
    };
    crate::weights::save(path, &TimeClassifier::header(&cfg.model, &info), &net.weights(half)?)
        .with_context(|| format!("writing {}", path.display()))
}
