//! BIGRoC: refining generated images with a robust classifier (Ganz & Elad).
//!
//! Each image is moved a small step, inside an eps-ball, toward a class by targeted PGD on an
//! adversarially robust classifier, whose input gradients point at real class features. Use
//! [`refine`] on tensors in memory, or [`job::RefineJob`] for whole folders and sample files.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use bigroc::classifier::Classifier;
//! use bigroc::refine::{refine, EpsScale, Norm, RefineSettings};
//! let device = candle_core::Device::Cpu;
//! let classifier = Classifier::load("cifar_l2_0_5.safetensors", &device)?;
//! let images = candle_core::Tensor::rand(0f32, 1f32, (4, 3, 32, 32), &device)?; // pixels in [0, 1]
//! let labels = candle_core::Tensor::new(&[3u32, 5, 1, 0], &device)?;
//! let settings = RefineSettings::paper(Norm::L2, 1.0, EpsScale::Signed); // eps 1 for pixels in [-1, 1]
//! let refined = refine(&classifier, &images, &labels, &settings)?.images;
//! # Ok(()) }
//! ```

pub mod job;
pub mod labels;
pub mod pgd;

pub use labels::LabelMode;
pub use pgd::{Goal, Norm, PgdConfig, PgdOutcome};

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::classifier::Classifier;

/// Which pixel range eps and the step size are measured in. BIGRoC's tables give some eps values
/// for pixels in [-1, 1] ("signed"), others for [0, 1] ("unit"); a signed eps is half as large
/// in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EpsScale {
    /// Pixels in [0, 1].
    Unit,
    /// Pixels in [-1, 1].
    Signed,
}

impl EpsScale {
    /// Factor that turns a length in this scale into one for pixels in [0, 1].
    pub fn to_unit(self) -> f64 {
        match self {
            Self::Unit => 1.0,
            Self::Signed => 0.5,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Unit => "pixels in [0,1]",
            Self::Signed => "pixels in [-1,1]",
        }
    }
}

/// How hard to refine, as a user states it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefineSettings {
    pub norm: Norm,
    /// Radius of the perturbation ball, in `eps_scale` units; `None` until a default is chosen
    /// (a job takes the classifier's recommended eps).
    pub eps: Option<f64>,
    pub eps_scale: EpsScale,
    pub steps: usize,
    /// Step size in `eps_scale` units; `None` for the paper's 1.5 * eps / steps.
    pub step_size: Option<f64>,
    /// Return each image's lowest-loss iterate (the robustness library's `use_best`).
    pub use_best: bool,
}

impl RefineSettings {
    /// The paper's schedule: 7 steps of 1.5 * eps / 7, best iterate kept.
    pub fn paper(norm: Norm, eps: f64, eps_scale: EpsScale) -> Self {
        Self { norm, eps: Some(eps), eps_scale, steps: 7, step_size: None, use_best: true }
    }

    /// The step size in `eps_scale` units.
    pub fn step_size(&self) -> f64 {
        self.step_size.unwrap_or(1.5 * self.eps.unwrap_or(f64::NAN) / self.steps.max(1) as f64)
    }

    /// Fills in eps, given for pixels in [0, 1], when none was set.
    pub fn with_default_eps(mut self, unit_eps: f64) -> Self {
        if self.eps.is_none() {
            self.eps = Some(unit_eps / self.eps_scale.to_unit());
        }
        self
    }

    /// The attack in units of pixels in [0, 1].
    pub fn pgd(&self) -> Result<PgdConfig> {
        let Some(eps) = self.eps else { bail!("no --eps given and the classifier recommends none") };
        if !(eps.is_finite() && eps >= 0.0) {
            bail!("--eps {eps}: must be a non-negative number");
        }
        if !(self.step_size().is_finite() && self.step_size() >= 0.0) {
            bail!("--step-size {}: must be a non-negative number", self.step_size());
        }
        let k = self.eps_scale.to_unit();
        Ok(PgdConfig {
            norm: self.norm,
            eps: eps * k,
            step_size: self.step_size() * k,
            steps: self.steps,
            use_best: self.use_best,
        })
    }
}

/// Refines `images` (f32 NCHW, pixels in [0, 1]) toward `labels` (N class indices).
pub fn refine(classifier: &Classifier, images: &Tensor, labels: &Tensor, settings: &RefineSettings) -> Result<PgdOutcome> {
    let cfg = settings.pgd()?;
    let (_, _, h, w) = images.dims4()?;
    classifier.check_input_size(h, w)?;
    let labels = labels.to_device(images.device())?;
    Ok(pgd::targeted_pgd(&|x| classifier.logits(x), images, &labels, &cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_eps_is_halved_with_its_step() {
        let s = RefineSettings::paper(Norm::L2, 1.0, EpsScale::Signed);
        let cfg = s.pgd().unwrap();
        assert_eq!(cfg.eps, 0.5);
        assert!((cfg.step_size - 1.5 / 7.0 * 0.5).abs() < 1e-12);
        assert_eq!(cfg.steps, 7);
        let s = RefineSettings { step_size: Some(0.2), ..RefineSettings::paper(Norm::Linf, 0.1, EpsScale::Unit) };
        assert_eq!(s.pgd().unwrap().step_size, 0.2);
        assert!(RefineSettings::paper(Norm::L2, f64::NAN, EpsScale::Unit).pgd().is_err());
    }
}
