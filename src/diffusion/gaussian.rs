//! The Gaussian diffusion process of guided-diffusion (`GaussianDiffusion` + `SpacedDiffusion`)
//! for an epsilon-predicting model: q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), and the
//! model's p(x_{t-1} | x_t) with fixed-small, fixed-large or learned-range variance.
//!
//! Coefficient arrays are f64 (like the reference's numpy arrays) and are cast to f32 when they
//! meet a tensor, as the reference's `_extract_into_tensor` does.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::schedule::{named_beta_schedule, respace_betas, space_timesteps, NoiseSchedule};

/// How the reverse-process variance is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// The posterior variance beta~_t (`sigma_small`).
    FixedSmall,
    /// beta_t (with beta~_1 at the first step); the default without `learn_sigma`.
    FixedLarge,
    /// The model's extra output channels v in [-1, 1] interpolate the log variance between
    /// log beta~_t and log beta_t (`learn_sigma`).
    LearnedRange,
}

/// The diffusion options of guided-diffusion's `create_gaussian_diffusion` (same names and
/// defaults; only epsilon prediction is supported, so `predict_xstart` is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffusionConfig {
    /// Steps of the original process (`diffusion_steps`).
    pub steps: usize,
    pub noise_schedule: NoiseSchedule,
    /// The model outputs 2C channels, the second half setting the variance (learned range).
    pub learn_sigma: bool,
    /// Without `learn_sigma`: fixed-small instead of fixed-large variance.
    #[serde(default)]
    pub sigma_small: bool,
    /// `space_timesteps` sections ("250", "50,50,50,50", "ddim25"); empty keeps every step.
    #[serde(default)]
    pub timestep_respacing: String,
    /// Pass `t * 1000 / steps` (as floats) to the networks instead of the step index
    /// (improved-diffusion's default).
    #[serde(default)]
    pub rescale_timesteps: bool,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            noise_schedule: NoiseSchedule::Linear,
            learn_sigma: false,
            sigma_small: false,
            timestep_respacing: String::new(),
            rescale_timesteps: false,
        }
    }
}

/// The output of [`GaussianDiffusion::p_mean_variance`].
#[derive(Debug, Clone)]
pub struct MeanVariance {
    pub mean: Tensor,
    pub variance: Tensor,
    pub log_variance: Tensor,
    /// The x_0 prediction (clipped to [-1, 1] when asked).
    pub pred_xstart: Tensor,
}

/// A (possibly respaced) Gaussian diffusion process. Indices `t` are positions in the respaced
/// process (0 = least noise); networks receive [`GaussianDiffusion::model_timestep`] instead.
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    pub var_type: VarianceType,
    pub rescale_timesteps: bool,
    /// Original step index of each respaced step.
    pub timestep_map: Vec<usize>,
    pub original_num_steps: usize,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub alphas_cumprod_next: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub log_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
}

/// Converts a coefficient to the f32 it becomes in the reference's tensors.
fn f32c(v: f64) -> f64 {
    v as f32 as f64
}

impl GaussianDiffusion {
    /// `create_gaussian_diffusion`: the named schedule, respaced as configured.
    pub fn new(config: &DiffusionConfig) -> Result<Self> {
        ensure!(config.steps > 0, "diffusion steps must be positive");
        let betas = named_beta_schedule(config.noise_schedule, config.steps);
        let spacing = if config.timestep_respacing.is_empty() {
            config.steps.to_string()
        } else {
            config.timestep_respacing.clone()
        };
        let keep = space_timesteps(config.steps, &spacing)?;
        let var_type = if config.learn_sigma {
            VarianceType::LearnedRange
        } else if config.sigma_small {
            VarianceType::FixedSmall
        } else {
            VarianceType::FixedLarge
        };
        Self::from_betas(
            &respace_betas(&betas, &keep),
            keep,
            config.steps,
            var_type,
            config.rescale_timesteps,
        )
    }

    /// The process with the given (already respaced) betas; `timestep_map[k]` is the original
    /// index of step k out of `original_num_steps`.
    pub fn from_betas(
        betas: &[f64],
        timestep_map: Vec<usize>,
        original_num_steps: usize,
        var_type: VarianceType,
        rescale_timesteps: bool,
    ) -> Result<Self> {
        let n = betas.len();
        ensure!(n > 0, "no diffusion steps");
        ensure!(timestep_map.len() == n, "timestep map and betas differ in length");
        if let Some(b) = betas.iter().find(|&&b| !(b > 0.0 && b <= 1.0)) {
            bail!("beta {b} is outside (0, 1]");
        }
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let mut alphas_cumprod_prev = vec![1.0];
        alphas_cumprod_prev.extend_from_slice(&alphas_cumprod[..n - 1]);
        let mut alphas_cumprod_next = alphas_cumprod[1..].to_vec();
        alphas_cumprod_next.push(0.0);
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let ac = &alphas_cumprod;
        let acp = &alphas_cumprod_prev;
        let posterior_variance = map(&|i| betas[i] * (1.0 - acp[i]) / (1.0 - ac[i]));
        // log clipped: the posterior variance is 0 at the first step, use the second one's
        let posterior_log_variance_clipped = map(&|i| {
            let v = if i == 0 && n > 1 {
                posterior_variance[1]
            } else {
                posterior_variance[i]
            };
            v.ln()
        });
        Ok(Self {
            var_type,
            rescale_timesteps,
            timestep_map,
            original_num_steps,
            sqrt_alphas_cumprod: map(&|i| ac[i].sqrt()),
            sqrt_one_minus_alphas_cumprod: map(&|i| (1.0 - ac[i]).sqrt()),
            log_one_minus_alphas_cumprod: map(&|i| (1.0 - ac[i]).ln()),
            sqrt_recip_alphas_cumprod: map(&|i| (1.0 / ac[i]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|i| (1.0 / ac[i] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|i| betas[i] * acp[i].sqrt() / (1.0 - ac[i])),
            posterior_mean_coef2: map(&|i| (1.0 - acp[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i])),
            posterior_variance,
            posterior_log_variance_clipped,
            betas: betas.to_vec(),
            alphas_cumprod_next,
            alphas_cumprod_prev,
            alphas_cumprod,
        })
    }

    /// Number of (respaced) steps.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The timestep value the networks receive for respaced step `t`: the original index,
    /// times `1000 / original_num_steps` (in f32, as the reference) with `rescale_timesteps`.
    pub fn model_timestep(&self, t: usize) -> f32 {
        let orig = self.timestep_map[t];
        if self.rescale_timesteps {
            orig as f32 * (1000.0 / self.original_num_steps as f64) as f32
        } else {
            orig as f32
        }
    }

    /// [`Self::model_timestep`] for a whole batch: an (n) f32 tensor on `device`.
    pub fn model_timesteps(&self, t: usize, n: usize, device: &candle_core::Device) -> Result<Tensor> {
        Ok(Tensor::full(self.model_timestep(t), n, device)?)
    }

    fn check_t(&self, t: usize) -> Result<()> {
        ensure!(
            t < self.num_timesteps(),
            "timestep {t} out of range (the process has {} steps)",
            self.num_timesteps()
        );
        Ok(())
    }

    /// Samples x_t ~ q(x_t | x_0) with the given noise; `t` holds one step per example.
    pub fn q_sample(&self, x_start: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        for &ti in t {
            self.check_t(ti)?;
        }
        let a = per_example(&self.sqrt_alphas_cumprod, t, x_start)?;
        let b = per_example(&self.sqrt_one_minus_alphas_cumprod, t, x_start)?;
        Ok((x_start.broadcast_mul(&a)? + noise.broadcast_mul(&b)?)?)
    }

    /// Mean of q(x_{t-1} | x_t, x_0).
    pub fn q_posterior_mean(&self, x_start: &Tensor, x_t: &Tensor, t: usize) -> Result<Tensor> {
        Ok(((x_start * f32c(self.posterior_mean_coef1[t]))?
            + (x_t * f32c(self.posterior_mean_coef2[t]))?)?)
    }

    /// x_0 from x_t and the predicted noise.
    pub fn predict_xstart_from_eps(&self, x_t: &Tensor, t: usize, eps: &Tensor) -> Result<Tensor> {
        Ok(((x_t * f32c(self.sqrt_recip_alphas_cumprod[t]))?
            - (eps * f32c(self.sqrt_recipm1_alphas_cumprod[t]))?)?)
    }

    /// The noise implied by x_t and an x_0 prediction.
    pub fn predict_eps_from_xstart(
        &self,
        x_t: &Tensor,
        t: usize,
        pred_xstart: &Tensor,
    ) -> Result<Tensor> {
        let num = ((x_t * f32c(self.sqrt_recip_alphas_cumprod[t]))? - pred_xstart)?;
        Ok((num / f32c(self.sqrt_recipm1_alphas_cumprod[t]))?)
    }

    /// p(x_{t-1} | x_t) from the network's output at respaced step `t` (all examples at the same
    /// step): epsilon in the first C channels, the variance interpolation in the next C with a
    /// learned range.
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x: &Tensor,
        t: usize,
        clip_denoised: bool,
    ) -> Result<MeanVariance> {
        self.check_t(t)?;
        let c = x.dim(1)?;
        let (eps, variance, log_variance) = match self.var_type {
            VarianceType::LearnedRange => {
                ensure!(
                    model_output.dim(1)? == 2 * c,
                    "a learned-sigma model must output {} channels, got {}",
                    2 * c,
                    model_output.dim(1)?
                );
                let eps = model_output.narrow(1, 0, c)?;
                let v = model_output.narrow(1, c, c)?;
                let min_log = f32c(self.posterior_log_variance_clipped[t]);
                let max_log = f32c(self.betas[t].ln());
                let frac = ((v + 1.0)? / 2.0)?;
                let log_var = ((&frac * max_log)? + (frac.affine(-1.0, 1.0)? * min_log)?)?;
                (eps, log_var.exp()?, log_var)
            }
            fixed => {
                ensure!(
                    model_output.dim(1)? == c,
                    "a fixed-variance model must output {c} channels, got {}",
                    model_output.dim(1)?
                );
                let (var, log_var) = match fixed {
                    VarianceType::FixedSmall => (
                        self.posterior_variance[t],
                        self.posterior_log_variance_clipped[t],
                    ),
                    _ => {
                        let v = if t == 0 && self.num_timesteps() > 1 {
                            self.posterior_variance[1]
                        } else {
                            self.betas[t]
                        };
                        (v, v.ln())
                    }
                };
                let ones = x.ones_like()?.to_dtype(DType::F32)?;
                (
                    model_output.clone(),
                    (&ones * f32c(var))?,
                    (&ones * f32c(log_var))?,
                )
            }
        };
        let mut pred_xstart = self.predict_xstart_from_eps(x, t, &eps)?;
        if clip_denoised {
            pred_xstart = pred_xstart.clamp(-1f32, 1f32)?;
        }
        let mean = self.q_posterior_mean(&pred_xstart, x, t)?;
        Ok(MeanVariance {
            mean,
            variance,
            log_variance,
            pred_xstart,
        })
    }
}

/// The coefficients `arr[t_i]` as an (N, 1, 1, 1) f32 tensor for broadcasting against `like`.
fn per_example(arr: &[f64], t: &[usize], like: &Tensor) -> Result<Tensor> {
    let n = like.dim(0)?;
    ensure!(t.len() == n, "{} timesteps for a batch of {n}", t.len());
    let vals: Vec<f32> = t.iter().map(|&i| arr[i] as f32).collect();
    let mut shape = vec![1usize; like.rank()];
    shape[0] = n;
    Ok(Tensor::from_vec(vals, shape, like.device())?)
}
