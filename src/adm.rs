//! ADM model families: guided-diffusion's script-level model flags (`script_util.py`:
//! `create_model`, `create_classifier`, `create_gaussian_diffusion`) turned into network and
//! diffusion configurations, and presets for the published checkpoints.

use anyhow::{bail, ensure, Context, Result};
use bigroc_models::adm::{EncoderUNetConfig, Pool, UNetConfig};
use serde::{Deserialize, Serialize};

use crate::diffusion::{DiffusionConfig, NoiseSchedule};

/// guided-diffusion's `NUM_CLASSES` (ImageNet).
pub const IMAGENET_CLASSES: usize = 1000;

/// The diffusion model flags of guided-diffusion's scripts (`model_and_diffusion_defaults`),
/// same names and defaults. `num_classes` is not a script flag (the scripts hard-code 1000).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFlags {
    pub image_size: usize,
    pub num_channels: usize,
    pub num_res_blocks: usize,
    pub num_heads: usize,
    /// -1: same as `num_heads`.
    pub num_heads_upsample: i64,
    /// -1: use `num_heads` instead of a fixed width per head.
    pub num_head_channels: i64,
    /// Resolutions (not rates) with attention, comma-separated.
    pub attention_resolutions: String,
    /// Comma-separated multipliers; empty picks the default of `image_size`.
    pub channel_mult: String,
    pub dropout: f64,
    pub class_cond: bool,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_new_attention_order: bool,
    pub learn_sigma: bool,
    pub num_classes: usize,
}

impl Default for ModelFlags {
    fn default() -> Self {
        Self {
            image_size: 64,
            num_channels: 128,
            num_res_blocks: 2,
            num_heads: 4,
            num_heads_upsample: -1,
            num_head_channels: -1,
            attention_resolutions: "16,8".into(),
            channel_mult: String::new(),
            dropout: 0.0,
            class_cond: false,
            use_scale_shift_norm: true,
            resblock_updown: false,
            use_new_attention_order: false,
            learn_sigma: false,
            num_classes: IMAGENET_CLASSES,
        }
    }
}

/// The classifier flags of guided-diffusion's scripts (`classifier_defaults`), same names and
/// defaults, plus `num_classes` and `classifier_channel_mult` (not script flags: the scripts
/// hard-code 1000 classes and the multipliers of `image_size`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierFlags {
    pub image_size: usize,
    pub classifier_width: usize,
    pub classifier_depth: usize,
    pub classifier_attention_resolutions: String,
    pub classifier_use_scale_shift_norm: bool,
    pub classifier_resblock_updown: bool,
    pub classifier_pool: String,
    pub classifier_channel_mult: String,
    pub num_classes: usize,
}

impl Default for ClassifierFlags {
    fn default() -> Self {
        Self {
            image_size: 64,
            classifier_width: 128,
            classifier_depth: 2,
            classifier_attention_resolutions: "32,16,8".into(),
            classifier_use_scale_shift_norm: true,
            classifier_resblock_updown: true,
            classifier_pool: "attention".into(),
            classifier_channel_mult: String::new(),
            num_classes: IMAGENET_CLASSES,
        }
    }
}

/// The default channel multipliers of `image_size` (`create_model`/`create_classifier`), plus
/// improved-diffusion's (1, 2, 2, 2) for 32x32, which guided-diffusion lacks.
pub fn default_channel_mult(image_size: usize) -> Result<Vec<f64>> {
    Ok(match image_size {
        512 => vec![0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0],
        256 => vec![1.0, 1.0, 2.0, 2.0, 4.0, 4.0],
        128 => vec![1.0, 1.0, 2.0, 3.0, 4.0],
        64 => vec![1.0, 2.0, 3.0, 4.0],
        32 => vec![1.0, 2.0, 2.0, 2.0],
        other => bail!("unsupported image size {other} (expected 32, 64, 128, 256 or 512)"),
    })
}

fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("--{flag}: '{v}' is not a number"))
        })
        .collect()
}

fn channel_mult(flag: &str, s: &str, image_size: usize) -> Result<Vec<f64>> {
    if s.is_empty() {
        default_channel_mult(image_size)
    } else {
        parse_list(flag, s)
    }
}

/// Resolutions to downsampling rates (`image_size // res`).
fn attention_rates(flag: &str, s: &str, image_size: usize) -> Result<Vec<usize>> {
    parse_list::<usize>(flag, s)?
        .into_iter()
        .map(|r| {
            ensure!(r > 0 && r <= image_size, "--{flag}: resolution {r} is not in 1..={image_size}");
            Ok(image_size / r)
        })
        .collect()
}

fn heads(v: i64) -> Option<usize> {
    (v > 0).then_some(v as usize)
}

/// `create_model`: the UNet of the given flags.
pub fn create_model(f: &ModelFlags) -> Result<UNetConfig> {
    Ok(UNetConfig {
        image_size: f.image_size,
        in_channels: 3,
        model_channels: f.num_channels,
        out_channels: if f.learn_sigma { 6 } else { 3 },
        num_res_blocks: f.num_res_blocks,
        attention_resolutions: attention_rates(
            "attention_resolutions",
            &f.attention_resolutions,
            f.image_size,
        )?,
        dropout: f.dropout,
        channel_mult: channel_mult("channel_mult", &f.channel_mult, f.image_size)?,
        conv_resample: true,
        num_classes: f.class_cond.then_some(f.num_classes),
        num_heads: f.num_heads,
        num_head_channels: heads(f.num_head_channels),
        num_heads_upsample: heads(f.num_heads_upsample),
        use_scale_shift_norm: f.use_scale_shift_norm,
        resblock_updown: f.resblock_updown,
        use_new_attention_order: f.use_new_attention_order,
    })
}

/// `create_classifier`: the time-dependent classifier of the given flags (64 channels per
/// attention head, as the script fixes).
pub fn create_classifier(f: &ClassifierFlags) -> Result<EncoderUNetConfig> {
    let pool: Pool = f
        .classifier_pool
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--classifier_pool: {e}"))?;
    Ok(EncoderUNetConfig {
        image_size: f.image_size,
        in_channels: 3,
        model_channels: f.classifier_width,
        out_channels: f.num_classes,
        num_res_blocks: f.classifier_depth,
        attention_resolutions: attention_rates(
            "classifier_attention_resolutions",
            &f.classifier_attention_resolutions,
            f.image_size,
        )?,
        dropout: 0.0,
        channel_mult: channel_mult("classifier_channel_mult", &f.classifier_channel_mult, f.image_size)?,
        conv_resample: true,
        num_heads: 1,
        num_head_channels: Some(64),
        use_scale_shift_norm: f.classifier_use_scale_shift_norm,
        resblock_updown: f.classifier_resblock_updown,
        use_new_attention_order: false,
        pool,
    })
}

/// A published model family: its diffusion model, its time-dependent classifier, the diffusion
/// it was trained with, and the robust-guidance paper's sampling settings.
#[derive(Debug, Clone)]
pub struct AdmPreset {
    pub name: &'static str,
    pub description: &'static str,
    pub model: ModelFlags,
    pub classifier: ClassifierFlags,
    pub diffusion: DiffusionConfig,
    /// Paper setting: respaced steps for sampling.
    pub timestep_respacing: &'static str,
    /// Paper setting: guidance scale with the robust classifier.
    pub robust_scale: f64,
    /// Paper setting: guidance scale with the vanilla classifier.
    pub vanilla_scale: f64,
}

impl AdmPreset {
    pub fn unet(&self) -> Result<UNetConfig> {
        create_model(&self.model)
    }

    pub fn classifier(&self) -> Result<EncoderUNetConfig> {
        create_classifier(&self.classifier)
    }
}

/// The names [`preset`] accepts.
pub const PRESET_NAMES: [&str; 3] = ["adm128", "adm256", "cifar10"];

/// The presets of the published configurations (flags exactly as published).
pub fn preset(name: &str) -> Result<AdmPreset> {
    let imagenet_diffusion = DiffusionConfig {
        steps: 1000,
        noise_schedule: NoiseSchedule::Linear,
        learn_sigma: true,
        ..Default::default()
    };
    let adm128_model = ModelFlags {
        image_size: 128,
        num_channels: 256,
        num_res_blocks: 2,
        attention_resolutions: "32,16,8".into(),
        num_heads: 4,
        resblock_updown: true,
        use_scale_shift_norm: true,
        learn_sigma: true,
        class_cond: true,
        ..Default::default()
    };
    let adm128_classifier = ClassifierFlags {
        image_size: 128,
        classifier_width: 128,
        classifier_depth: 2,
        classifier_attention_resolutions: "32,16,8".into(),
        classifier_pool: "attention".into(),
        classifier_resblock_updown: true,
        classifier_use_scale_shift_norm: true,
        ..Default::default()
    };
    Ok(match name {
        "adm128" => AdmPreset {
            name: "adm128",
            description: "ADM ImageNet 128x128 class-conditional diffusion (128x128_diffusion.pt) and its classifier (128x128_classifier.pt)",
            model: adm128_model,
            classifier: adm128_classifier,
            diffusion: imagenet_diffusion,
            timestep_respacing: "250",
            robust_scale: 1.0,
            vanilla_scale: 0.5,
        },
        "adm256" => AdmPreset {
            name: "adm256",
            description: "ADM ImageNet 256x256 class-conditional diffusion (256x256_diffusion.pt) and its classifier (256x256_classifier.pt)",
            model: ModelFlags {
                image_size: 256,
                num_head_channels: 64,
                ..adm128_model
            },
            classifier: ClassifierFlags {
                image_size: 256,
                ..adm128_classifier
            },
            diffusion: imagenet_diffusion,
            timestep_respacing: "250",
            robust_scale: 1.0,
            vanilla_scale: 0.5,
        },
        "cifar10" => AdmPreset {
            name: "cifar10",
            description: "CIFAR-10 class-conditional improved-diffusion model and time-dependent classifier of the robust-guidance paper",
            model: ModelFlags {
                image_size: 32,
                num_channels: 128,
                num_res_blocks: 3,
                learn_sigma: true,
                dropout: 0.1,
                class_cond: true,
                // improved-diffusion defaults: attention 16,8 with 4 heads, scale-shift norm,
                // legacy head order, no resblock up/down, channel_mult 1,2,2,2
                num_heads: 4,
                attention_resolutions: "16,8".into(),
                use_scale_shift_norm: true,
                channel_mult: "1,2,2,2".into(),
                num_classes: 10,
                ..Default::default()
            },
            classifier: ClassifierFlags {
                image_size: 32,
                classifier_width: 32,
                classifier_depth: 2,
                classifier_attention_resolutions: "16,8".into(),
                classifier_pool: "attention".into(),
                classifier_resblock_updown: true,
                classifier_use_scale_shift_norm: true,
                classifier_channel_mult: "1,2,2,2".into(),
                num_classes: 10,
            },
            diffusion: DiffusionConfig {
                steps: 1000,
                noise_schedule: NoiseSchedule::Linear,
                learn_sigma: true,
                rescale_timesteps: true,
                ..Default::default()
            },
            timestep_respacing: "250",
            robust_scale: 1.0,
            vanilla_scale: 0.5,
        },
        other => bail!(
            "unknown ADM preset '{other}' (expected one of {})",
            PRESET_NAMES.join(", ")
        ),
    })
}

/// Looks a preset up, with the name in the error.
pub fn preset_named(name: &str) -> Result<AdmPreset> {
    preset(name).with_context(|| format!("--preset {name}"))
}
