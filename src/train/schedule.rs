//! Learning-rate schedules, as functions of training progress so that a resumed run recomputes the
//! same rate from its step count.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum LrSchedule {
    Constant,
    /// robustness' `step_lr`: multiply by `gamma` every `every_epochs` epochs (changes at epoch ends).
    Step { every_epochs: usize, gamma: f64 },
    /// Cosine from the base rate to 0 over the whole run, per iteration.
    Cosine,
    /// guided-diffusion's `lr_anneal_steps`: linearly from the base rate to 0 over the run.
    Linear,
}

impl LrSchedule {
    /// The rate for iteration `step` (0-based) of `total`, in epoch `epoch` (0-based).
    pub fn lr(&self, base: f64, step: usize, total: usize, epoch: usize) -> f64 {
        let done = step as f64 / total.max(1) as f64;
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every_epochs, gamma } => base * gamma.powi((epoch / every_epochs.max(1)) as i32),
            LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
            LrSchedule::Linear => base * (1.0 - done),
        }
    }

    /// Parses `constant`, `cosine`, `linear` or `step:EVERY:GAMMA` (e.g. `step:50:0.1`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            _ => {
                let parts: Vec<&str> = s.split(':').collect();
                match parts.as_slice() {
                    ["step", every, gamma] => {
                        let every = every.parse().ok().filter(|&e: &usize| e > 0);
                        let gamma = gamma.parse().ok().filter(|g: &f64| g.is_finite() && *g > 0.0);
                        match (every, gamma) {
                            (Some(every_epochs), Some(gamma)) => Ok(Self::Step { every_epochs, gamma }),
                            _ => Err(format!("`{s}`: expected step:EPOCHS:GAMMA with EPOCHS >= 1, GAMMA > 0")),
                        }
                    }
                    _ => Err(format!("`{s}`: expected constant, cosine, linear or step:EPOCHS:GAMMA")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_hit_their_landmarks() {
        let step = LrSchedule::parse("step:50:0.1").unwrap();
        assert_eq!(step.lr(0.1, 0, 100, 49), 0.1);
        assert!((step.lr(0.1, 0, 100, 50) - 0.01).abs() < 1e-12);
        assert!((LrSchedule::Cosine.lr(1.0, 50, 100, 0) - 0.5).abs() < 1e-12);
        assert!((LrSchedule::Linear.lr(3e-4, 25, 100, 0) - 2.25e-4).abs() < 1e-12);
        assert!(LrSchedule::parse("step:0:0.1").is_err());
        assert!(LrSchedule::parse("warm").unwrap_err().contains("warm"));
    }
}
