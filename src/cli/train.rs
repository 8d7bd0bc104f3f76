//! `bigroc train classifier`, `bigroc train timed-classifier` and `bigroc train diffusion`: flags
//! in, [`bigroc::train::classifier`] / [`bigroc::train::timed_classifier`] /
//! [`bigroc::train::diffusion`] out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use bigroc::adm::{create_classifier, ClassifierFlags};
use bigroc::refine::{Norm, PgdConfig};
use bigroc::train::batches::ImageSet;
use bigroc::train::early_stop_pgd::EarlyStopPgd;
use bigroc::train::classifier::{save_classifier, train_classifier, ClassifierTraining, RunOptions, TrainReport, TrainableResNet, CHECKPOINT_KIND};
use bigroc::train::optim::{OptimizerConfig, OptimizerKind};
use bigroc::train::schedule::LrSchedule;
use bigroc::train::state::WorkDir;
use bigroc_models::resnet::ResNetConfig;
use candle_core::Device;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub what: TrainCommand,
}

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a CIFAR-layout ResNet, standard or adversarial (robustness' scheme).
    Classifier(ClassifierArgs),
    /// Train an ADM time-dependent classifier p(y | x_t, t) for classifier guidance: vanilla
    /// (guided-diffusion's classifier_train.py) or robust (--adversarial: the robust-guidance
    /// paper's early-stopping PGD on x_t).
    TimedClassifier(TimedClassifierArgs),
    /// Train an ADM diffusion UNet (class-conditional, learned sigma by default) with
    /// improved-diffusion's hybrid loss and an EMA of the weights; writes the EMA weights for
    /// `sample --model`.
    Diffusion(DiffusionArgs),
}

#[derive(Debug, Args)]
pub struct ClassifierArgs {
    /// Training images: an ImageFolder directory or .tar, or CIFAR-10 binary/python batches.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out images whose clean accuracy is measured after every epoch.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// The trained classifier (self-describing safetensors), written when training ends.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub run: RunFlags,
    /// ResNet depth (18, 34, 50, 101, 152).
    #[arg(long, default_value_t = 18)]
    pub depth: usize,
    /// Width multiplier (robustness' `wm`): stage widths 64, 128, 256, 512 times this.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    #[arg(long, default_value_t = 150)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// constant, cosine, linear or step:EPOCHS:GAMMA (robustness' CIFAR default: step:50:0.1).
    #[arg(long, default_value = "step:50:0.1", value_parser = LrSchedule::parse)]
    pub schedule: LrSchedule,
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Train on untargeted PGD examples (adversarial training).
    #[arg(long)]
    pub adversarial: bool,
    #[arg(long, value_enum, default_value_t = Norm::L2)]
    pub attack_norm: Norm,
    /// Attack radius, pixels in [0, 1] (the published robust CIFAR-10 ResNet-50: L2 0.5).
    #[arg(long, default_value_t = 0.5)]
    pub eps: f64,
    /// Attack step size (robustness' `attack_lr`).
    #[arg(long, default_value_t = 0.1)]
    pub attack_step: f64,
    #[arg(long, default_value_t = 7)]
    pub attack_steps: usize,
    /// Random-crop padding in pixels (0 disables the crop; flips stay).
    #[arg(long, default_value_t = 4)]
    pub crop_padding: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
}

/// Flags every trainer shares: where the run keeps its state, when it stops, where it runs, and
/// how the weights are stored.
#[derive(Debug, Args)]
pub struct RunFlags {
    /// Checkpoints and metrics.jsonl (default: OUTPUT with `.train` appended).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Continue the run whose checkpoint is in the work directory.
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many iterations in total; --resume continues.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Stop (with a checkpoint) after this many minutes of this process, e.g. to fit a GPU lease;
    /// --resume continues.
    #[arg(long, value_parser = parse_minutes)]
    pub stop_after_minutes: Option<Duration>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// On CUDA, let f32 matrix products use TF32 tensor cores (faster, ~1e-3 relative rounding).
    #[arg(long)]
    pub tf32: bool,
    /// Store the final weights as f16 (half the size; computation stays f32).
    #[arg(long)]
    pub half: bool,
    /// Dataset name recorded in the weights file.
    #[arg(long, default_value = "cifar10")]
    pub dataset_name: String,
}

fn parse_minutes(text: &str) -> std::result::Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(m) if m.is_finite() && m >= 0.0 => Ok(Duration::from_secs_f64(m * 60.0)),
        _ => Err(format!("`{text}` is not a number of minutes (e.g. 25 or 0.5)")),
    }
}

impl RunFlags {
    /// The device to train on (TF32 allowed or not, as asked).
    fn device(&self) -> Result<Device> {
        let device = bigroc::device::parse_device(&self.device)?;
        bigroc::device::allow_tf32(self.tf32);
        Ok(device)
    }

    /// The work directory for a run writing `output`, opened for a checkpoint of `kind`.
    fn work_dir(&self, output: &Path, kind: &str) -> Result<WorkDir> {
        let dir = self.work_dir.clone().unwrap_or_else(|| {
            let mut p = output.as_os_str().to_owned();
            p.push(".train");
            p.into()
        });
        WorkDir::open(&dir, kind, self.resume)
    }

    fn options<'a>(&self, device: &Device, work_dir: &'a WorkDir, checkpoint_every: usize, log_every: usize, test: Option<&'a ImageSet>) -> RunOptions<'a> {
        RunOptions {
            device: device.clone(),
            work_dir,
            resume: self.resume,
            checkpoint_every,
            log_every,
            test,
            stop_after: self.stop_after,
            time_limit: self.stop_after_minutes,
            progress: true,
        }
    }
}

/// For the weights' provenance: the weights a warm-started run began from.
fn warm_note(init_from: Option<&Path>) -> String {
    init_from.map(|p| format!(", warm-started from {}", p.display())).unwrap_or_default()
}

/// For the weights' provenance: that a run stopped before its end (its weights are those so far).
fn stopped_note(report: &TrainReport, unit: &str) -> String {
    if report.finished { String::new() } else { format!(", stopped after {} {unit} (not finished)", report.steps) }
}

/// Says where a stopped run's checkpoint is.
fn tell_if_stopped(report: &TrainReport, work: &WorkDir, unit: &str) {
    if !report.finished {
        eprintln!("stopped after {} {unit} ({:.0} s), the weights so far written; checkpoint in {}: rerun with --resume to continue", report.steps, report.seconds, work.dir.display());
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    match args.what {
        TrainCommand::Classifier(a) => classifier(a),
        TrainCommand::TimedClassifier(a) => timed_classifier(a),
        TrainCommand::Diffusion(a) => diffusion(a),
    }
}

fn classifier(a: ClassifierArgs) -> Result<()> {
    let device = a.run.device()?;
    let train = ImageSet::open(&a.data)?;
    let test = a.test.as_deref().map(ImageSet::open).transpose()?;
    if let Some(t) = &test {
        if t.classes != train.classes {
            bail!("--test {} has classes {:?}, --data {:?}", a.test.as_ref().unwrap().display(), t.classes, train.classes)
        }
    }
    let mut model = ResNetConfig::cifar(a.depth, a.width, train.classes.len())?;
    if train.height != 32 || train.width != 32 {
        bail!("{}: the CIFAR-layout ResNet trains on 32x32 images, these are {}x{}", a.data.display(), train.width, train.height)
    }
    model.num_classes = train.classes.len();
    let optimizer = match a.optimizer {
        OptimizerKind::Sgd => OptimizerConfig::sgd(a.momentum, a.weight_decay),
        OptimizerKind::Adamw => OptimizerConfig::adamw(a.weight_decay),
    };
    let attack = a.adversarial.then_some(PgdConfig { norm: a.attack_norm, eps: a.eps, step_size: a.attack_step, steps: a.attack_steps, use_best: true });
    let cfg = ClassifierTraining {
        model,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        schedule: a.schedule,
        optimizer,
        attack,
        crop_padding: a.crop_padding,
        seed: a.seed,
    };
    let work = a.run.work_dir(&a.output, CHECKPOINT_KIND)?;
    let net = TrainableResNet::new(&cfg.model, cfg.seed, &device)?;
    tracing::info!(
        "training ResNet-{} (width x{}) on {} images of {} classes, {} epochs of {} steps, {}",
        a.depth, a.width, train.len(), train.classes.len(), cfg.epochs, cfg.steps_per_epoch(train.len()),
        match &cfg.attack { Some(p) => format!("adversarial: {:?} eps {} step {} x{}", p.norm, p.eps, p.step_size, p.steps), None => "standard".into() }
    );
    let report = train_classifier(&cfg, &train, &net, &a.run.options(&device, &work, a.checkpoint_every, a.log_every, test.as_ref()))?;
    let provenance = format!(
        "bigroc {} train classifier: {} on {}, {} epochs{}, {:.0} s this session on {:?}",
        env!("CARGO_PKG_VERSION"),
        serde_json::to_string(&cfg)?,
        a.data.display(),
        cfg.epochs,
        stopped_note(&report, "steps"),
        report.seconds,
        device.location()
    );
    save_classifier(&a.output, &cfg, &net, &train.classes, Some(a.run.dataset_name), 32, provenance, a.run.half)?;
    println!("wrote {} ({} steps, {:.0} s{})", a.output.display(), report.steps, report.seconds,
        report.test_accuracy.map(|t| format!(", clean test accuracy {:.2}%", 100.0 * t)).unwrap_or_default());
    tell_if_stopped(&report, &work, "steps");
    Ok(())
}

#[derive(Debug, Args)]
pub struct TimedClassifierArgs {
    /// Training images: an ImageFolder directory or .tar, or CIFAR-10 binary/python batches.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out images whose noisy accuracy (random t, no attack) is measured at every checkpoint.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// The trained classifier (self-describing safetensors for `sample --classifier`).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub run: RunFlags,
    /// Start from these weights (a file this trainer wrote, e.g. a stopped run's on another machine)
    /// instead of a fresh initialization; the optimizer and the schedule start afresh.
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Train on the paper's early-stopping L2 PGD examples of x_t (the robust classifier).
    #[arg(long)]
    pub adversarial: bool,
    /// Attack radius (L2) in the units of x_t, whose images are scaled to [-1, 1] (the paper's 0.5).
    #[arg(long, default_value_t = 0.5)]
    pub eps: f64,
    /// Attack step size (default eps / 6, the paper's; the official CIFAR-10 script used 2.5 eps / steps).
    #[arg(long)]
    pub attack_step: Option<f64>,
    #[arg(long, default_value_t = 7)]
    pub attack_steps: usize,
    /// Training iterations (batches); the learning rate anneals linearly to 0 over them.
    #[arg(long, default_value_t = 300_000)]
    pub iterations: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// constant, cosine, linear (guided-diffusion's --anneal_lr) or step:EPOCHS:GAMMA.
    #[arg(long, default_value = "linear", value_parser = LrSchedule::parse)]
    pub schedule: LrSchedule,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Steps of the diffusion whose noise levels the classifier learns.
    #[arg(long, default_value_t = 1000)]
    pub diffusion_steps: usize,
    /// linear or cosine.
    #[arg(long, default_value = "linear")]
    pub noise_schedule: bigroc::diffusion::NoiseSchedule,
    /// Channels of the first level (guided-diffusion's --classifier_width).
    #[arg(long, default_value_t = 32)]
    pub width: usize,
    /// ResBlocks per level (--classifier_depth).
    #[arg(long, default_value_t = 2)]
    pub depth: usize,
    /// Resolutions with self-attention (--classifier_attention_resolutions).
    #[arg(long, default_value = "16,8")]
    pub attention_resolutions: String,
    /// Channel multipliers per level (default: 1,2,2,4 for 32x32 as the paper's CIFAR-10
    /// classifier, else guided-diffusion's for the image size).
    #[arg(long)]
    pub channel_mult: Option<String>,
    /// adaptive, attention, spatial or spatial_v2 (--classifier_pool).
    #[arg(long, default_value = "attention")]
    pub pool: String,
    /// Random-crop padding in pixels (0 disables the crop; flips stay).
    #[arg(long, default_value_t = 4)]
    pub crop_padding: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint (and evaluate --test) every this many iterations.
    #[arg(long, default_value_t = 2000)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
}

fn timed_classifier(a: TimedClassifierArgs) -> Result<()> {
    use bigroc::train::timed_classifier as tc;
    let device = a.run.device()?;
    let train = ImageSet::open(&a.data)?;
    let test = a.test.as_deref().map(ImageSet::open).transpose()?;
    if let Some(t) = &test {
        if t.classes != train.classes || t.height != train.height || t.width != train.width {
            bail!("--test {}: its classes or image size differ from --data {}", a.test.as_ref().unwrap().display(), a.data.display())
        }
    }
    if train.height != train.width {
        bail!("{}: the classifier takes square images, these are {}x{}", a.data.display(), train.width, train.height)
    }
    let flags = ClassifierFlags {
        image_size: train.height,
        classifier_width: a.width,
        classifier_depth: a.depth,
        classifier_attention_resolutions: a.attention_resolutions.clone(),
        classifier_use_scale_shift_norm: true,
        classifier_resblock_updown: true,
        classifier_pool: a.pool.clone(),
        classifier_channel_mult: a.channel_mult.clone().unwrap_or_else(|| tc::default_channel_mult(train.height)),
        num_classes: train.classes.len(),
    };
    let model = create_classifier(&flags)?;
    let attack = a.adversarial.then(|| EarlyStopPgd { eps: a.eps, step_size: a.attack_step.unwrap_or(a.eps / 6.0), steps: a.attack_steps });
    let cfg = tc::TimedClassifierTraining {
        model,
        diffusion_steps: a.diffusion_steps,
        noise_schedule: a.noise_schedule,
        iterations: a.iterations,
        batch_size: a.batch_size,
        lr: a.lr,
        schedule: a.schedule,
        optimizer: OptimizerConfig::adamw(a.weight_decay),
        attack,
        crop_padding: a.crop_padding,
        seed: a.seed,
    };
    let work = a.run.work_dir(&a.output, tc::CHECKPOINT_KIND)?;
    let net = tc::TrainableTimeClassifier::new(&cfg.model, cfg.seed, &device)?;
    if let Some(path) = &a.init_from {
        tc::warm_start(&net, &cfg, path, &device)?;
    }
    let params: usize = net.parameters().iter().map(|(_, v)| v.elem_count()).sum();
    tracing::info!(
        "training a {0}x{0} time-dependent classifier ({params} parameters) on {1} images of {2} classes, {3} iterations of {4}, {5}",
        train.height, train.len(), train.classes.len(), cfg.iterations, cfg.batch_size,
        match &cfg.attack { Some(p) => format!("robust: L2 eps {} step {} x{} on x_t", p.eps, p.step_size, p.steps), None => "vanilla".into() }
    );
    let report = tc::train_timed_classifier(&cfg, &train, &net, &a.run.options(&device, &work, a.checkpoint_every, a.log_every, test.as_ref()))?;
    let provenance = format!(
        "bigroc {} train timed-classifier on {}{}, {} iterations{}, {:.0} s this session on {:?}",
        env!("CARGO_PKG_VERSION"),
        a.data.display(),
        warm_note(a.init_from.as_deref()),
        cfg.iterations,
        stopped_note(&report, "iterations"),
        report.seconds,
        device.location()
    );
    tc::save_time_classifier(&a.output, &cfg, &net, &train.classes, Some(a.run.dataset_name), provenance, a.run.half)?;
    println!("wrote {} ({} iterations, {:.0} s{})", a.output.display(), report.steps, report.seconds,
        report.test_accuracy.map(|t| format!(", noisy test accuracy {:.2}%", 100.0 * t)).unwrap_or_default());
    tell_if_stopped(&report, &work, "iterations");
    Ok(())
}

#[derive(Debug, Args)]
pub struct DiffusionArgs {
    /// Training images: an ImageFolder directory or .tar, or CIFAR-10 binary/python batches.
    #[arg(long)]
    pub data: PathBuf,
    /// The trained UNet's EMA weights (self-describing `adm-unet` safetensors for `sample --model`).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub run: RunFlags,
    /// Start from these weights (a file this trainer wrote, e.g. a stopped run's on another machine)
    /// instead of a fresh initialization; the optimizer and the schedule start afresh.
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Training iterations (batches).
    #[arg(long, default_value_t = 500_000)]
    pub iterations: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// AdamW learning rate (guided-diffusion's 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// constant (guided-diffusion's default), cosine, linear (--lr_anneal_steps) or step:EPOCHS:GAMMA.
    #[arg(long, default_value = "constant", value_parser = LrSchedule::parse)]
    pub schedule: LrSchedule,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Rate of the exponential moving average of the weights that is written out.
    #[arg(long, default_value_t = 0.9999)]
    pub ema_rate: f64,
    #[arg(long, default_value_t = 1000)]
    pub diffusion_steps: usize,
    /// linear or cosine.
    #[arg(long, default_value = "linear")]
    pub noise_schedule: bigroc::diffusion::NoiseSchedule,
    /// Feed the network t * 1000 / steps (improved-diffusion's --rescale_timesteps).
    #[arg(long)]
    pub rescale_timesteps: bool,
    /// Plain MSE + VB instead of RESCALED_MSE (VB times steps / 1000; identical at 1000 steps).
    #[arg(long)]
    pub no_rescale_learned_sigmas: bool,
    /// Fixed variance (3 output channels, MSE only) instead of the learned sigma.
    #[arg(long)]
    pub fixed_sigma: bool,
    /// Train without class labels (an unconditional UNet).
    #[arg(long)]
    pub unconditional: bool,
    /// Base channels (--num_channels); the other shape defaults make the small CIFAR-10 UNet.
    #[arg(long, default_value_t = 64)]
    pub num_channels: usize,
    #[arg(long, default_value_t = 2)]
    pub num_res_blocks: usize,
    #[arg(long, default_value = "1,2,2")]
    pub channel_mult: String,
    /// Resolutions with self-attention, comma-separated.
    #[arg(long, default_value = "16")]
    pub attention_resolutions: String,
    #[arg(long, default_value_t = 64)]
    pub num_head_channels: i64,
    #[arg(long, default_value_t = 4)]
    pub num_heads: usize,
    /// Use ResBlocks for up/downsampling instead of convolutions.
    #[arg(long)]
    pub resblock_updown: bool,
    /// No random horizontal flips (guided-diffusion's --random_flip False).
    #[arg(long)]
    pub no_flip: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint (weights, EMA, optimizer state) every this many iterations.
    #[arg(long, default_value_t = 10_000)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 100)]
    pub log_every: usize,
}

fn diffusion(a: DiffusionArgs) -> Result<()> {
    use bigroc::train::diffusion as td;
    let device = a.run.device()?;
    let train = ImageSet::open(&a.data)?;
    if train.height != train.width {
        bail!("{}: the UNet takes square images, these are {}x{}", a.data.display(), train.width, train.height)
    }
    let flags = bigroc::adm::ModelFlags {
        image_size: train.height,
        num_channels: a.num_channels,
        num_res_blocks: a.num_res_blocks,
        num_heads: a.num_heads,
        num_heads_upsample: -1,
        num_head_channels: a.num_head_channels,
        attention_resolutions: a.attention_resolutions.clone(),
        channel_mult: a.channel_mult.clone(),
        dropout: 0.0,
        class_cond: !a.unconditional,
        use_scale_shift_norm: true,
        resblock_updown: a.resblock_updown,
        use_new_attention_order: false,
        learn_sigma: !a.fixed_sigma,
        num_classes: train.classes.len(),
    };
    let model = bigroc::adm::create_model(&flags)?;
    let cfg = td::DiffusionTraining {
        model,
        diffusion_steps: a.diffusion_steps,
        noise_schedule: a.noise_schedule,
        rescale_timesteps: a.rescale_timesteps,
        rescale_learned_sigmas: !a.no_rescale_learned_sigmas,
        iterations: a.iterations,
        batch_size: a.batch_size,
        lr: a.lr,
        schedule: a.schedule,
        optimizer: OptimizerConfig::adamw(a.weight_decay),
        ema_rate: a.ema_rate,
        flip: !a.no_flip,
        seed: a.seed,
    };
    let work = a.run.work_dir(&a.output, td::CHECKPOINT_KIND)?;
    let net = td::TrainableUNet::new(&cfg.model, cfg.seed, &device)?;
    if let Some(path) = &a.init_from {
        td::warm_start(&net, &cfg, path, &device)?;
    }
    let mut ema = td::Ema::new(cfg.ema_rate, &net.parameters())?;
    tracing::info!(
        "training a {0}x{0} {1} diffusion UNet ({2} parameters{3}) on {4} images, {5} iterations of {6}",
        train.height,
        if cfg.model.num_classes.is_some() { "class-conditional" } else { "unconditional" },
        net.parameter_count(),
        if cfg.learn_sigma() { ", learned sigma, hybrid loss" } else { ", fixed sigma, MSE" },
        train.len(),
        cfg.iterations,
        cfg.batch_size
    );
    let report = td::train_diffusion(&cfg, &train, &net, &mut ema, &a.run.options(&device, &work, a.checkpoint_every, a.log_every, None))?;
    let provenance = format!(
        "bigroc {} train diffusion on {}{}, {} iterations{}, EMA rate {}, {:.0} s this session on {:?}",
        env!("CARGO_PKG_VERSION"),
        a.data.display(),
        warm_note(a.init_from.as_deref()),
        cfg.iterations,
        stopped_note(&report, "iterations"),
        cfg.ema_rate,
        report.seconds,
        device.location()
    );
    td::save_unet(&a.output, &cfg, &ema, &train.classes, Some(a.run.dataset_name), provenance, a.run.half)?;
    println!("wrote {} (EMA weights; {} iterations, {:.0} s, last loss {:.4})", a.output.display(), report.steps, report.seconds, report.last_loss.unwrap_or(f64::NAN));
    tell_if_stopped(&report, &work, "iterations");
    Ok(())
}
