//! Projected gradient descent, step for step as the robustness library's attacker (no random
//! start). Targeted (BIGRoC's refinement): the update follows the gradient of -mean CE toward the
//! target class. Untargeted (adversarial training and robust-accuracy evaluation): it follows
//! +mean CE away from the true class. Each iterate is projected back into the eps-ball around the
//! input and into [0, 1]; with `use_best` each image's result is the visited point with the lowest
//! (targeted) or highest (untargeted) loss.

use candle_core::{DType, Result, Tensor, Var, D};

/// The perturbation's threat model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Euclidean ball; normalized-gradient steps.
    L2,
    /// Max-norm box; signed-gradient steps.
    Linf,
}

/// PGD settings, in the units of pixels in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PgdConfig {
    pub norm: Norm,
    pub eps: f64,
    pub step_size: f64,
    pub steps: usize,
    pub use_best: bool,
}

/// Per-sample cross-entropy of `logits` (N, K) against integer `targets` (N).
pub fn cross_entropy_per_sample(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// What an attack produced.
pub struct PgdOutcome {
    /// The refined images, f32 NCHW in [0, 1].
    pub images: Tensor,
    /// Per-sample target loss (cross-entropy) at the input.
    pub start_loss: Tensor,
    /// Per-sample target loss of the returned images (known without extra work only with use_best).
    pub end_loss: Option<Tensor>,
}

/// Which way the attack moves the cross-entropy of the given labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Lower it: move each image toward its label (a targeted attack; BIGRoC).
    Toward,
    /// Raise it: move each image away from its true label (an untargeted attack).
    Away,
}

/// Runs targeted PGD from `x0` (f32 NCHW in [0, 1]) toward `targets` on the classifier `logits_of`,
/// which maps pixels in [0, 1] to logits.
pub fn targeted_pgd(
    logits_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    x0: &Tensor,
    targets: &Tensor,
    cfg: &PgdConfig,
) -> Result<PgdOutcome> {
    pgd(logits_of, x0, targets, cfg, Goal::Toward)
}

/// Runs PGD from `x0` (f32 NCHW in [0, 1]) with the cross-entropy of `labels` as the objective,
/// lowered or raised as `goal` says, on the classifier `logits_of` (pixels in [0, 1] to logits).
pub fn pgd(
    logits_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    x0: &Tensor,
    labels: &Tensor,
    cfg: &PgdConfig,
    goal: Goal,
) -> Result<PgdOutcome> {
    let x0 = x0.detach();
    let loss_at = |x: &Tensor| cross_entropy_per_sample(&logits_of(x)?, labels);
    let mut x = x0.clone();
    let mut best: Option<(Tensor, Tensor)> = None; // (loss per sample, image)
    let mut start_loss = None;
    for _ in 0..cfg.steps {
        let var = Var::from_tensor(&x)?;
        let losses = loss_at(var.as_tensor())?;
        if start_loss.is_none() {
            start_loss = Some(losses.detach());
        }
        // robustness differentiates m * mean(loss), m = -1 targeted, +1 untargeted, and ascends.
        let objective = match goal {
            Goal::Toward => losses.mean_all()?.neg()?,
            Goal::Away => losses.mean_all()?,
        };
        let grad = objective.backward()?.remove(var.as_tensor()).expect("input gradient");
        let losses = losses.detach();
        if cfg.use_best {
            best = Some(keep_best(best, &losses, &x, goal)?);
        }
        x = project(&take_step(&x, &grad, cfg)?, &x0, cfg)?;
    }
    if !cfg.use_best {
        let start_loss = match start_loss {
            Some(l) => l,
            None => loss_at(&x0)?.detach(),
        };
        return Ok(PgdOutcome { images: x, start_loss, end_loss: None });
    }
    let final_losses = loss_at(&x)?.detach();
    let start_loss = start_loss.unwrap_or_else(|| final_losses.clone());
    let (end_loss, images) = keep_best(best, &final_losses, &x, goal)?;
    Ok(PgdOutcome { images, start_loss, end_loss: Some(end_loss) })
}

/// Keeps, per sample, the image with the strictly better loss (lower toward, higher away; the
/// earlier one on ties).
fn keep_best(
    best: Option<(Tensor, Tensor)>,
    losses: &Tensor,
    x: &Tensor,
    goal: Goal,
) -> Result<(Tensor, Tensor)> {
    let Some((best_loss, best_x)) = best else { return Ok((losses.clone(), x.clone())) };
    let better = match goal {
        Goal::Toward => losses.lt(&best_loss)?,
        Goal::Away => losses.gt(&best_loss)?,
    };
    let best_loss = better.where_cond(losses, &best_loss)?;
    let mask = better.reshape((x.dim(0)?, 1, 1, 1))?.broadcast_as(x.shape())?;
    Ok((best_loss, mask.where_cond(x, &best_x)?))
}

fn per_sample_l2_norm(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(0)?;
    t.sqr()?.reshape((n, ()))?.sum_keepdim(1)?.sqrt()?.reshape((n, 1, 1, 1))
}

fn take_step(x: &Tensor, grad: &Tensor, cfg: &PgdConfig) -> Result<Tensor> {
    match cfg.norm {
        Norm::L2 => {
            let scaled = grad.broadcast_div(&(per_sample_l2_norm(grad)? + 1e-10)?)?;
            x + (scaled * cfg.step_size)?
        }
        Norm::Linf => x + (grad.sign()? * cfg.step_size)?,
    }
}

/// Back into the eps-ball around `x0` (torch's `renorm` for L2: rescale only when the norm exceeds
/// eps, by eps / (norm + 1e-7)), then into [0, 1].
fn project(x: &Tensor, x0: &Tensor, cfg: &PgdConfig) -> Result<Tensor> {
    let diff = (x - x0)?;
    let diff = match cfg.norm {
        Norm::L2 => {
            let norm = per_sample_l2_norm(&diff)?;
            let shrink = (norm.affine(0.0, cfg.eps)? / (&norm + 1e-7)?)?;
            let factor = norm.gt(cfg.eps)?.where_cond(&shrink, &norm.ones_like()?)?;
            diff.broadcast_mul(&factor)?
        }
        Norm::Linf => diff.clamp(-cfg.eps, cfg.eps)?,
    };
    (x0 + diff)?.clamp(0f32, 1f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A linear classifier: the gradient is known in closed form, so a step can be checked by hand.
    fn linear(w: &Tensor) -> impl Fn(&Tensor) -> Result<Tensor> + '_ {
        move |x: &Tensor| x.flatten_from(1)?.matmul(&w.t()?)
    }

    #[test]
    fn l2_step_moves_toward_target_inside_the_ball() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 0., 0., 0.], [0., 1., 0., 0.]], &dev)?;
        let x0 = Tensor::new(&[0.5f32, 0.5, 0.5, 0.5], &dev)?.reshape((1, 1, 2, 2))?;
        let target = Tensor::new(&[1u32], &dev)?;
        let cfg = PgdConfig { norm: Norm::L2, eps: 0.1, step_size: 0.3, steps: 1, use_best: false };
        let x = targeted_pgd(&linear(&w), &x0, &target, &cfg)?.images;
        let d = (x - &x0)?.flatten_all()?.to_vec1::<f32>()?;
        // The gradient of -CE toward class 1 points along (-1, +1, 0, 0); the 0.3 step is cut to 0.1.
        let s = 0.1 / 2f32.sqrt();
        for (got, want) in d.iter().zip([-s, s, 0., 0.]) {
            assert!((got - want).abs() < 1e-6, "{d:?}");
        }
        Ok(())
    }

    #[test]
    fn linf_stays_in_box_and_best_never_worse() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, -2., 0.5, 0.], [0., 1., 0., -1.], [2., 0., 0., 1.]], &dev)?;
        let x0 = Tensor::new(&[0.0f32, 1.0, 0.3, 0.9, 0.2, 0.4, 0.6, 0.8], &dev)?.reshape((2, 1, 2, 2))?;
        let target = Tensor::new(&[2u32, 1], &dev)?;
        let cfg = PgdConfig { norm: Norm::Linf, eps: 0.05, step_size: 0.02, steps: 7, use_best: true };
        let model = linear(&w);
        let out = targeted_pgd(&model, &x0, &target, &cfg)?;
        let x = out.images;
        let d = (&x - &x0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 0.05 + 1e-6, "perturbation {d}");
        assert!(x.min_all()?.to_scalar::<f32>()? >= 0.0 && x.max_all()?.to_scalar::<f32>()? <= 1.0);
        let before = cross_entropy_per_sample(&model(&x0)?, &target)?.to_vec1::<f32>()?;
        let after = cross_entropy_per_sample(&model(&x)?, &target)?.to_vec1::<f32>()?;
        assert!(after.iter().zip(&before).all(|(a, b)| a < b), "{before:?} -> {after:?}");
        assert_eq!(out.start_loss.to_vec1::<f32>()?, before);
        assert_eq!(out.end_loss.unwrap().to_vec1::<f32>()?, after);
        Ok(())
    }

    #[test]
    fn away_raises_the_true_label_loss_and_keeps_the_highest() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, -2., 0.5, 0.], [0., 1., 0., -1.], [2., 0., 0., 1.]], &dev)?;
        let x0 = Tensor::new(&[0.1f32, 0.7, 0.3, 0.9, 0.2, 0.4, 0.6, 0.8], &dev)?.reshape((2, 1, 2, 2))?;
        let label = Tensor::new(&[0u32, 2], &dev)?;
        let cfg = PgdConfig { norm: Norm::L2, eps: 0.3, step_size: 0.5, steps: 4, use_best: true };
        let model = linear(&w);
        let out = pgd(&model, &x0, &label, &cfg, Goal::Away)?;
        let before = cross_entropy_per_sample(&model(&x0)?, &label)?.to_vec1::<f32>()?;
        let after = cross_entropy_per_sample(&model(&out.images)?, &label)?.to_vec1::<f32>()?;
        assert!(after.iter().zip(&before).all(|(a, b)| a > b), "{before:?} -> {after:?}");
        assert_eq!(out.end_loss.unwrap().to_vec1::<f32>()?, after);
        let norms = per_sample_l2_norm(&(&out.images - &x0)?)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(norms.iter().all(|n| *n <= 0.3 + 1e-5), "{norms:?}");
        Ok(())
    }
}
