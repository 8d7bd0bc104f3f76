//! Row-major matrix products for the CPU kernels, straight into their destination, with the `gemm`
//! crate (the one candle's own CPU matmul uses).

/// How a matrix operand is stored.
#[derive(Clone, Copy)]
pub(crate) enum Operand {
    /// As used, `[rows, cols]` row-major.
    RowMajor,
    /// Transposed: stored `[cols, rows]` row-major.
    Transposed,
}

impl Operand {
    /// (column stride, row stride) of a `[rows, cols]` operand stored this way.
    fn strides(self, rows: usize, cols: usize) -> (isize, isize) {
        match self {
            Operand::RowMajor => (1, cols as isize),
            Operand::Transposed => (rows as isize, 1),
        }
    }
}

/// Whether the product overwrites its destination or adds to it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Overwrite,
    Accumulate,
}

/// `dst[m, n] (+)= lhs[m, k] x rhs[k, n]`, `dst` row-major, each operand stored as its [`Operand`]
/// says; `dst` is not read when overwritten. `threads`: gemm's own parallelism (`None` inside the
/// batch-parallel loops of [`crate::parallel`]).
///
/// # Safety
/// `dst` must be valid for reads and writes of `m * n` entries; `lhs` holds `m * k` and `rhs`
/// `k * n` entries.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: candle_core::WithDType + 'static>(
    dst: *mut T,
    write: Write,
    lhs: &[T],
    lhs_storage: Operand,
    rhs: &[T],
    rhs_storage: Operand,
    (m, k, n): (usize, usize, usize),
    threads: gemm::Parallelism,
) {
    debug_assert!(lhs.len() >= m * k && rhs.len() >= k * n && k > 0);
    let (lhs_cs, lhs_rs) = lhs_storage.strides(m, k);
    let (rhs_cs, rhs_rs) = rhs_storage.strides(k, n);
    let accumulate = write == Write::Accumulate;
    // gemm computes dst = alpha * dst + beta * lhs x rhs, reading dst only when asked to.
    let alpha = if accumulate { T::one() } else { T::zero() };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            alpha,
            T::one(),
            false,
            false,
            false,
            threads,
        )
    }
}

/// gemm's own threads, for work too small to split between the threads some other way.
pub(crate) fn gemm_threads() -> gemm::Parallelism {
    match crate::parallel::threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every storage combination and both write modes against a naive product.
    #[test]
    fn matches_naive_product() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 2.0).collect(); // [m, k]
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.37).sin()).collect(); // [k, n]
        let transpose = |v: &[f64], rows: usize, cols: usize| {
            (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect::<Vec<_>>()
        };
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        let mut expected = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                expected[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        for (lhs, ls) in [(&a, Operand::RowMajor), (&at, Operand::Transposed)] {
            for (rhs, rs) in [(&b, Operand::RowMajor), (&bt, Operand::Transposed)] {
                let mut dst = vec![f64::NAN; m * n];
                unsafe { matmul(dst.as_mut_ptr(), Write::Overwrite, lhs, ls, rhs, rs, (m, k, n), gemm::Parallelism::None) };
                unsafe { matmul(dst.as_mut_ptr(), Write::Accumulate, lhs, ls, rhs, rs, (m, k, n), gemm::Parallelism::None) };
                for (d, e) in dst.iter().zip(&expected) {
                    assert!((d - 2.0 * e).abs() < 1e-12, "{d} vs {}", 2.0 * e);
                }
            }
        }
    }
}
