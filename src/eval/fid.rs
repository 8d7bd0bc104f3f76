//! Fréchet Inception Distance between two Gaussians fitted to feature sets.
//!
//! FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}). Means and covariances are kept in
//! f64 (as numpy's `np.cov` does). The trace of the matrix square root is the sum of the square
//! roots of the eigenvalues of S1 S2 (what torch-fidelity computes; equal to pytorch-fid's
//! `trace(scipy.linalg.sqrtm(S1 S2))` in exact arithmetic), found as the eigenvalues of the similar
//! symmetric matrix S1^{1/2} S2 S1^{1/2} with faer's symmetric eigen solver. The usual safeguards
//! are kept: when the eigenvalues are not finite the computation is redone on `S + eps I`
//! (eps = 1e-6, pytorch-fid's offset); round-off negative eigenvalues count as 0 (pytorch-fid's
//! "real part"), and roots of negative eigenvalues above 1e-3 in magnitude (pytorch-fid's tolerance
//! on imaginary parts), which come from round-off on the zero eigenvalues of covariances estimated
//! from fewer samples than dimensions, are reported as a warning.

use anyhow::{bail, ensure, Result};
use faer::{linalg::matmul::matmul, Accum, Mat, MatRef, Par, Side};

/// pytorch-fid's diagonal offset for an almost singular covariance product.
pub const FID_EPS: f64 = 1e-6;
/// pytorch-fid's tolerance on the imaginary part of the square root.
pub const IMAG_TOL: f64 = 1e-3;

/// Mean and covariance of a feature set (f64), the statistics an FID needs.
#[derive(Clone, Debug)]
pub struct FidStats {
    pub mu: Vec<f64>,
    /// Row-major `dim x dim` covariance, normalised by N - 1 like `np.cov`.
    pub sigma: Vec<f64>,
    pub dim: usize,
    /// Number of samples the statistics were estimated from (0 when read from a file without it).
    pub count: usize,
}

impl FidStats {
    /// Statistics of `features`, row-major `N x dim`.
    pub fn from_features(features: &[f32], dim: usize) -> Result<Self> {
        ensure!(
            dim > 0 && features.len() % dim == 0,
            "feature buffer is not N x {dim}"
        );
        let n = features.len() / dim;
        ensure!(n >= 2, "need at least 2 samples for a covariance, got {n}");
        let mut mu = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            for (m, &x) in mu.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        mu.iter_mut().for_each(|m| *m /= n as f64);
        // Accumulate Xc^T Xc over blocks of centred rows (bounded memory for 50k x 2048).
        let mut cov = Mat::<f64>::zeros(dim, dim);
        const BLOCK: usize = 2048;
        let mut block = vec![0f64; BLOCK * dim];
        for rows in features.chunks(BLOCK * dim) {
            let r = rows.len() / dim;
            for (dst, src) in block.chunks_exact_mut(dim).zip(rows.chunks_exact(dim)) {
                for ((d, &x), m) in dst.iter_mut().zip(src).zip(&mu) {
                    *d = x as f64 - m;
                }
            }
            let xc = MatRef::from_row_major_slice(&block[..r * dim], r, dim);
            matmul(
                cov.as_mut(),
                Accum::Add,
                xc.transpose(),
                xc,
                1.0,
                Par::rayon(0),
            );
        }
        let scale = 1.0 / (n - 1) as f64;
        let sigma = (0..dim * dim)
            .map(|i| cov[(i / dim, i % dim)] * scale)
            .collect();
        Ok(FidStats {
            mu,
            sigma,
            dim,
            count: n,
        })
    }
}

/// Outcome of an FID computation, with the diagnostics pytorch-fid prints or raises on.
#[derive(Clone, Debug)]
pub struct FidResult {
    pub fid: f64,
    /// Whether the `eps * I` offset was needed.
    pub offset_used: bool,
    /// Largest |imaginary part| among the square roots of the eigenvalues of S1 S2 (from
    /// negative round-off eigenvalues).
    pub max_imag: f64,
}

fn mat(sigma: &[f64], dim: usize, offset: f64) -> Mat<f64> {
    Mat::from_fn(dim, dim, |i, j| {
        sigma[i * dim + j] + if i == j { offset } else { 0.0 }
    })
}

/// Symmetric square root of a symmetric positive semi-definite matrix (negative round-off
/// eigenvalues clamped to 0), or `None` when the eigen solver fails.
fn sqrt_psd(s: &Mat<f64>) -> Option<Mat<f64>> {
    let eig = s.self_adjoint_eigen(Side::Lower).ok()?;
    let (u, d) = (eig.U(), eig.S().column_vector());
    let n = s.nrows();
    let scaled = Mat::from_fn(n, n, |i, j| u[(i, j)] * d[j].max(0.0).sqrt());
    let mut out = Mat::<f64>::zeros(n, n);
    matmul(
        out.as_mut(),
        Accum::Replace,
        scaled.as_ref(),
        u.transpose(),
        1.0,
        Par::rayon(0),
    );
    Some(out)
}

/// tr((S1 S2)^{1/2}) and the largest "imaginary part" sqrt(-mu) over negative round-off
/// eigenvalues mu, or `None` when the eigenvalues are not finite.
///
/// S1 S2 is similar to the symmetric S1^{1/2} S2 S1^{1/2}, so both have the same (real,
/// non-negative) eigenvalues; the symmetric form is solved instead of the general eigenproblem:
/// same value, predictable cost, and no slow convergence on the many zero eigenvalues of
/// covariances estimated from fewer samples than dimensions.
fn trace_sqrt_product(s1: &Mat<f64>, s2: &Mat<f64>) -> Result<Option<(f64, f64)>> {
    let finite = |m: &Mat<f64>| m.col_iter().all(|c| c.iter().all(|x| x.is_finite()));
    if !finite(s1) || !finite(s2) {
        bail!("covariance is not finite (NaN or infinite features?)");
    }
    let dim = s1.nrows();
    let Some(root) = sqrt_psd(s1) else {
        return Ok(None);
    };
    let mut tmp = Mat::<f64>::zeros(dim, dim);
    matmul(
        tmp.as_mut(),
        Accum::Replace,
        root.as_ref(),
        s2.as_ref(),
        1.0,
        Par::rayon(0),
    );
    let mut m = Mat::<f64>::zeros(dim, dim);
    matmul(
        m.as_mut(),
        Accum::Replace,
        tmp.as_ref(),
        root.as_ref(),
        1.0,
        Par::rayon(0),
    );
    let eig = match m.self_adjoint_eigenvalues(Side::Lower) {
        Ok(e) => e,
        Err(_) => return Ok(None),
    };
    if eig.iter().any(|x| !x.is_finite()) {
        return Ok(None);
    }
    let tr = eig.iter().map(|&x| x.max(0.0).sqrt()).sum();
    let max_imag = eig
        .iter()
        .map(|&x| (-x).max(0.0).sqrt())
        .fold(0.0, f64::max);
    Ok(Some((tr, max_imag)))
}

/// FID between two sets of statistics.
pub fn frechet_distance(a: &FidStats, b: &FidStats) -> Result<FidResult> {
    ensure!(
        a.dim == b.dim,
        "feature dimensions differ: {} vs {}",
        a.dim,
        b.dim
    );
    let dim = a.dim;
    let diff2: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |s: &[f64]| (0..dim).map(|i| s[i * dim + i]).sum::<f64>();
    let (tr_a, tr_b) = (trace(&a.sigma), trace(&b.sigma));
    let (mut offset_used, mut result) = (false, None);
    for offset in [0.0, FID_EPS] {
        result = trace_sqrt_product(&mat(&a.sigma, dim, offset), &mat(&b.sigma, dim, offset))?;
        if result.is_some() {
            break;
        }
        tracing::warn!("FID: singular covariance product; adding {FID_EPS} to the diagonals");
        offset_used = true;
    }
    let Some((tr_covmean, max_imag)) = result else {
        bail!("FID: eigenvalues of the covariance product are not finite even with the offset")
    };
    if max_imag > IMAG_TOL {
        tracing::warn!(
            "FID: square root has imaginary components up to {max_imag:.2e} (ignored); \
             usually too few samples for {dim}-d features"
        );
    }
    Ok(FidResult {
        fid: diff2 + tr_a + tr_b - 2.0 * tr_covmean,
        offset_used,
        max_imag,
    })
}
