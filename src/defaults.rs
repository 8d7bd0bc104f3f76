//! The embedded default models, used when no weights are named on the command line.
//!
//! The defaults are trained by this project's own trainer and shipped in `weights/` (see
//! `weights/README.md`). Until they are, commands need their weights passed explicitly.

use anyhow::{bail, Result};
use std::path::Path;

/// Path of the default robust CIFAR-10 classifier inside the source tree.
pub const DEFAULT_CLASSIFIER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/classifier-cifar10-robust.safetensors");

/// The classifier to use: the one given, else the embedded default.
pub fn classifier_spec(given: Option<String>) -> Result<String> {
    if let Some(spec) = given {
        return Ok(spec);
    }
    if Path::new(DEFAULT_CLASSIFIER).is_file() {
        return Ok(DEFAULT_CLASSIFIER.to_string());
    }
    bail!(
        "no --classifier given and this build has no embedded default classifier yet; pass a converted \
         checkpoint (see `bigroc convert --help`)"
    )
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
