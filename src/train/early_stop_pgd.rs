//! The robust-guidance paper's adversarial examples for training a time-dependent classifier
//! (Kawar, Ganz & Elad, TMLR 2023; official code `untargeted_pgd_l2`): untargeted L2 PGD on the
//! noisy image x_t that stops, sample by sample, as soon as the sample is misclassified.
//!
//! Each of `steps` iterations evaluates the classifier on the current batch; the samples it still
//! labels correctly are *active*; if none is, the attack ends. Otherwise the gradient g of the
//! batch-mean cross-entropy with respect to the input moves the active samples only:
//! `x + step_size * g / (||g|| + 1e-10)`, then back onto the eps-ball around the start,
//! `x0 + d * eps / (max(||d||, eps) + 1e-10)` with `d = x - x0`. A sample misclassified at the
//! start is never moved; one that becomes misclassified stays where it was first misclassified.
//! There is no clamping to an image range (x_t is unbounded) and no best-iterate bookkeeping.
//!
//! Units are those of x_t: guided-diffusion's images are scaled to [-1, 1], so eps 0.5 here is
//! eps 0.25 in the [0, 1] pixel units of `refine::pgd` (see `train::timed_classifier`).

use candle_core::{Result, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::refine::pgd::cross_entropy_per_sample;

/// The attack's radius, step and number of steps, in the units of x_t (images in [-1, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopPgd {
    pub eps: f64,
    pub step_size: f64,
    pub steps: usize,
}

/// What an attack produced.
pub struct EarlyStopOutcome {
    /// The attacked batch.
    pub images: Tensor,
    /// Per sample, how many steps it moved (0: misclassified at the start).
    pub moved: Vec<u32>,
    /// Samples classified correctly before the attack (None with 0 steps: never evaluated).
    pub clean_correct: Option<usize>,
}

fn per_sample_l2_norm(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(0)?;
    let rest = vec![1usize; t.rank() - 1];
    let mut shape = vec![n];
    shape.extend(rest);
    t.sqr()?.reshape((n, ()))?.sum_keepdim(1)?.sqrt()?.reshape(shape)
}

/// Attacks `x0` (any shape with the batch first) against `labels` (u32) on the classifier
/// `logits_of`, which should hold its weights constant (only the input gradient is needed).
pub fn early_stopping_pgd(
    logits_of: &dyn Fn(&Tensor) -> Result<Tensor>,
    x0: &Tensor,
    labels: &Tensor,
    cfg: &EarlyStopPgd,
) -> Result<EarlyStopOutcome> {
    let x0 = x0.detach();
    let n = x0.dim(0)?;
    let mut x = x0.clone();
    let mut moved = vec![0u32; n];
    let mut clean_correct = None;
    let mut mask_shape = vec![n];
    mask_shape.extend(vec![1usize; x0.rank() - 1]);
    for _ in 0..cfg.steps {
        let var = Var::from_tensor(&x)?;
        let logits = logits_of(var.as_tensor())?;
        let active = logits.argmax(D::Minus1)?.eq(labels)?;
        let flags = active.to_vec1::<u8>()?;
        let correct = flags.iter().filter(|&&a| a != 0).count();
        clean_correct.get_or_insert(correct);
        if correct == 0 {
            break;
        }
        let loss = cross_entropy_per_sample(&logits, labels)?.mean_all()?;
        let grad = loss
            .backward()?
            .remove(var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("the classifier output does not depend on its input".into()))?;
        let step = grad.broadcast_div(&(per_sample_l2_norm(&grad)? + 1e-10)?)?;
        let d = ((&x + (step * cfg.step_size)?)? - &x0)?;
        let shrink = (per_sample_l2_norm(&d)?.maximum(cfg.eps)? + 1e-10)?.recip()?.affine(cfg.eps, 0.0)?;
        let projected = (&x0 + d.broadcast_mul(&shrink)?)?;
        let mask = active.reshape(mask_shape.as_slice())?.broadcast_as(x.shape())?;
        x = mask.where_cond(&projected, &x)?;
        for (m, a) in moved.iter_mut().zip(&flags) {
            *m += u32::from(*a != 0);
        }
    }
    Ok(EarlyStopOutcome { images: x, moved, clean_correct })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three classes scored by a fixed linear map of a 2-pixel input: the gradient of the
    /// cross-entropy is known in closed form, so each move can be checked by hand.
    fn linear(x: &Tensor) -> Result<Tensor> {
        let w = Tensor::new(&[[1f32, 0.], [0., 1.], [-1., -1.]], x.device())?;
        x.flatten_from(1)?.matmul(&w.t()?)
    }

    #[test]
    fn fooled_samples_stay_and_the_rest_stop_at_their_first_misclassification() -> Result<()> {
        let dev = Device::Cpu;
        // Sample 0: class 0 by a margin of 0.25: one unit step along the loss gradient (which
        // points away from class 0 toward class 1) flips it, so it moves exactly once.
        // Sample 1: labelled 2 but scored as class 0: misclassified from the start, never moves.
        // Sample 2: class 0 by a wide margin: moves every step, held inside the eps-ball.
        let x0 = Tensor::new(&[[0.5f32, 0.25], [1.0, 0.0], [3.0, -3.0]], &dev)?;
        let y = Tensor::new(&[0u32, 2, 0], &dev)?;
        let cfg = EarlyStopPgd { eps: 0.5, step_size: 0.3, steps: 4 };
        let out = early_stopping_pgd(&linear, &x0, &y, &cfg)?;
        assert_eq!(out.moved, vec![1, 0, 4]);
        assert_eq!(out.clean_correct, Some(2));
        let x = out.images.to_vec2::<f32>()?;
        assert_eq!(x[1], vec![1.0, 0.0], "an already fooled sample moved");
        // Sample 0 after its single step: along the normalized gradient of its CE.
        let g = {
            let v = Var::new(&[[0.5f32, 0.25]], &dev)?;
            let l = cross_entropy_per_sample(&linear(v.as_tensor())?, &Tensor::new(&[0u32], &dev)?)?.sum_all()?;
            l.backward()?.remove(v.as_tensor()).unwrap().to_vec2::<f32>()?[0].clone()
        };
        let gn = (g[0] * g[0] + g[1] * g[1]).sqrt();
        for i in 0..2 {
            let want = [0.5f32, 0.25][i] + 0.3 * g[i] / gn;
            assert!((x[0][i] - want).abs() < 1e-6, "{:?} vs step of {g:?}", x[0]);
        }
        let pred = linear(&out.images)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        assert_ne!(pred[0], 0, "sample 0 should be fooled after its step");
        // Sample 2 ran all 4 steps (1.2 in total) but ends on the sphere of radius eps.
        let d = ((x[2][0] - 3.0).powi(2) + (x[2][1] + 3.0).powi(2)).sqrt();
        assert!((d - 0.5).abs() < 1e-5, "distance {d}");
        Ok(())
    }

    #[test]
    fn nothing_to_attack_leaves_the_batch_alone() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &dev)?;
        let y = Tensor::new(&[2u32, 2], &dev)?;
        let out = early_stopping_pgd(&linear, &x0, &y, &EarlyStopPgd { eps: 0.5, step_size: 0.1, steps: 7 })?;
        assert_eq!(out.moved, vec![0, 0]);
        assert_eq!(out.images.to_vec2::<f32>()?, x0.to_vec2::<f32>()?);
        Ok(())
    }
}
