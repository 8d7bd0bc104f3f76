//! Gaussian diffusion sampling with classifier guidance, matching guided-diffusion 1.0
//! (OpenAI's ADM code): beta schedules and timestep respacing ([`schedule`]), the diffusion
//! process with epsilon prediction and fixed or learned variance ([`gaussian`]), and guided
//! ancestral / DDIM sampling ([`sample`]).
//!
//! ```no_run
//! # use bigroc::diffusion::*;
//! # fn demo(model: &bigroc_models::adm::UNetModel, clf: &bigroc_models::adm::EncoderUNetModel,
//! #         x_t: &candle_core::Tensor, y: &candle_core::Tensor) -> anyhow::Result<()> {
//! let diffusion = GaussianDiffusion::new(&DiffusionConfig {
//!     learn_sigma: true,
//!     timestep_respacing: "250".into(),
//!     ..Default::default()
//! })?;
//! let guidance = ClassifierGuidance { classifier: clf, scale: 1.0 };
//! let g = Guided { model, cond: Some(&guidance), labels: Some(y), clip_denoised: true };
//! let x0 = diffusion.sample_loop(
//!     Sampler::Ancestral, &g, x_t,
//!     &mut |_, x| Ok(x.randn_like(0.0, 1.0)?),
//!     &mut |_, _, _| Ok(()),
//! )?;
//! # Ok(()) }
//! ```

pub mod gaussian;
pub mod sample;
pub mod schedule;

pub use gaussian::{DiffusionConfig, GaussianDiffusion, MeanVariance, VarianceType};
pub use sample::{ClassifierGuidance, CondFn, Denoiser, Guided, Sampler, StepOutput};
pub use schedule::{named_beta_schedule, respace_betas, space_timesteps, NoiseSchedule};
