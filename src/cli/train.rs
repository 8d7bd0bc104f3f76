//! `bigroc train classifier`: flags in, [`bigroc::train::classifier`] out.

use std::path::PathBuf;

use anyhow::{bail, Result};
use bigroc::refine::{Norm, PgdConfig};
use bigroc::train::batches::ImageSet;
use bigroc::train::classifier::{save_classifier, train_classifier, ClassifierTraining, RunOptions, TrainableResNet, CHECKPOINT_KIND};
use bigroc::train::optim::{OptimizerConfig, OptimizerKind};
use bigroc::train::schedule::LrSchedule;
use bigroc::train::state::WorkDir;
use bigroc_models::resnet::ResNetConfig;
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
    /// Checkpoints and metrics.jsonl (default: OUTPUT with `.train` appended).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Continue the run whose checkpoint is in the work directory.
    #[arg(long)]
    pub resume: bool,
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
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// On CUDA, let f32 matrix products use TF32 tensor cores (faster, ~1e-3 relative rounding).
    #[arg(long)]
    pub tf32: bool,
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
    /// Stop (with a checkpoint) after this many iterations in total; --resume continues.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Store the final weights as f16 (half the size; computation stays f32).
    #[arg(long)]
    pub half: bool,
    /// Dataset name recorded in the weights file.
    #[arg(long, default_value = "cifar10")]
    pub dataset_name: String,
}

pub fn run(args: TrainArgs) -> Result<()> {
    match args.what {
        TrainCommand::Classifier(a) => classifier(a),
    }
}

fn classifier(a: ClassifierArgs) -> Result<()> {
    let device = bigroc::device::parse_device(&a.device)?;
    bigroc::device::allow_tf32(a.tf32);
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
    let work_dir = a.work_dir.clone().unwrap_or_else(|| {
        let mut p = a.output.clone().into_os_string();
        p.push(".train");
        p.into()
    });
    let work = WorkDir::open(&work_dir, CHECKPOINT_KIND, a.resume)?;
    let net = TrainableResNet::new(&cfg.model, cfg.seed, &device)?;
    tracing::info!(
        "training ResNet-{} (width x{}) on {} images of {} classes, {} epochs of {} steps, {}",
        a.depth, a.width, train.len(), train.classes.len(), cfg.epochs, cfg.steps_per_epoch(train.len()),
        match &cfg.attack { Some(p) => format!("adversarial: {:?} eps {} step {} x{}", p.norm, p.eps, p.step_size, p.steps), None => "standard".into() }
    );
    let report = train_classifier(&cfg, &train, &net, &RunOptions {
        device: device.clone(),
        work_dir: &work,
        resume: a.resume,
        checkpoint_every: a.checkpoint_every,
        log_every: a.log_every,
        test: test.as_ref(),
        stop_after: a.stop_after,
        progress: true,
    })?;
    if !report.finished {
        eprintln!("stopped after {} steps ({:.0} s); checkpoint in {}: rerun with --resume to continue", report.steps, report.seconds, work.dir.display());
        return Ok(());
    }
    let provenance = format!(
        "bigroc {} train classifier: {} on {}, {} epochs, {:.0} s this session on {:?}",
        env!("CARGO_PKG_VERSION"),
        serde_json::to_string(&cfg)?,
        a.data.display(),
        cfg.epochs,
        report.seconds,
        device.location()
    );
    save_classifier(&a.output, &cfg, &net, &train.classes, Some(a.dataset_name), 32, provenance, a.half)?;
    println!("wrote {} ({} steps, {:.0} s{})", a.output.display(), report.steps, report.seconds,
        report.test_accuracy.map(|t| format!(", clean test accuracy {:.2}%", 100.0 * t)).unwrap_or_default());
    Ok(())
}
