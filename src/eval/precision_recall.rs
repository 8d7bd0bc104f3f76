//! Improved precision and recall (Kynkäänniemi et al., 2019) on Inception pool features.
//!
//! Each feature set approximates its manifold by balls around its points, the radius of a ball
//! being the distance to the point's k-th nearest neighbour in the same set (k = 3). Precision is
//! the fraction of generated samples inside the real manifold, recall the fraction of real
//! samples inside the generated one. Same definition and comparisons (`distance <= radius`) as
//! torch-fidelity and OpenAI's guided-diffusion evaluator.
//!
//! Pairwise distances are computed block by block as `|a|^2 + |b|^2 - 2 a.b` with an f32 matmul on
//! the features' device (the way `torch.cdist` does for large inputs), so 50k x 50k never has to
//! be held in memory: one block is `block x N` floats.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

/// Neighbourhood size of the published metric.
pub const DEFAULT_K: usize = 3;
/// Rows per distance block (block x N f32 values are materialised at once).
pub const DEFAULT_BLOCK: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
}

/// Squared distances between the rows of `a` (B x d) and of `b` (N x d), given their squared
/// norms, as a row-major B x N vector clamped at 0.
fn sq_dists(a: &Tensor, a_sq: &[f32], b: &Tensor, b_sq: &[f32]) -> Result<Vec<f32>> {
    let ab = a.matmul(&b.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let n = b_sq.len();
    let mut out = ab;
    for (i, row) in out.chunks_exact_mut(n).enumerate() {
        for (v, &bj) in row.iter_mut().zip(b_sq) {
            *v = (a_sq[i] + bj - 2.0 * *v).max(0.0);
        }
    }
    Ok(out)
}

fn sq_norms(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.sqr()?.sum(D::Minus1)?.to_vec1::<f32>()?)
}

/// Squared radius of each point's k-NN ball: the (k+1)-th smallest squared distance to the set,
/// the smallest being the point itself.
pub fn knn_sq_radii(x: &Tensor, k: usize, block: usize) -> Result<Vec<f32>> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (n, _) = x.dims2()?;
    ensure!(
        n > k,
        "need more than k = {k} samples for k-NN radii, got {n}"
    );
    let norms = sq_norms(&x)?;
    let mut radii = Vec::with_capacity(n);
    for start in (0..n).step_by(block) {
        let len = block.min(n - start);
        let d = sq_dists(
            &x.narrow(0, start, len)?,
            &norms[start..start + len],
            &x,
            &norms,
        )?;
        for row in d.chunks_exact(n) {
            // The k+1 smallest values, kept sorted; most values are rejected by one comparison.
            let mut best = vec![f32::INFINITY; k + 1];
            for &v in row {
                if v < best[k] {
                    let mut i = k;
                    while i > 0 && best[i - 1] > v {
                        best[i] = best[i - 1];
                        i -= 1;
                    }
                    best[i] = v;
                }
            }
            radii.push(best[k]);
        }
    }
    Ok(radii)
}

/// Precision and recall of `fake` against `real` (both `N x d` pool features) with k-NN radii.
pub fn precision_recall(
    real: &Tensor,
    fake: &Tensor,
    k: usize,
    block: usize,
) -> Result<PrecisionRecall> {
    precision_recall_cached(real, None, fake, k, block)
}

/// [`precision_recall`] with the real set's squared k-NN radii given (as [`knn_sq_radii`] computes
/// them with the same `k`), e.g. cached in a stats file, instead of computed here.
pub fn precision_recall_cached(
    real: &Tensor,
    real_sq_radii: Option<&[f32]>,
    fake: &Tensor,
    k: usize,
    block: usize,
) -> Result<PrecisionRecall> {
    let real = real.to_dtype(DType::F32)?.contiguous()?;
    let fake = fake.to_dtype(DType::F32)?.contiguous()?;
    ensure!(
        real.dim(1)? == fake.dim(1)?,
        "feature widths differ: {} vs {}",
        real.dim(1)?,
        fake.dim(1)?
    );
    let r_real = match real_sq_radii {
        Some(r) => {
            ensure!(r.len() == real.dim(0)?, "{} cached radii for {} real features", r.len(), real.dim(0)?);
            r.to_vec()
        }
        None => knn_sq_radii(&real, k, block)?,
    };
    let r_fake = knn_sq_radii(&fake, k, block)?;
    let (n_real, n_fake) = (real.dim(0)?, fake.dim(0)?);
    let (real_sq, fake_sq) = (sq_norms(&real)?, sq_norms(&fake)?);
    // One pass over fake x real distances serves both directions.
    let mut fake_in_real = vec![false; n_fake];
    let mut real_in_fake = vec![false; n_real];
    for start in (0..n_fake).step_by(block) {
        let len = block.min(n_fake - start);
        let d = sq_dists(
            &fake.narrow(0, start, len)?,
            &fake_sq[start..start + len],
            &real,
            &real_sq,
        )?;
        for (i, row) in d.chunks_exact(n_real).enumerate() {
            let rf = r_fake[start + i];
            let mut inside = false;
            for (j, &v) in row.iter().enumerate() {
                inside |= v <= r_real[j];
                real_in_fake[j] |= v <= rf;
            }
            fake_in_real[start + i] = inside;
        }
    }
    let frac = |v: &[bool]| v.iter().filter(|&&b| b).count() as f64 / v.len() as f64;
    Ok(PrecisionRecall {
        precision: frac(&fake_in_real),
        recall: frac(&real_in_fake),
    })
}
