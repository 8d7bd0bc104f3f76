//! The embedded default models, used when no weights are named on the command line.
//!
//! The defaults are trained by this project's own trainer and shipped in `weights/` (see
//! `weights/README.md` and `weights/manifest.json` for how each was trained and measured). The
//! robust CIFAR-10 classifier is compiled into the binary, so a copied binary still has it; the
//! sampling defaults, once trained, are read from the source tree.

use anyhow::{bail, Result};
use std::path::Path;

/// Weights specs starting with this name a file compiled into the binary.
pub const EMBEDDED_PREFIX: &str = "embedded:";

/// The default robust CIFAR-10 classifier for `refine` (ResNet-18 width 0.5, L2 eps 0.5
/// adversarial training; f16 storage).
pub const DEFAULT_CLASSIFIER: &str = "embedded:classifier-cifar10-robust";
static CLASSIFIER_CIFAR10_ROBUST: &[u8] = include_bytes!("../weights/classifier-cifar10-robust.safetensors");

/// The bytes of the embedded weights file `name`.
pub fn embedded(name: &str) -> Result<&'static [u8]> {
    match name {
        "classifier-cifar10-robust" => Ok(CLASSIFIER_CIFAR10_ROBUST),
        other => bail!("no embedded weights named `{other}` (this build has: classifier-cifar10-robust)"),
    }
}

/// The classifier to use: the one given, else the embedded default.
pub fn classifier_spec(given: Option<String>) -> Result<String> {
    Ok(given.unwrap_or_else(|| DEFAULT_CLASSIFIER.to_string()))
}

/// Path of the default CIFAR-10 diffusion model (`bigroc sample`).
pub const DEFAULT_DIFFUSION_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/diffusion-cifar10.safetensors");
/// Path of the default robust time-dependent CIFAR-10 classifier (`bigroc sample --guidance robust`).
pub const DEFAULT_ROBUST_TIME_CLASSIFIER: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/weights/time-classifier-cifar10-robust.safetensors");
/// Path of the default plainly trained time-dependent CIFAR-10 classifier (`--guidance vanilla`).
pub const DEFAULT_VANILLA_TIME_CLASSIFIER: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/weights/time-classifier-cifar10-vanilla.safetensors");

fn given_or_default(given: Option<String>, default: &str, what: &str, flag: &str) -> Result<String> {
    if let Some(spec) = given {
        return Ok(spec);
    }
    if Path::new(default).is_file() {
        return Ok(default.to_string());
    }
    bail!(
        "no {flag} given and this build has no embedded default {what} yet; pass a converted checkpoint \
         (see `bigroc convert --help`)"
    )
}

/// The diffusion model to sample from: the one given, else the embedded default.
pub fn diffusion_model_spec(given: Option<String>) -> Result<String> {
    given_or_default(given, DEFAULT_DIFFUSION_MODEL, "diffusion model", "--model")
}

/// The time-dependent classifier for guidance: the one given, else the embedded robust or
/// vanilla default.
pub fn time_classifier_spec(given: Option<String>, robust: bool) -> Result<String> {
    let (default, what) = if robust {
        (DEFAULT_ROBUST_TIME_CLASSIFIER, "robust time-dependent classifier")
    } else {
        (DEFAULT_VANILLA_TIME_CLASSIFIER, "vanilla time-dependent classifier")
    };
    given_or_default(given, default, what, "--classifier")
}
