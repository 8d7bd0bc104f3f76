//! Inception Score (Salimans et al., 2016) from classifier logits.
//!
//! IS = exp(E_x KL(p(y|x) || p(y))), computed on `splits` consecutive chunks of the samples (chunk
//! i = rows [i N / s, (i+1) N / s)), reporting the mean and the population standard deviation over
//! chunks, in f64. This is torch-fidelity's `isc_features_to_metric(splits=10, shuffle=False)`;
//! OpenAI's evaluator uses chunks of 5000, the same as 10 splits for the usual 50k samples.

use anyhow::{ensure, Result};

pub const DEFAULT_SPLITS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InceptionScore {
    pub mean: f64,
    pub std: f64,
}

/// Inception Score of row-major `N x classes` logits.
pub fn inception_score(logits: &[f32], classes: usize, splits: usize) -> Result<InceptionScore> {
    ensure!(
        classes > 0 && logits.len() % classes == 0,
        "logits are not N x {classes}"
    );
    let n = logits.len() / classes;
    ensure!(
        splits >= 1 && n >= splits,
        "need at least {splits} samples for {splits} splits, got {n}"
    );
    // log-softmax per row, in f64.
    let log_p: Vec<Vec<f64>> = logits
        .chunks_exact(classes)
        .map(|row| {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            row.iter().map(|&v| v as f64 - lse).collect()
        })
        .collect();
    let mut scores = Vec::with_capacity(splits);
    for i in 0..splits {
        let chunk = &log_p[i * n / splits..(i + 1) * n / splits];
        let mut q = vec![0f64; classes];
        for lp in chunk {
            for (qc, &l) in q.iter_mut().zip(lp) {
                *qc += l.exp();
            }
        }
        let log_q: Vec<f64> = q.iter().map(|&s| (s / chunk.len() as f64).ln()).collect();
        let kl: f64 = chunk
            .iter()
            .map(|lp| {
                lp.iter()
                    .zip(&log_q)
                    .map(|(&l, &lq)| l.exp() * (l - lq))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / chunk.len() as f64;
        scores.push(kl.exp());
    }
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / splits as f64;
    Ok(InceptionScore {
        mean,
        std: var.sqrt(),
    })
}
