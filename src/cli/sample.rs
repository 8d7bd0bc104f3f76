//! `bigroc sample`: class-conditional diffusion sampling guided by a (robust) time-dependent
//! classifier.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};

use bigroc::diffusion::job::{ClassChoice, GuidanceKind, SampleJob, SamplerKind};
use bigroc::shard::Shard;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Which time-dependent classifier guides: robust or vanilla (the model family's embedded
    /// default, or --classifier), or none.
    #[arg(long, value_enum, default_value_t = GuidanceKind::Robust)]
    guidance: GuidanceKind,
    /// Guidance scale; default: the robust-guidance paper's, 1.0 robust, 0.5 vanilla.
    #[arg(long)]
    scale: Option<f64>,
    /// Diffusion model weights (.safetensors or hf://...); default: the embedded one.
    #[arg(long)]
    model: Option<String>,
    /// Time-dependent classifier weights; default: the embedded robust/vanilla one.
    #[arg(long)]
    classifier: Option<String>,
    /// Number of images (of the whole run, before --shard).
    #[arg(long, default_value_t = 16)]
    num: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Classes: all (image i gets class i mod K), random, or a comma-separated list of class
    /// indices or names (cycled).
    #[arg(long, default_value = "all")]
    classes: ClassChoice,
    /// guided-diffusion's timestep respacing: 250 (the paper's), ddimK, or section counts
    /// like 50,50,50,50.
    #[arg(long, default_value = "250")]
    timestep_respacing: String,
    /// Reverse process; default: ddim when the respacing is ddimK, else ancestral.
    #[arg(long, value_enum)]
    sampler: Option<SamplerKind>,
    /// DDIM stochasticity (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the per-image noise streams (an image's noise does not depend on batching).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Start from x_T in an .npz (`arr_0` float32 NCHW, one per image) instead of seeded noise.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// An .npz (`arr_0` uint8 NHWC, `arr_1` labels) or a folder of PNGs (CLASS/NNNNNN.png).
    #[arg(long)]
    output: PathBuf,
    /// Also save a PNG of (up to) the first 64 samples.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Save the predicted x0 of the first images at evenly spaced steps: a PNG grid (rows are
    /// images, the final sample last) or an .npz.
    #[arg(long)]
    save_trajectory: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    trajectory_steps: usize,
    #[arg(long, default_value_t = 8)]
    trajectory_images: usize,
    /// Sample only slice K of N (K from 0) of the run's batches; `bigroc merge` joins the shards.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Keep predicted x0 unclipped (guided-diffusion clips to [-1, 1] by default).
    #[arg(long)]
    no_clip_denoised: bool,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the networks' convolutions (f16/bf16 for CUDA; norms and softmax stay f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Write the run's summary as JSON here.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

pub fn run(a: SampleArgs) -> Result<()> {
    let device = bigroc::device::parse_device(&a.device)?;
    let classifier = match a.guidance {
        GuidanceKind::None => {
            if let Some(c) = &a.classifier {
                bail!("--classifier {c} given with --guidance none");
            }
            None
        }
        g => Some(bigroc::defaults::time_classifier_spec(a.classifier, g == GuidanceKind::Robust)?),
    };
    let sampler = a.sampler.unwrap_or(if a.timestep_respacing.starts_with("ddim") {
        SamplerKind::Ddim
    } else {
        SamplerKind::Ancestral
    });
    let job = SampleJob {
        model: bigroc::defaults::diffusion_model_spec(a.model)?,
        classifier,
        guidance: a.guidance,
        scale: a.scale.unwrap_or(a.guidance.paper_scale()),
        num: a.num,
        batch_size: a.batch_size,
        classes: a.classes,
        timestep_respacing: a.timestep_respacing,
        sampler,
        eta: a.eta,
        seed: a.seed,
        init_noise: a.init_noise,
        output: a.output,
        grid: a.grid,
        trajectory: a.save_trajectory,
        trajectory_steps: a.trajectory_steps,
        trajectory_images: a.trajectory_images,
        shard: a.shard,
        dtype: match a.dtype {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        },
        clip_denoised: !a.no_clip_denoised,
    };
    let s = job.run(&device)?;
    println!(
        "sampled {} images ({} in this run, {} steps each) into {} in {:.1} s ({:.3} img/s)",
        s.images,
        s.sampled_now,
        s.steps,
        s.output.display(),
        s.seconds,
        s.sampled_now as f64 / s.seconds.max(1e-9)
    );
    if let Some(path) = a.summary_json {
        bigroc::output::atomic_write(&path, |tmp| Ok(std::fs::write(tmp, serde_json::to_string_pretty(&s)?)?))?;
    }
    Ok(())
}
