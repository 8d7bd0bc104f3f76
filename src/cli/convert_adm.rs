//! `bigroc convert --from guided-diffusion`: the original scripts' model flags, verbatim.
//!
//! Every flag of guided-diffusion's `model_and_diffusion_defaults()` and `classifier_defaults()`
//! is accepted under its own name (underscores included) and with the same meaning and default,
//! booleans as `True`/`False`, so a published command line can be pasted as it is. Flags that do
//! not change the network (`use_fp16`, `use_checkpoint`, `timestep_respacing`, `use_kl`, ...) are
//! accepted and ignored. With `--preset`, the preset's flags are the starting point and given
//! flags override them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use bigroc::adm::{
    create_classifier, create_model, import_classifier, import_unet, preset_named, AdmInfo,
    ClassifierFlags, ModelFlags, UNetFileConfig,
};
use bigroc::convert::Dataset;
use bigroc::diffusion::{DiffusionConfig, NoiseSchedule};

/// Which network an ADM checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdmKind {
    /// The diffusion model (`*_diffusion.pt`).
    Unet,
    /// The time-dependent classifier (`*_classifier.pt`).
    Classifier,
}

/// Python's `str2bool` of the scripts.
fn str2bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" | "t" | "y" | "1" => Ok(true),
        "no" | "false" | "f" | "n" | "0" => Ok(false),
        _ => Err(format!("`{s}`: boolean value expected (True or False)")),
    }
}

/// The scripts' flags (see the module docs); unset flags take the preset's or the script's default.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "guided-diffusion flags (--from guided-diffusion; names and defaults as in its scripts)")]
pub struct AdmFlags {
    /// ADM checkpoint holds the diffusion UNet or the classifier.
    #[arg(long, value_enum)]
    pub kind: Option<AdmKind>,
    /// Published configuration: adm128, adm256 or cifar10 (flags given as well override it).
    #[arg(long)]
    pub preset: Option<String>,
    /// For classifiers: how it was trained, robust or vanilla (recorded in the metadata).
    #[arg(long)]
    pub training: Option<String>,

    #[arg(long = "image_size", hide_short_help = true)]
    pub image_size: Option<usize>,
    #[arg(long = "num_channels", hide_short_help = true)]
    pub num_channels: Option<usize>,
    #[arg(long = "num_res_blocks", hide_short_help = true)]
    pub num_res_blocks: Option<usize>,
    #[arg(long = "num_heads", hide_short_help = true)]
    pub num_heads: Option<usize>,
    #[arg(long = "num_heads_upsample", allow_negative_numbers = true, hide_short_help = true)]
    pub num_heads_upsample: Option<i64>,
    #[arg(long = "num_head_channels", allow_negative_numbers = true, hide_short_help = true)]
    pub num_head_channels: Option<i64>,
    #[arg(long = "attention_resolutions", hide_short_help = true)]
    pub attention_resolutions: Option<String>,
    #[arg(long = "channel_mult", hide_short_help = true)]
    pub channel_mult: Option<String>,
    #[arg(long = "dropout", hide_short_help = true)]
    pub dropout: Option<f64>,
    #[arg(long = "class_cond", value_parser = str2bool, hide_short_help = true)]
    pub class_cond: Option<bool>,
    #[arg(long = "use_checkpoint", value_parser = str2bool, hide_short_help = true)]
    pub use_checkpoint: Option<bool>,
    #[arg(long = "use_scale_shift_norm", value_parser = str2bool, hide_short_help = true)]
    pub use_scale_shift_norm: Option<bool>,
    #[arg(long = "resblock_updown", value_parser = str2bool, hide_short_help = true)]
    pub resblock_updown: Option<bool>,
    #[arg(long = "use_fp16", value_parser = str2bool, hide_short_help = true)]
    pub use_fp16: Option<bool>,
    #[arg(long = "use_new_attention_order", value_parser = str2bool, hide_short_help = true)]
    pub use_new_attention_order: Option<bool>,
    #[arg(long = "learn_sigma", value_parser = str2bool, hide_short_help = true)]
    pub learn_sigma: Option<bool>,
    #[arg(long = "diffusion_steps", hide_short_help = true)]
    pub diffusion_steps: Option<usize>,
    #[arg(long = "noise_schedule", hide_short_help = true)]
    pub noise_schedule: Option<String>,
    #[arg(long = "timestep_respacing", hide_short_help = true)]
    pub timestep_respacing: Option<String>,
    #[arg(long = "use_kl", value_parser = str2bool, hide_short_help = true)]
    pub use_kl: Option<bool>,
    #[arg(long = "predict_xstart", value_parser = str2bool, hide_short_help = true)]
    pub predict_xstart: Option<bool>,
    /// improved-diffusion's default is True (guided-diffusion's False); the cifar10 preset sets it.
    #[arg(long = "rescale_timesteps", value_parser = str2bool, hide_short_help = true)]
    pub rescale_timesteps: Option<bool>,
    #[arg(long = "rescale_learned_sigmas", value_parser = str2bool, hide_short_help = true)]
    pub rescale_learned_sigmas: Option<bool>,
    #[arg(long = "classifier_use_fp16", value_parser = str2bool, hide_short_help = true)]
    pub classifier_use_fp16: Option<bool>,
    #[arg(long = "classifier_width", hide_short_help = true)]
    pub classifier_width: Option<usize>,
    #[arg(long = "classifier_depth", hide_short_help = true)]
    pub classifier_depth: Option<usize>,
    #[arg(long = "classifier_attention_resolutions", hide_short_help = true)]
    pub classifier_attention_resolutions: Option<String>,
    #[arg(long = "classifier_use_scale_shift_norm", value_parser = str2bool, hide_short_help = true)]
    pub classifier_use_scale_shift_norm: Option<bool>,
    #[arg(long = "classifier_resblock_updown", value_parser = str2bool, hide_short_help = true)]
    pub classifier_resblock_updown: Option<bool>,
    #[arg(long = "classifier_pool", hide_short_help = true)]
    pub classifier_pool: Option<String>,
    /// Not a script flag: the scripts hard-code 1000 classes (ImageNet).
    #[arg(long = "num_classes", hide_short_help = true)]
    pub num_classes: Option<usize>,
    /// Not a script flag: classifier channel multipliers (the scripts derive them from image_size).
    #[arg(long = "classifier_channel_mult", hide_short_help = true)]
    pub classifier_channel_mult: Option<String>,
}

fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
    if let Some(v) = v {
        *slot = v.clone();
    }
}

impl AdmFlags {
    /// Whether any guided-diffusion option was given (they need --from guided-diffusion).
    pub fn any_given(&self) -> bool {
        self.kind.is_some() || self.preset.is_some() || self.image_size.is_some() || self.num_channels.is_some()
    }

    fn model_flags(&self, mut f: ModelFlags) -> ModelFlags {
        set(&mut f.image_size, &self.image_size);
        set(&mut f.num_channels, &self.num_channels);
        set(&mut f.num_res_blocks, &self.num_res_blocks);
        set(&mut f.num_heads, &self.num_heads);
        set(&mut f.num_heads_upsample, &self.num_heads_upsample);
        set(&mut f.num_head_channels, &self.num_head_channels);
        set(&mut f.attention_resolutions, &self.attention_resolutions);
        set(&mut f.channel_mult, &self.channel_mult);
        set(&mut f.dropout, &self.dropout);
        set(&mut f.class_cond, &self.class_cond);
        set(&mut f.use_scale_shift_norm, &self.use_scale_shift_norm);
        set(&mut f.resblock_updown, &self.resblock_updown);
        set(&mut f.use_new_attention_order, &self.use_new_attention_order);
        set(&mut f.learn_sigma, &self.learn_sigma);
        set(&mut f.num_classes, &self.num_classes);
        f
    }

    fn classifier_flags(&self, mut f: ClassifierFlags) -> ClassifierFlags {
        set(&mut f.image_size, &self.image_size);
        set(&mut f.classifier_width, &self.classifier_width);
        set(&mut f.classifier_depth, &self.classifier_depth);
        set(&mut f.classifier_attention_resolutions, &self.classifier_attention_resolutions);
        set(&mut f.classifier_use_scale_shift_norm, &self.classifier_use_scale_shift_norm);
        set(&mut f.classifier_resblock_updown, &self.classifier_resblock_updown);
        set(&mut f.classifier_pool, &self.classifier_pool);
        set(&mut f.classifier_channel_mult, &self.classifier_channel_mult);
        set(&mut f.num_classes, &self.num_classes);
        f
    }

    fn diffusion(&self, mut d: DiffusionConfig, learn_sigma: bool) -> Result<DiffusionConfig> {
        if self.predict_xstart == Some(true) {
            bail!("--predict_xstart True: only epsilon-predicting models are supported");
        }
        set(&mut d.steps, &self.diffusion_steps);
        if let Some(s) = &self.noise_schedule {
            d.noise_schedule = s.parse::<NoiseSchedule>().context("--noise_schedule")?;
        }
        set(&mut d.rescale_timesteps, &self.rescale_timesteps);
        d.learn_sigma = learn_sigma;
        d.timestep_respacing = String::new();
        Ok(d)
    }
}

/// Converts an ADM checkpoint; returns a one-line description of what was written.
pub fn run(flags: &AdmFlags, checkpoint: &Path, dataset: Option<Dataset>, output: &Path) -> Result<String> {
    let kind = flags.kind.context("--kind unet|classifier is required with --from guided-diffusion")?;
    let preset = flags.preset.as_deref().map(preset_named).transpose()?;
    let dataset_of = |classes: usize| {
        dataset.or(match classes {
            1000 => Some(Dataset::Imagenet),
            10 => Some(Dataset::Cifar10),
            _ => None,
        })
    };
    let provenance = Some(format!("converted by bigroc {} from {}", env!("CARGO_PKG_VERSION"), checkpoint.display()));
    let (header, tensors, what) = match kind {
        AdmKind::Unet => {
            let mf = flags.model_flags(preset.as_ref().map(|p| p.model.clone()).unwrap_or_default());
            let model = create_model(&mf)?;
            let base = preset.as_ref().map(|p| p.diffusion.clone()).unwrap_or_default();
            let diffusion = flags.diffusion(base, mf.learn_sigma)?;
            let ds = model.num_classes.and_then(dataset_of);
            let info = AdmInfo {
                classes: ds.map(|d| d.class_names()).filter(|c| Some(c.len()) == model.num_classes).unwrap_or_default(),
                dataset: ds.map(|d| d.name().to_string()),
                preset: flags.preset.clone(),
                training: None,
                flags: serde_json::to_value(&mf)?,
                provenance,
            };
            let what = format!("{}x{} diffusion UNet, {} channels", mf.image_size, mf.image_size, mf.num_channels);
            let (h, t) = import_unet(checkpoint, &UNetFileConfig { model, diffusion }, info)?;
            (h, t, what)
        }
        AdmKind::Classifier => {
            let cf = flags.classifier_flags(preset.as_ref().map(|p| p.classifier.clone()).unwrap_or_default());
            let config = create_classifier(&cf)?;
            if let Some(t) = flags.training.as_deref() {
                if t != "robust" && t != "vanilla" {
                    bail!("--training {t}: expected robust or vanilla");
                }
            }
            let ds = dataset_of(config.out_channels);
            let info = AdmInfo {
                classes: ds.map(|d| d.class_names()).filter(|c| c.len() == config.out_channels).unwrap_or_default(),
                dataset: ds.map(|d| d.name().to_string()),
                preset: flags.preset.clone(),
                training: flags.training.clone(),
                flags: serde_json::to_value(&cf)?,
                provenance,
            };
            let what = format!("{}x{} time-dependent classifier, width {}", cf.image_size, cf.image_size, cf.classifier_width);
            let (h, t) = import_classifier(checkpoint, &config, info)?;
            (h, t, what)
        }
    };
    bigroc::weights::save(output, &header, &tensors)?;
    Ok(format!("wrote {} ({} tensors, {what})", output.display(), tensors.len()))
}
