//! OpenAI's ADM model families for guided sampling: guided-diffusion's script flags and the
//! published presets ([`flags`]), and the weights files of the diffusion model and the
//! time-dependent classifier with their import from the original checkpoints ([`files`]).

pub mod files;
pub mod flags;

pub use files::{
    import_classifier, import_unet, AdmInfo, DiffusionModel, TimeClassifier, UNetFileConfig,
    CLASSIFIER_KIND, UNET_KIND,
};
pub use flags::{
    create_classifier, create_model, default_channel_mult, preset, preset_named, AdmPreset,
    ClassifierFlags, ModelFlags, IMAGENET_CLASSES, PRESET_NAMES,
};
