//! `bigroc train diffusion`: training ADM's diffusion UNet (guided-diffusion's `UNetModel`,
//! class-conditional or not) with improved-diffusion's hybrid objective, keeping an exponential
//! moving average of the weights, as guided-diffusion's `image_train.py` / `TrainLoop` does.
//!
//! Every iteration: a batch of training images (horizontal flip with probability 1/2 when `flip`,
//! no crop: guided-diffusion's `load_data` defaults, `random_flip=True, random_crop=False`), scaled
//! to [-1, 1]; one timestep per image, uniform over the diffusion's steps (`UniformSampler`, whose
//! importance weights are all 1); x_t = q_sample(x_0, t, noise); the network's output at
//! (x_t, t, y) split into epsilon and the variance interpolation v; the per-image terms of
//! [`training_losses`]; one AdamW step on their batch mean; then the EMA update
//! `ema <- rate * ema + (1 - rate) * weights` ([`Ema`], guided-diffusion's `update_ema`).
//!
//! The final weights file holds the EMA weights (what guided-diffusion publishes and samples
//! from), as the `adm-unet` file `bigroc sample --model` reads.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use bigroc_models::adm::{UNetConfig, UNetModel};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adm::{AdmInfo, DiffusionModel, UNetFileConfig, UNET_KIND};
use crate::diffusion::{DiffusionConfig, GaussianDiffusion, NoiseSchedule};
use crate::train::batches::{augmented_batch, epoch_order, ImageSet};
use crate::train::classifier::{RunOptions, TrainReport};
use crate::train::optim::{Optimizer, OptimizerConfig};
use crate::train::schedule::LrSchedule;
use crate::train::state::Position;

/// `kind` of a diffusion UNet training checkpoint.
pub const CHECKPOINT_KIND: &str = "train-state/adm-unet";

/// Everything that determines a run's result (a resumed run must have the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffusionTraining {
    /// The UNet; `out_channels` twice `in_channels` means a learned variance (`learn_sigma`).
    pub model: UNetConfig,
    pub diffusion_steps: usize,
    pub noise_schedule: NoiseSchedule,
    /// The network receives `t * 1000 / steps` instead of t (improved-diffusion's option).
    pub rescale_timesteps: bool,
    /// Loss type RESCALED_MSE: the VB term times `steps / 1000` (improved-diffusion's default;
    /// guided-diffusion's flag of the same name). Without it, plain MSE (+ unscaled VB).
    pub rescale_learned_sigmas: bool,
    pub iterations: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub optimizer: OptimizerConfig,
    /// EMA rate (guided-diffusion's `--ema_rate`, 0.9999).
    pub ema_rate: f64,
    /// Random horizontal flips (guided-diffusion's `random_flip`).
    pub flip: bool,
    pub seed: u64,
}

impl DiffusionTraining {
    pub fn learn_sigma(&self) -> bool {
        self.model.out_channels == 2 * self.model.in_channels
    }

    /// The diffusion as a weights file records it.
    pub fn diffusion_config(&self) -> DiffusionConfig {
        DiffusionConfig {
            steps: self.diffusion_steps,
            noise_schedule: self.noise_schedule,
            learn_sigma: self.learn_sigma(),
            sigma_small: false,
            timestep_respacing: String::new(),
            rescale_timesteps: self.rescale_timesteps,
        }
    }

    pub fn diffusion(&self) -> Result<GaussianDiffusion> {
        GaussianDiffusion::new(&self.diffusion_config())
    }

    /// Full batches per pass over `n` images (at least one).
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        (n / self.batch_size).max(1)
    }
}

/// A small class-conditional CIFAR-10 UNet with learned sigma: 64 base channels, channel
/// multipliers 1, 2, 2, two ResBlocks per level, attention at 16x16 (64 channels per head),
/// scale-shift norm, convolutional up/down-sampling (improved-diffusion's CIFAR-10 layout, at
/// half its width): about 7.0 M parameters, 14 MB in f16.
pub fn cifar10_unet(num_classes: Option<usize>) -> UNetConfig {
    UNetConfig {
        image_size: 32,
        in_channels: 3,
        model_channels: 64,
        out_channels: 6,
        num_res_blocks: 2,
        attention_resolutions: vec![2],
        dropout: 0.0,
        channel_mult: vec![1.0, 2.0, 2.0],
        conv_resample: true,
        num_classes,
        num_heads: 4,
        num_head_channels: Some(64),
        num_heads_upsample: None,
        use_scale_shift_norm: true,
        resblock_updown: false,
        use_new_attention_order: false,
    }
}

/// guided-diffusion's initialization of `UNetModel`, from `seed`, in sorted-name order: PyTorch's
/// defaults (convolution and linear weights and biases uniform in +-1/sqrt(fan_in), GroupNorm
/// weight 1 and bias 0, the label embedding ~ N(0, 1)), and zeros for the layers the reference
/// wraps in `zero_module` (each ResBlock's last convolution, each attention block's `proj_out`,
/// the final convolution `out.2`).
pub fn adm_unet_init(vars: &VarMap, seed: u64) -> Result<()> {
    crate::train::init::adm_init(vars, seed, &|layer| {
        layer.ends_with("out_layers.3") || layer.ends_with("proj_out") || layer == "out.2"
    })
}

/// An exponential moving average of named weights (guided-diffusion's `update_ema`:
/// `ema = ema * rate + weights * (1 - rate)`, starting from a copy of the weights).
pub struct Ema {
    pub rate: f64,
    /// By sorted name, as [`TrainableUNet::parameters`].
    pub tensors: Vec<(String, Tensor)>,
}

impl Ema {
    /// A copy of the current weights.
    pub fn new(rate: f64, params: &[(String, Var)]) -> Result<Self> {
        let tensors = params.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?))).collect::<Result<_>>()?;
        Ok(Self { rate, tensors })
    }

    /// One update towards `params` (the same names, in the same order).
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        for ((name, ema), (pname, p)) in self.tensors.iter_mut().zip(params) {
            debug_assert_eq!(name, pname);
            *ema = bigroc_models::optimizer_step::ema_update(ema, &p.as_tensor().detach(), self.rate)?;
        }
        Ok(())
    }

    /// As checkpoint tensors, `ema.<name>`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.tensors.iter().map(|(k, t)| (format!("ema.{k}"), t.clone())).collect()
    }

    /// Restores what [`Ema::state`] saved; every name must be present with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (name, t) in self.tensors.iter_mut() {
            let saved = state.get(&format!("ema.{name}")).with_context(|| format!("missing `ema.{name}`"))?;
            ensure!(saved.dims() == t.dims(), "`ema.{name}` has shape {:?}, the parameter {:?}", saved.dims(), t.dims());
            *t = saved.to_dtype(t.dtype())?.to_device(t.device())?;
        }
        Ok(())
    }
}

/// A UNet being trained: its variables and the network built on them.
pub struct TrainableUNet {
    pub vars: VarMap,
    pub model: UNetModel,
}

impl TrainableUNet {
    /// A freshly initialized network ([`adm_unet_init`] from `seed`), in f32.
    pub fn new(config: &UNetConfig, seed: u64, device: &Device) -> Result<Self> {
        if config.dropout != 0.0 {
            bail!("dropout {} is not supported in training", config.dropout)
        }
        let vars = VarMap::new();
        let model = UNetModel::new(config, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        adm_unet_init(&vars, seed)?;
        Ok(Self { vars, model })
    }

    /// Every variable, by sorted name (all are trained).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let data = self.vars.data().lock().expect("var map lock");
        let mut params: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// The per-image terms of guided-diffusion's `training_losses` (each of shape (N)).
pub struct LossTerms {
    /// mean over pixels of (noise - predicted noise)^2.
    pub mse: Tensor,
    /// The variational bound term in bits per dimension (KL to the posterior, or the decoder
    /// NLL at t = 0), with the mean's gradient stopped; absent without a learned variance.
    pub vb: Option<Tensor>,
    /// mse + vb.
    pub loss: Tensor,
}

/// `arr[t_i]` per example as an (N, 1, 1, 1) f32 tensor (the reference's `_extract_into_tensor`).
fn per_example(arr: &[f64], t: &[usize], device: &Device) -> Result<Tensor> {
    let vals: Vec<f32> = t.iter().map(|&i| arr[i] as f32).collect();
    Ok(Tensor::from_vec(vals, (t.len(), 1, 1, 1), device)?)
}

/// Mean over all but the first dimension.
fn mean_flat(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(1)?.mean(1)?)
}

/// KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise.
fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Result<Tensor> {
    let d = logvar2.broadcast_sub(logvar1)?;
    let ratio = logvar1.broadcast_sub(logvar2)?.exp()?;
    let sq = (mean1 - mean2)?.sqr()?.mul(&logvar2.neg()?.exp()?)?;
    Ok(((d + ratio)? + sq)?.affine(0.5, -0.5)?)
}

/// The standard normal CDF's tanh approximation used by the reference.
fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let cube = (x.sqr()? * x)?;
    let inner = ((x + (cube * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    Ok(inner.tanh()?.affine(0.5, 0.5)?)
}

/// log-likelihood (nats) of images `x` in [-1, 1], discretized to 256 levels, under
/// N(means, e^(2 log_scales)); the edge levels take the tails.
fn discretized_gaussian_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Result<Tensor> {
    let centered = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let cdf_plus = approx_standard_normal_cdf(&(&inv_stdv * (&centered + 1.0 / 255.0)?)?)?;
    let cdf_min = approx_standard_normal_cdf(&(&inv_stdv * (&centered - 1.0 / 255.0)?)?)?;
    let log_cdf_plus = cdf_plus.maximum(1e-12)?.log()?;
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.maximum(1e-12)?.log()?;
    let log_cdf_delta = (&cdf_plus - &cdf_min)?.maximum(1e-12)?.log()?;
    let high = x.gt(0.999)?.where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?;
    Ok(x.lt(-0.999)?.where_cond(&log_cdf_plus, &high)?)
}

/// The per-image hybrid loss of guided-diffusion's `GaussianDiffusion.training_losses` (loss
/// type MSE or RESCALED_MSE, epsilon prediction) from the network's output at (x_t, t): the MSE of
/// the predicted noise, plus with a learned variance the VB term `_vb_terms_bpd` computed on the
/// output with its epsilon half detached (the variance learns from the bound, the mean does not),
/// times `steps / 1000` when `rescale_learned_sigmas`.
pub fn training_losses(
    diffusion: &GaussianDiffusion,
    rescale_learned_sigmas: bool,
    model_output: &Tensor,
    x_start: &Tensor,
    x_t: &Tensor,
    t: &[usize],
    noise: &Tensor,
) -> Result<LossTerms> {
    let (n, c) = (x_start.dim(0)?, x_start.dim(1)?);
    ensure!(t.len() == n, "{} timesteps for a batch of {n}", t.len());
    ensure!(t.iter().all(|&ti| ti < diffusion.num_timesteps()), "a timestep is out of range");
    let dev = x_start.device();
    let learned = model_output.dim(1)? == 2 * c;
    let eps = model_output.narrow(1, 0, c)?;
    let mse = mean_flat(&(noise - &eps)?.sqr()?)?;
    let vb = if learned {
        let v = model_output.narrow(1, c, c)?;
        let coef = |arr: &[f64]| per_example(arr, t, dev);
        let (coef1, coef2) = (coef(&diffusion.posterior_mean_coef1)?, coef(&diffusion.posterior_mean_coef2)?);
        let posterior_mean = |x0: &Tensor| -> Result<Tensor> { Ok((x0.broadcast_mul(&coef1)? + x_t.broadcast_mul(&coef2)?)?) };
        // The reverse process p(x_{t-1} | x_t) with the detached mean and the learned variance.
        let eps = eps.detach();
        let pred_xstart = (x_t.broadcast_mul(&coef(&diffusion.sqrt_recip_alphas_cumprod)?)?
            - eps.broadcast_mul(&coef(&diffusion.sqrt_recipm1_alphas_cumprod)?)?)?;
        let model_mean = posterior_mean(&pred_xstart)?;
        let min_log = coef(&diffusion.posterior_log_variance_clipped)?;
        let log_betas: Vec<f64> = diffusion.betas.iter().map(|b| b.ln()).collect();
        let max_log = coef(&log_betas)?;
        let frac = ((v + 1.0)? / 2.0)?;
        let model_log_var = (frac.broadcast_mul(&max_log)? + frac.affine(-1.0, 1.0)?.broadcast_mul(&min_log)?)?;
        // The true posterior q(x_{t-1} | x_t, x_0).
        let true_mean = posterior_mean(x_start)?;
        let true_log_var = min_log.broadcast_as(x_start.shape())?;
        let ln2 = std::f64::consts::LN_2;
        let kl = (mean_flat(&normal_kl(&true_mean, &true_log_var, &model_mean, &model_log_var)?)? / ln2)?;
        let nll = discretized_gaussian_log_likelihood(x_start, &model_mean, &(&model_log_var * 0.5)?)?;
        let decoder_nll = (mean_flat(&nll.neg()?)? / ln2)?;
        let first: Vec<u8> = t.iter().map(|&ti| u8::from(ti == 0)).collect();
        let vb = Tensor::from_vec(first, n, dev)?.where_cond(&decoder_nll, &kl)?;
        Some(if rescale_learned_sigmas { (vb * (diffusion.num_timesteps() as f64 / 1000.0))? } else { vb })
    } else {
        None
    };
    let loss = match &vb {
        Some(vb) => (&mse + vb)?,
        None => mse.clone(),
    };
    Ok(LossTerms { mse, vb, loss })
}

/// The timesteps as the network receives them: (N) f32 (rescaled when the diffusion says so).
pub fn model_timesteps(diffusion: &GaussianDiffusion, t: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = t.iter().map(|&ti| diffusion.model_timestep(ti)).collect();
    Ok(Tensor::from_vec(v, t.len(), device)?)
}

/// The loss terms of one batch, differentiable in the weights: network output at (x_t, t, y),
/// then [`training_losses`].
pub fn batch_losses(
    net: &TrainableUNet,
    diffusion: &GaussianDiffusion,
    rescale_learned_sigmas: bool,
    x_start: &Tensor,
    t: &[usize],
    noise: &Tensor,
    y: Option<&Tensor>,
) -> Result<LossTerms> {
    let x_t = diffusion.q_sample(x_start, t, noise)?;
    let out = net.model.forward(&x_t, &model_timesteps(diffusion, t, x_start.device())?, y)?;
    training_losses(diffusion, rescale_learned_sigmas, &out, x_start, &x_t, t, noise)
}

/// A seed for the random draws of one (seed, index) (splitmix64).
fn seed_of(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ 0x6469_6666u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One timestep per image (uniform over `steps`) and N(0, 1) noise of `shape`, from `seed`.
fn draw_timesteps_and_noise(seed: u64, n: usize, steps: usize, shape: &[usize], device: &Device) -> Result<(Vec<usize>, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t: Vec<usize> = (0..n).map(|_| rng.random_range(0..steps)).collect();
    let count: usize = shape.iter().product();
    let noise: Vec<f32> = (0..count).map(|_| rng.sample(StandardNormal)).collect();
    Ok((t, Tensor::from_vec(noise, shape, &Device::Cpu)?.to_device(device)?))
}

fn validate(cfg: &DiffusionTraining, train: &ImageSet) -> Result<()> {
    train.validate("training data")?;
    let m = &cfg.model;
    ensure!(
        train.height == m.image_size && train.width == m.image_size,
        "the training images are {}x{}, the UNet takes {}x{}",
        train.width, train.height, m.image_size, m.image_size
    );
    ensure!(m.in_channels == 3, "the UNet must take 3 channels, not {}", m.in_channels);
    ensure!(m.out_channels == 3 || m.out_channels == 6, "the UNet must output 3 or 6 (learned sigma) channels, not {}", m.out_channels);
    if let Some(n) = m.num_classes {
        ensure!(train.classes.len() <= n, "the training data has {} classes, the UNet {n}", train.classes.len());
    }
    ensure!(cfg.batch_size > 0 && cfg.iterations > 0, "--batch-size and --iterations must be positive");
    ensure!((0.0..=1.0).contains(&cfg.ema_rate), "--ema-rate {} is outside [0, 1]", cfg.ema_rate);
    Ok(())
}

/// Trains (or resumes training) on `train`; the weights are left in `net` and their average in
/// `ema` (which must start as [`Ema::new`] of `net`'s fresh weights). `opts.test` is unused.
pub fn train_diffusion(cfg: &DiffusionTraining, train: &ImageSet, net: &TrainableUNet, ema: &mut Ema, opts: &RunOptions) -> Result<TrainReport> {
    validate(cfg, train)?;
    let diffusion = cfg.diffusion()?;
    let params = net.parameters();
    let mut opt = Optimizer::new(cfg.optimizer, params.clone());
    let start = if opts.resume && opts.work_dir.checkpoint_path().exists() {
        let (p, extra) = opts.work_dir.restore_with_extra(cfg, &net.vars, &mut opt, &opts.device)?;
        ema.load_state(&extra).with_context(|| format!("{}: EMA weights", opts.work_dir.checkpoint_path().display()))?;
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
    let (mut sum_loss, mut sum_mse, mut sum_vb, mut seen) = (0f64, 0f64, 0f64, 0usize);
    let mut last_loss = None;
    let mut order: Option<(usize, Vec<usize>)> = None;
    let save = |step: usize, opt: &Optimizer, ema: &Ema| {
        let position = Position { step, epoch: step / per_epoch, batch: step % per_epoch };
        opts.work_dir.save_with_extra(cfg, position, &net.vars, opt, &ema.state())
    };
    for step in start.step..total {
        if opts.stops_before(step, began) {
            save(step, &opt, ema)?;
            bar.abandon();
            return Ok(TrainReport { steps: step, finished: false, seconds: began.elapsed().as_secs_f64(), last_loss, test_accuracy: None });
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
        let (x, y) = if cfg.flip {
            augmented_batch(train, indices, 0, cfg.seed, epoch, b, &opts.device)?
        } else {
            train.batch(indices, &opts.device)?
        };
        let x0 = x.affine(2.0, -1.0)?;
        let (t, noise) = draw_timesteps_and_noise(seed_of(cfg.seed, step as u64), indices.len(), diffusion.num_timesteps(), x0.dims(), &opts.device)?;
        let y = cfg.model.num_classes.map(|_| y);
        let terms = batch_losses(net, &diffusion, cfg.rescale_learned_sigmas, &x0, &t, &noise, y.as_ref())?;
        let loss = terms.loss.mean_all()?;
        opt.step(&loss.backward()?, lr)?;
        ema.update(&params)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            bail!("the training loss became {loss_value} at iteration {step}: lower --lr")
        }
        let k = indices.len() as f64;
        sum_loss += loss_value * k;
        sum_mse += terms.mse.detach().mean_all()?.to_scalar::<f32>()? as f64 * k;
        if let Some(vb) = &terms.vb {
            sum_vb += vb.detach().mean_all()?.to_scalar::<f32>()? as f64 * k;
        }
        seen += indices.len();
        last_loss = Some(loss_value);
        let done = step + 1;
        bar.inc(1);
        if done % opts.log_every.max(1) == 0 || done == total {
            let rate = seen as f64 / window.elapsed().as_secs_f64().max(1e-9);
            let (loss, mse, vb) = (sum_loss / seen as f64, sum_mse / seen as f64, sum_vb / seen as f64);
            bar.set_message(format!("loss {loss:.4} mse {mse:.4} vb {vb:.4} {rate:.0} img/s"));
            if bar.is_hidden() {
                tracing::info!("iteration {done}/{total} lr {lr:.2e} loss {loss:.4} mse {mse:.4} vb {vb:.4} {rate:.1} img/s");
            }
            let mut record = json!({"step": done, "epoch": epoch, "lr": lr, "loss": loss, "mse": mse, "images_per_s": rate});
            if cfg.learn_sigma() {
                record["vb"] = json!(vb);
            }
            metrics.write(record)?;
            (sum_loss, sum_mse, sum_vb, seen) = (0.0, 0.0, 0.0, 0);
            window = Instant::now();
        }
        if done % opts.checkpoint_every.max(1) == 0 || done == total {
            save(done, &opt, ema)?;
        }
    }
    bar.finish_and_clear();
    Ok(TrainReport { steps: total, finished: true, seconds: began.elapsed().as_secs_f64(), last_loss, test_accuracy: None })
}

/// Starts `net` from the `adm-unet` weights file at `path` (e.g. the EMA weights a stopped run wrote
/// on another machine), which must be made for `cfg`'s network and diffusion. Create the [`Ema`]
/// afterwards, so that it starts from these weights.
pub fn warm_start(net: &TrainableUNet, cfg: &DiffusionTraining, path: &std::path::Path, device: &Device) -> Result<()> {
    let file = UNetFileConfig { model: cfg.model.clone(), diffusion: cfg.diffusion_config() };
    crate::train::state::warm_start(&net.vars, path, UNET_KIND, &serde_json::to_value(&file)?, device)
}

/// Writes the EMA weights as the `adm-unet` file `bigroc sample --model` reads (f16 storage with
/// `half`; the configuration records the network and its diffusion, `info.flags` the run).
pub fn save_unet(
    path: &std::path::Path,
    cfg: &DiffusionTraining,
    ema: &Ema,
    classes: &[String],
    dataset: Option<String>,
    provenance: String,
    half: bool,
) -> Result<()> {
    let info = AdmInfo {
        classes: if cfg.model.num_classes == Some(classes.len()) { classes.to_vec() } else { Vec::new() },
        dataset,
        preset: None,
        training: None,
        flags: serde_json::to_value(cfg)?,
        provenance: Some(provenance),
    };
    let file = UNetFileConfig { model: cfg.model.clone(), diffusion: cfg.diffusion_config() };
    let tensors: HashMap<String, Tensor> = ema
        .tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), if half { t.to_dtype(DType::F16)? } else { t.clone() })))
        .collect::<Result<_>>()?;
    crate::weights::save(path, &DiffusionModel::header(&file, &info), &tensors).with_context(|| format!("writing {}", path.display()))
}
