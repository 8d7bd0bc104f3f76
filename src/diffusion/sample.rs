//! Ancestral (`p_sample`) and DDIM sampling with classifier guidance, as guided-diffusion does
//! it: the guided ancestral step shifts the mean by `variance * s * grad log p(y | x_t, t)`
//! (`condition_mean`); the guided DDIM step corrects the noise prediction through the score,
//! `eps' = eps - sqrt(1 - alpha_bar) * s * grad` (`condition_score`). Networks and classifiers
//! receive the original timestep indices of the respaced process (rescaled if configured).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use bigroc_models::adm::{EncoderUNetModel, UNetModel};

use super::gaussian::GaussianDiffusion;

/// A noise-prediction network: `forward(x_t, t, y)` with `t` the (N) network timesteps.
pub trait Denoiser {
    fn forward(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor>;
}

impl Denoiser for UNetModel {
    /// Labels go to the network only when it is class-conditional (guided-diffusion's
    /// `model_fn` with `class_cond`), so one label tensor can drive both model and classifier.
    fn forward(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let y = if self.config().num_classes.is_some() { y } else { None };
        Ok(UNetModel::forward(self, x, t, y)?)
    }
}

/// A guidance gradient `cond_fn(x_t, t, y)`: d/dx_t of a log-density, already scaled.
pub trait CondFn {
    fn grad(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor>;
}

/// Classifier guidance: `s * d/dx sum_i log softmax(classifier(x, t))_i[y_i]`.
pub struct ClassifierGuidance<'a> {
    pub classifier: &'a EncoderUNetModel,
    pub scale: f64,
}

impl CondFn for ClassifierGuidance<'_> {
    fn grad(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let Some(y) = y else {
            anyhow::bail!("classifier guidance needs target labels")
        };
        let g = self.classifier.log_prob_grad(x, t, y)?;
        Ok((g * self.scale)?)
    }
}

/// What one reverse step produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t-1}.
    pub sample: Tensor,
    /// The network's own x_0 prediction at this step (clipped when asked; before guidance, as
    /// guided-diffusion-sdk returns it from both `p_sample` and `ddim_sample`).
    pub pred_xstart: Tensor,
}

/// Which reverse process to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Ancestral sampling from p(x_{t-1} | x_t) (`p_sample_loop`).
    Ancestral,
    /// DDIM with stochasticity `eta` (0 = deterministic; `ddim_sample_loop`).
    Ddim { eta: f64 },
}

/// Everything a step needs besides x_t and the noise.
pub struct Guided<'a> {
    pub model: &'a dyn Denoiser,
    /// `None` samples without guidance.
    pub cond: Option<&'a dyn CondFn>,
    /// Class labels (N) for a class-conditional model and for the guidance.
    pub labels: Option<&'a Tensor>,
    /// Clip the x_0 predictions to [-1, 1] (guided-diffusion's default).
    pub clip_denoised: bool,
}

impl GaussianDiffusion {
    fn network_timesteps(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        self.model_timesteps(t, x.dim(0)?, x.device())
    }

    /// One ancestral step at respaced index `t` with the given standard normal `noise`
    /// (unused at t = 0).
    pub fn p_sample(&self, g: &Guided, x: &Tensor, t: usize, noise: &Tensor) -> Result<StepOutput> {
        ensure!(noise.dims() == x.dims(), "noise shape {:?} differs from x {:?}", noise.dims(), x.dims());
        let ts = self.network_timesteps(x, t)?;
        let out = g.model.forward(x, &ts, g.labels)?;
        let pmv = self.p_mean_variance(&out, x, t, g.clip_denoised)?;
        let mut mean = pmv.mean;
        if let Some(cond) = g.cond {
            let grad = cond.grad(x, &ts, g.labels)?.to_dtype(DType::F32)?;
            mean = (mean + (&pmv.variance * grad)?)?;
        }
        let sample = if t == 0 {
            mean
        } else {
            (mean + ((&pmv.log_variance * 0.5)?.exp()? * noise)?)?
        };
        Ok(StepOutput {
            sample,
            pred_xstart: pmv.pred_xstart,
        })
    }

    /// One DDIM step at respaced index `t` with stochasticity `eta` and the given standard
    /// normal `noise` (unused when `eta` is 0 or t = 0).
    pub fn ddim_sample(
        &self,
        g: &Guided,
        x: &Tensor,
        t: usize,
        eta: f64,
        noise: &Tensor,
    ) -> Result<StepOutput> {
        ensure!(noise.dims() == x.dims(), "noise shape {:?} differs from x {:?}", noise.dims(), x.dims());
        let ts = self.network_timesteps(x, t)?;
        let out = g.model.forward(x, &ts, g.labels)?;
        let pmv = self.p_mean_variance(&out, x, t, g.clip_denoised)?;
        let alpha_bar = self.alphas_cumprod[t] as f32;
        let alpha_bar_prev = self.alphas_cumprod_prev[t] as f32;
        let xstart = match g.cond {
            Some(cond) => {
                // condition_score: move eps against the scaled classifier score
                let eps = self.predict_eps_from_xstart(x, t, &pmv.pred_xstart)?;
                let grad = cond.grad(x, &ts, g.labels)?.to_dtype(DType::F32)?;
                let eps = (eps - (grad * (1.0 - alpha_bar).sqrt() as f64)?)?;
                self.predict_xstart_from_eps(x, t, &eps)?
            }
            None => pmv.pred_xstart.clone(),
        };
        let eps = self.predict_eps_from_xstart(x, t, &xstart)?;
        // Equation 12 of the DDIM paper, scalar coefficients in f32 like the reference
        let eta = eta as f32;
        let sigma = eta
            * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)).sqrt()
            * (1.0 - alpha_bar / alpha_bar_prev).sqrt();
        let eps_coef = (1.0 - alpha_bar_prev - sigma * sigma).sqrt();
        let mean = ((&xstart * alpha_bar_prev.sqrt() as f64)? + (eps * eps_coef as f64)?)?;
        let sample = if t == 0 || sigma == 0.0 {
            mean
        } else {
            (mean + (noise * sigma as f64)?)?
        };
        Ok(StepOutput {
            sample,
            pred_xstart: pmv.pred_xstart,
        })
    }

    /// One step of `sampler`.
    pub fn step(
        &self,
        sampler: Sampler,
        g: &Guided,
        x: &Tensor,
        t: usize,
        noise: &Tensor,
    ) -> Result<StepOutput> {
        match sampler {
            Sampler::Ancestral => self.p_sample(g, x, t, noise),
            Sampler::Ddim { eta } => self.ddim_sample(g, x, t, eta, noise),
        }
    }

    /// The whole reverse process from `x_t` (at the last respaced step) down to step 0.
    /// `noise(k, x)` supplies the standard normal noise of the k-th step (k = 0 first, at the
    /// largest t); `on_step(k, t, out)` sees every step's output (progress, trajectories).
    pub fn sample_loop(
        &self,
        sampler: Sampler,
        g: &Guided,
        x_t: &Tensor,
        noise: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
        on_step: &mut dyn FnMut(usize, usize, &StepOutput) -> Result<()>,
    ) -> Result<Tensor> {
        let mut x = x_t.clone();
        for (k, t) in (0..self.num_timesteps()).rev().enumerate() {
            let z = noise(k, &x)?;
            let out = self.step(sampler, g, &x, t, &z)?;
            on_step(k, t, &out)?;
            x = out.sample;
        }
        Ok(x)
    }
}
