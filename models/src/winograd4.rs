//! Winograd's F(4x4, 3x3) convolution of a group of samples, f32: 3x3 kernel, stride 1, padding 1,
//! a map whose height and width are multiples of 4.
//!
//! The larger sibling of [`crate::winograd`]'s F(2x2, 3x3). Each 4x4 output tile comes from a 6x6
//! input patch through a 6x6 transformed domain (Lavin & Gray 2016, interpolation points 0, +-1,
//! +-2 and infinity): 36 products per 16 outputs where F(2x2) spends 64 and a direct convolution
//! 144, so gemm does 56% of F(2x2)'s work, and the transformed input is 2.25 values per input value
//! instead of 4. The price is rounding: the transforms scale by up to 8 (output) and 1/24 (kernel),
//! so results differ from a direct convolution's by about ten times F(2x2)'s few ulps (the unit
//! tests allow 4e-5 of the terms' magnitudes).
//!
//! Layouts follow [`crate::winograd`]: the kernel `[36, c_out, c_in]`, the transformed input `[36,
//! c_in, columns]`, the products `[36, c_out, columns]`, one column per tile, the samples' tiles side
//! by side. Both transforms work on whole rows of tiles with contiguous loops the compiler
//! vectorizes: the passes along a tile's columns first de-interleave a row into the four phases of
//! its positions (`s_c[j] = row[4j + c]`), so that tile `j`'s six inputs are `s_0..s_3[j]` and
//! `s_0, s_1[j + 1]`.

use std::mem::MaybeUninit;

use crate::vector::with_avx2;
use crate::winograd::{Algorithm, Columns, BLOCK};

/// Entries of a transformed 6x6 tile; the products are one matrix product per entry.
const ENTRIES: usize = 36;

/// Winograd's F(4x4, 3x3).
pub(crate) const F4: Algorithm<ENTRIES> =
    Algorithm { tile: 4, kernel_block: transform_kernel_block, input: transform_input, output: transform_output };

/// `G` applied to a kernel's three values along one axis: `G = [[1/4, 0, 0], [-1/6, -1/6, -1/6],
/// [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]]`.
fn g([a, b, c]: [f64; 3]) -> [f64; 6] {
    [a / 4.0, -(a + b + c) / 6.0, -(a - b + c) / 6.0, a / 24.0 + b / 12.0 + c / 6.0, a / 24.0 - b / 12.0 + c / 6.0, c]
}

/// `B^T` applied to a patch's six values along one axis: `B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4,
/// 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]`.
#[inline(always)]
fn bt([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    let (d4_d2, d4_4d2) = (d4 - d2, d4 - 4.0 * d2);
    let (d3_d1, d3_4d1) = (2.0 * (d3 - d1), d3 - 4.0 * d1);
    [4.0 * d0 - 5.0 * d2 + d4, d4_4d2 + d3_4d1, d4_4d2 - d3_4d1, d4_d2 + d3_d1, d4_d2 - d3_d1, 4.0 * d1 - 5.0 * d3 + d5]
}

/// `A^T` applied to a tile's six products along one axis: `A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1,
/// 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]`.
#[inline(always)]
fn at([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (sum12, diff12, sum34, diff34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + sum12 + sum34, diff12 + 2.0 * diff34, sum12 + 4.0 * sum34, diff12 + 8.0 * diff34 + m5]
}

/// `G g G^T` for each column `p` of a block of kernels, `taps[3i + j][p]` = `g[i][j]`: entry `(a,
/// b)` into `block[6a + b][p]`.
fn transform_kernel_block(taps: &[[f64; BLOCK]; 9], block: &mut [[f32; BLOCK]; ENTRIES]) {
    with_avx2!(transform_kernel_block_avx2, (taps: &[[f64; BLOCK]; 9], block: &mut [[f32; BLOCK]; ENTRIES]), {
        for p in 0..BLOCK {
            let k = |i: usize, j: usize| taps[3 * i + j][p];
            // G applied to each column of the kernel, then to each row of that.
            let columns: [[f64; 6]; 3] = std::array::from_fn(|j| g([k(0, j), k(1, j), k(2, j)]));
            for a in 0..6 {
                for (b, u) in g([columns[0][a], columns[1][a], columns[2][a]]).into_iter().enumerate() {
                    block[a * 6 + b][p] = u as f32;
                }
            }
        }
    })
}

/// `V = B^T d B` for every 6x6 patch `d` (rows `4i-1 ..= 4i+4`, columns `4j-1 ..= 4j+4` of the
/// zero-padded plane) of every channel of one sample, into its `columns` of `v` `[36, c_in,
/// columns.count]`, tiles row-major. A band of six rows first (`B^T` down each column), then each of
/// the six results along its row.
fn transform_input(x: &[f32], v: &mut [f32], columns: Columns, c_in: usize, h: usize, w: usize) {
    with_avx2!(transform_input_avx2, (x: &[f32], v: &mut [f32], columns: Columns, c_in: usize, h: usize, w: usize), {
        transform_input_loops(x, v, columns, c_in, h, w)
    })
}

/// [`transform_input`]'s loops, inlined into each of its two compilations.
#[inline(always)]
fn transform_input_loops(x: &[f32], v: &mut [f32], columns: Columns, c_in: usize, h: usize, w: usize) {
    let (tile_rows, tile_cols) = (h / 4, w / 4);
    let zeros = vec![0f32; w];
    // The row pass's six results over the padded columns (one zero on the left, three on the
    // right, so that the last tile's phases exist); the padding stays zero.
    let mut t = [(); 6].map(|_| vec![0f32; w + 4]);
    // One row-pass result split into the four phases of its columns.
    let mut phases = [(); 4].map(|_| vec![0f32; tile_cols + 1]);
    for (ci, plane) in x.chunks_exact(h * w).enumerate() {
        let row = |r: usize| if (1..=h).contains(&r) { &plane[(r - 1) * w..][..w] } else { &zeros[..] };
        for i in 0..tile_rows {
            // Padded rows 4i ..= 4i + 5.
            let d: [&[f32]; 6] = std::array::from_fn(|r| row(4 * i + r));
            {
                let [t0, t1, t2, t3, t4, t5] = &mut t;
                let (t0, t1, t2, t3, t4, t5) = (&mut t0[1..=w], &mut t1[1..=w], &mut t2[1..=w], &mut t3[1..=w], &mut t4[1..=w], &mut t5[1..=w]);
                let (d0, d1, d2, d3, d4, d5) = (&d[0][..w], &d[1][..w], &d[2][..w], &d[3][..w], &d[4][..w], &d[5][..w]);
                for c in 0..w {
                    [t0[c], t1[c], t2[c], t3[c], t4[c], t5[c]] = bt([d0[c], d1[c], d2[c], d3[c], d4[c], d5[c]]);
                }
            }
            for (a, t) in t.iter().enumerate() {
                deinterleave(t, &mut phases);
                let entry = |b: usize| {
                    let start = ((a * 6 + b) * c_in + ci) * columns.count + columns.first + i * tile_cols;
                    start..start + tile_cols
                };
                let n = tile_cols;
                let [s0, s1, s2, s3] = &phases;
                let (s0, s1, s2, s3, s0_next, s1_next) = (&s0[..n], &s1[..n], &s2[..n], &s3[..n], &s0[1..=n], &s1[1..=n]);
                let [v0, v1, v2, v3, v4, v5] = v.get_disjoint_mut([0, 1, 2, 3, 4, 5].map(entry)).expect("distinct entries");
                let (v0, v1, v2, v3, v4, v5) = (&mut v0[..n], &mut v1[..n], &mut v2[..n], &mut v3[..n], &mut v4[..n], &mut v5[..n]);
                for j in 0..n {
                    [v0[j], v1[j], v2[j], v3[j], v4[j], v5[j]] = bt([s0[j], s1[j], s2[j], s3[j], s0_next[j], s1_next[j]]);
                }
            }
        }
    }
}

/// `phases[c][j] = row[4j + c]` for the `phases[c].len()` groups of four in `row`.
#[inline(always)]
fn deinterleave(row: &[f32], phases: &mut [Vec<f32>; 4]) {
    let [p0, p1, p2, p3] = phases;
    let n = p0.len();
    assert!(row.len() >= 4 * n && p1.len() == n && p2.len() == n && p3.len() == n);
    #[allow(unused_mut)]
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    while j + 4 <= n {
        // SAFETY: SSE is part of x86_64; the loads read row[4j .. 4j + 16] and the stores write
        // phases[c][j .. j + 4].
        unsafe {
            let at = row.as_ptr().add(4 * j);
            let groups = transpose4([0, 4, 8, 12].map(|k| std::arch::x86_64::_mm_loadu_ps(at.add(k))));
            for (p, phase) in [&mut *p0, &mut *p1, &mut *p2, &mut *p3].into_iter().zip(groups) {
                std::arch::x86_64::_mm_storeu_ps(p.as_mut_ptr().add(j), phase);
            }
        }
        j += 4;
    }
    for (j, group) in row.chunks_exact(4).enumerate().take(n).skip(j) {
        (p0[j], p1[j], p2[j], p3[j]) = (group[0], group[1], group[2], group[3]);
    }
}

/// `y = A^T M A` for every tile of one sample: the 4x4 output tile at rows `4i ..= 4i+3` and
/// columns `4j ..= 4j+3` from entry `(a, b)` of the tile's products in `products[6a + b, co,
/// columns.first + tile]`.
fn transform_output(products: &[f32], y: &mut [MaybeUninit<f32>], columns: Columns, c_out: usize, h: usize, w: usize) {
    with_avx2!(transform_output_avx2, (products: &[f32], y: &mut [MaybeUninit<f32>], columns: Columns, c_out: usize, h: usize, w: usize), {
        transform_output_loops(products, y, columns, c_out, h, w)
    })
}

/// [`transform_output`]'s loops, inlined into each of its two compilations.
#[inline(always)]
fn transform_output_loops(products: &[f32], y: &mut [MaybeUninit<f32>], columns: Columns, c_out: usize, h: usize, w: usize) {
    let tile_cols = w / 4;
    // `A^T` along each row of products: `p[a][q][j]` is output column `q` of tile `j` from product row `a`.
    let mut p = [(); 6].map(|_| [(); 4].map(|_| vec![0f32; tile_cols]));
    // Then down the columns: `o[q][j]` for one output row.
    let mut o = [(); 4].map(|_| vec![0f32; tile_cols]);
    for (co, plane) in y.chunks_exact_mut(h * w).enumerate() {
        for (i, rows) in plane.chunks_exact_mut(4 * w).enumerate() {
            let m = |entry: usize| &products[(entry * c_out + co) * columns.count + columns.first + i * tile_cols..][..tile_cols];
            for (a, p) in p.iter_mut().enumerate() {
                let n = tile_cols;
                let (m0, m1, m2, m3, m4, m5) = (m(6 * a), m(6 * a + 1), m(6 * a + 2), m(6 * a + 3), m(6 * a + 4), m(6 * a + 5));
                let (m0, m1, m2, m3, m4, m5) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &m4[..n], &m5[..n]);
                let [p0, p1, p2, p3] = p;
                let (p0, p1, p2, p3) = (&mut p0[..n], &mut p1[..n], &mut p2[..n], &mut p3[..n]);
                for j in 0..n {
                    [p0[j], p1[j], p2[j], p3[j]] = at([m0[j], m1[j], m2[j], m3[j], m4[j], m5[j]]);
                }
            }
            for (r, row) in rows.chunks_exact_mut(w).enumerate() {
                let n = tile_cols;
                for (q, out) in o.iter_mut().enumerate() {
                    let (p0, p1, p2, p3, p4, p5) = (&p[0][q][..n], &p[1][q][..n], &p[2][q][..n], &p[3][q][..n], &p[4][q][..n], &p[5][q][..n]);
                    let out = &mut out[..n];
                    for j in 0..n {
                        out[j] = at([p0[j], p1[j], p2[j], p3[j], p4[j], p5[j]])[r];
                    }
                }
                interleave(&o, row);
            }
        }
    }
}

/// `row[4j + q] = phases[q][j]`.
#[inline(always)]
fn interleave(phases: &[Vec<f32>; 4], row: &mut [MaybeUninit<f32>]) {
    let [p0, p1, p2, p3] = phases;
    let n = p0.len();
    assert!(row.len() == 4 * n && p1.len() == n && p2.len() == n && p3.len() == n);
    #[allow(unused_mut)]
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    while j + 4 <= n {
        // SAFETY: SSE is part of x86_64; the loads read phases[q][j .. j + 4] and the stores write
        // row[4j .. 4j + 16].
        unsafe {
            let groups = transpose4([p0, p1, p2, p3].map(|p| std::arch::x86_64::_mm_loadu_ps(p.as_ptr().add(j))));
            let at = row.as_mut_ptr().add(4 * j) as *mut f32;
            for (k, group) in groups.into_iter().enumerate() {
                std::arch::x86_64::_mm_storeu_ps(at.add(4 * k), group);
            }
        }
        j += 4;
    }
    for (j, group) in row.chunks_exact_mut(4).enumerate().skip(j) {
        group[0].write(p0[j]);
        group[1].write(p1[j]);
        group[2].write(p2[j]);
        group[3].write(p3[j]);
    }
}

/// The 4x4 matrix of rows `r` transposed: vector `c` holds entry `c` of each row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose4([r0, r1, r2, r3]: [std::arch::x86_64::__m128; 4]) -> [std::arch::x86_64::__m128; 4] {
    use std::arch::x86_64::*;
    // SAFETY: SSE is part of x86_64.
    unsafe {
        let (lo01, hi01, lo23, hi23) = (_mm_unpacklo_ps(r0, r1), _mm_unpackhi_ps(r0, r1), _mm_unpacklo_ps(r2, r3), _mm_unpackhi_ps(r2, r3));
        [_mm_movelh_ps(lo01, lo23), _mm_movehl_ps(lo23, lo01), _mm_movelh_ps(hi01, hi23), _mm_movehl_ps(hi23, hi01)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::winograd::tests::{assert_group_matches_samples_alone, assert_matches_naive};

    /// Square and oblong maps, 4x4 up to 32x32, odd channel counts, more input channels than
    /// gemm's inner block.
    #[test]
    fn matches_naive_convolution() {
        assert_matches_naive(&F4, &[(1, 1, 4, 4), (3, 8, 8, 8), (5, 3, 4, 16), (7, 16, 32, 32), (2, 5, 8, 12), (300, 6, 4, 4), (9, 10, 16, 8)], 4e-5);
    }

    /// Alone, a 4x4 sample is a single column, which gemm sums in another order than a group's
    /// columns: the two differ by rounding (2e-6 here).
    #[test]
    fn group_matches_samples_alone() {
        assert_group_matches_samples_alone(&F4, &[(16, 24, 8, 8, 5), (5, 3, 4, 4, 3), (3, 7, 4, 12, 2)], 2e-5);
    }
}
