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
