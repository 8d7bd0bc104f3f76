//! Clean and adversarial accuracy of a classifier on labelled images: the two numbers a robust
//! classifier is judged by (robustness' `--eval-only`: untargeted PGD from the clean image, no
//! random start, the best of the visited points per image).

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use serde::Serialize;

use crate::refine::pgd::{pgd, Goal, PgdConfig};
use crate::train::batches::ImageSet;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Accuracy {
    pub images: usize,
    /// Fraction of images classified correctly.
    pub clean: f64,
    /// Fraction still classified correctly after the attack (None without an attack).
    pub adversarial: Option<f64>,
}

/// Number of rows of `logits` whose argmax equals `labels`.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let hits = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(candle_core::DType::F32)?.sum_all()?;
    Ok(hits.to_scalar::<f32>()? as usize)
}

/// Accuracy of `logits_of` (pixels in [0, 1] to logits) on `data`, in batches of `batch_size`,
/// optionally under `attack` (untargeted). `on_batch(done, total)` reports progress.
pub fn accuracy(
    logits_of: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    data: &ImageSet,
    batch_size: usize,
    attack: Option<&PgdConfig>,
    device: &Device,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<Accuracy> {
    let n = data.len();
    let (mut clean, mut adversarial) = (0usize, 0usize);
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = data.batch(chunk, device)?;
        clean += correct(&logits_of(&x)?.detach(), &y)?;
        if let Some(cfg) = attack {
            let x_adv = pgd(logits_of, &x, &y, cfg, Goal::Away)?.images;
            adversarial += correct(&logits_of(&x_adv)?.detach(), &y)?;
        }
        on_batch(chunk[chunk.len() - 1] + 1, n);
    }
    Ok(Accuracy {
        images: n,
        clean: clean as f64 / n as f64,
        adversarial: attack.map(|_| adversarial as f64 / n as f64),
    })
}
