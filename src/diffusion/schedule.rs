//! Noise schedules and timestep respacing, exactly as guided-diffusion computes them
//! (`get_named_beta_schedule`, `betas_for_alpha_bar`, `space_timesteps`, `SpacedDiffusion`).
//! All arrays are f64, like the reference's numpy arrays.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The named beta schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSchedule {
    /// Ho et al.'s linear betas from 1e-4 to 0.02, scaled by 1000 / steps.
    Linear,
    /// Nichol & Dhariwal's cosine alpha-bar, betas capped at 0.999.
    Cosine,
}

impl std::str::FromStr for NoiseSchedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => bail!("unknown noise schedule '{other}' (expected linear or cosine)"),
        }
    }
}

impl std::fmt::Display for NoiseSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        })
    }
}

/// The betas of a named schedule over `steps` diffusion steps.
pub fn named_beta_schedule(schedule: NoiseSchedule, steps: usize) -> Vec<f64> {
    match schedule {
        NoiseSchedule::Linear => {
            let scale = 1000.0 / steps as f64;
            linspace(scale * 0.0001, scale * 0.02, steps)
        }
        NoiseSchedule::Cosine => betas_for_alpha_bar(
            steps,
            |t| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2),
            0.999,
        ),
    }
}

/// numpy's `linspace(start, stop, num)` (endpoint included, computed as `i * step + start`
/// with the last value set to `stop`, like numpy does).
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// Betas that discretize a cumulative `alpha_bar(t)` on t in [0, 1]:
/// `beta_i = min(1 - alpha_bar((i+1)/n) / alpha_bar(i/n), max_beta)`.
pub fn betas_for_alpha_bar(steps: usize, alpha_bar: impl Fn(f64) -> f64, max_beta: f64) -> Vec<f64> {
    (0..steps)
        .map(|i| {
            let t1 = i as f64 / steps as f64;
            let t2 = (i + 1) as f64 / steps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)
        })
        .collect()
}

/// guided-diffusion's `space_timesteps`: which of the `num_timesteps` original steps to keep.
///
/// `section_counts` is either `"ddimN"` (the DDIM paper's fixed stride: the smallest integer
/// stride giving exactly N steps) or comma-separated counts, one per equal section of the
/// original process, each section strided evenly (fractional stride, Python's round-half-even).
/// Returns the kept steps in increasing order.
pub fn space_timesteps(num_timesteps: usize, section_counts: &str) -> Result<Vec<usize>> {
    if let Some(n) = section_counts.strip_prefix("ddim") {
        let desired: usize = n
            .trim()
            .parse()
            .with_context(|| format!("timestep respacing '{section_counts}': bad step count"))?;
        for stride in 1..num_timesteps {
            if num_timesteps.div_ceil(stride) == desired {
                return Ok((0..num_timesteps).step_by(stride).collect());
            }
        }
        bail!(
            "timestep respacing '{section_counts}': cannot take exactly {desired} of {num_timesteps} steps with an integer stride"
        );
    }
    let counts: Vec<usize> = section_counts
        .split(',')
        .map(|s| {
            s.trim().parse::<usize>().with_context(|| {
                format!("timestep respacing '{section_counts}': '{s}' is not a step count")
            })
        })
        .collect::<Result<_>>()?;
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0;
    let mut all = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            bail!(
                "timestep respacing '{section_counts}': cannot divide a section of {size} steps into {count}"
            );
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            all.push(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// The betas of the respaced process that keeps only `use_timesteps` (sorted) of the original
/// one: `1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]`, so the kept steps have the original
/// cumulative alphas.
pub fn respace_betas(betas: &[f64], use_timesteps: &[usize]) -> Vec<f64> {
    let mut alpha_cumprod = 1.0;
    let mut last = 1.0;
    let mut new_betas = Vec::with_capacity(use_timesteps.len());
    let mut keep = use_timesteps.iter().peekable();
    for (i, beta) in betas.iter().enumerate() {
        alpha_cumprod *= 1.0 - beta;
        if keep.peek() == Some(&&i) {
            keep.next();
            new_betas.push(1.0 - alpha_cumprod / last);
            last = alpha_cumprod;
        }
    }
    new_betas
}
