//! Winograd's F(2x2, 3x3) convolution of a group of samples, f32: 3x3 kernel, stride 1, padding 1,
//! a map of even height and width.
//!
//! A direct convolution spends 36 multiply-adds on each 2x2 output tile of every (output, input)
//! channel pair; this one spends 16 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016). The kernel and every 4x4 input patch (the tile's window) go to a 4x4
//! transformed domain, `U = G g G^T` and `V = B^T d B`, where the convolution is the elementwise
//! product summed over input channels: 16 matrix products `[c_out, c_in] x [c_in, tiles]`, which
//! gemm does. The output tile comes back as `A^T M A`. The transforms of the input and the output
//! are additions only, so with a hundred or more channels the products are nearly all the work.
//! Those additions round too: the results differ from a direct convolution's by a few f32 ulps of
//! the terms' magnitudes (the unit tests allow 4e-6 of it; against candle's convolution the largest
//! difference was 4.6e-7 to 7.9e-7 of the largest output, `conv_grad`'s wide-layer test).
//!
//! What F(4x4, 3x3) ([`crate::winograd4`]) shares with it lives here too: [`Algorithm`], with the
//! kernel's transform and the convolution around the products, and the thread's [`Scratch`].

use std::mem::MaybeUninit;

use crate::matmul::{matmul, Operand, Write};
use crate::vector::with_avx2;

/// Entries of a transformed 4x4 tile; the products are one matrix product per entry.
const ENTRIES: usize = 16;

/// What tells one Winograd algorithm, F(t x t, 3x3), from another: the `ENTRIES` of a transformed
/// tile (`(t + 2)^2`), the output tile's side `t`, and the transforms. The rest, the kernel's
/// transform in blocks and the convolution around the products, is the same for both.
pub(crate) struct Algorithm<const ENTRIES: usize> {
    pub(crate) tile: usize,
    /// `G g G^T` of a block of kernels: `block[entry][p]` from `taps[3i + j][p]` = `g[i][j]`.
    pub(crate) kernel_block: fn(&[[f64; BLOCK]; 9], &mut [[f32; BLOCK]; ENTRIES]),
    pub(crate) input: InputTransform,
    pub(crate) output: OutputTransform,
}

/// `B^T d B` of one sample's patches into its columns: `(x, v, columns, c_in, h, w)`.
pub(crate) type InputTransform = fn(&[f32], &mut [f32], Columns, usize, usize, usize);

/// `A^T M A` of one sample's tiles from its columns: `(products, y, columns, c_out, h, w)`.
pub(crate) type OutputTransform = fn(&[f32], &mut [MaybeUninit<f32>], Columns, usize, usize, usize);

/// Winograd's F(2x2, 3x3).
pub(crate) const F2: Algorithm<ENTRIES> =
    Algorithm { tile: 2, kernel_block: transform_kernel_block, input: transform_input, output: transform_output };

/// Channel pairs per block of [`Algorithm::transform_kernel`].
pub(crate) const BLOCK: usize = 64;

impl<const ENTRIES: usize> Algorithm<ENTRIES> {
    /// Whether [`Algorithm::conv3x3`] takes a map of `h x w`: one made of whole tiles.
    pub(crate) fn supports(&self, h: usize, w: usize) -> bool {
        h > 0 && w > 0 && h.is_multiple_of(self.tile) && w.is_multiple_of(self.tile)
    }

    /// The output tiles of one `h x w` sample.
    pub(crate) fn tiles(&self, h: usize, w: usize) -> usize {
        (h / self.tile) * (w / self.tile)
    }

    /// The kernel `[c_out, c_in, 3, 3]` in the transformed domain: `[ENTRIES, c_out, c_in]`, matrix
    /// `(t + 2) a + b` holding entry `(a, b)` of `G g G^T` for every channel pair (computed in f64).
    /// It is made on every call (F(4x4)'s is four times the kernel's size), so it goes in blocks of
    /// channel pairs: their taps gathered into rows, the transform vectorized along the rows, each
    /// entry's row copied out whole. One pair at a time, storing `ENTRIES` values far apart, F(4x4)'s
    /// took a tenth of the guided sampling step.
    pub(crate) fn transform_kernel(&self, weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
        assert_eq!(weight.len(), c_out * c_in * 9, "winograd: kernel of {c_out}x{c_in}x3x3 expected");
        let pairs = c_out * c_in;
        let mut transformed = vec![0f32; ENTRIES * pairs];
        let mut taps = [[0f64; BLOCK]; 9];
        let mut block = [[0f32; BLOCK]; ENTRIES];
        for (first, kernels) in weight.chunks(9 * BLOCK).enumerate().map(|(b, k)| (b * BLOCK, k)) {
            for (p, k) in kernels.chunks_exact(9).enumerate() {
                for (tap, &v) in taps.iter_mut().zip(k) {
                    tap[p] = v as f64;
                }
            }
            (self.kernel_block)(&taps, &mut block);
            let n = kernels.len() / 9;
            for (entry, values) in block.iter().enumerate() {
                transformed[entry * pairs + first..][..n].copy_from_slice(&values[..n]);
            }
        }
        transformed
    }

    /// `y = conv2d(x, weight, stride 1, padding 1)` for a group of samples: `x` `[n, c_in, h, w]`,
    /// `y` `[n, c_out, h, w]` (overwritten), `kernel` from [`Algorithm::transform_kernel`];
    /// `threads` is gemm's parallelism. The samples' tiles sit side by side in each of the
    /// `ENTRIES` products, `[c_out, c_in] x [c_in, n * tiles]`: on small maps (F(2x2): 16 tiles on
    /// 8x8, 4 on 4x4) one sample alone leaves gemm too narrow a product to run fast.
    pub(crate) fn conv3x3(
        &self,
        x: &[f32],
        kernel: &[f32],
        y: &mut [MaybeUninit<f32>],
        scratch: &mut Scratch,
        (c_in, c_out, h, w): (usize, usize, usize, usize),
        threads: gemm::Parallelism,
    ) {
        let t = self.tile;
        assert!(self.supports(h, w), "winograd: a {h}x{w} map is not made of {t}x{t} tiles");
        let (sample_in, sample_out) = (c_in * h * w, c_out * h * w);
        let n = x.len() / sample_in.max(1);
        assert!(x.len() == n * sample_in && y.len() == n * sample_out && kernel.len() == ENTRIES * c_out * c_in);
        let tiles = self.tiles(h, w);
        let columns = n * tiles;
        scratch.input.resize(ENTRIES * c_in * columns, 0.0);
        scratch.products.resize(ENTRIES * c_out * columns, 0.0);
        for (s, x) in x.chunks_exact(sample_in).enumerate() {
            (self.input)(x, &mut scratch.input, Columns { count: columns, first: s * tiles }, c_in, h, w);
        }
        for entry in 0..ENTRIES {
            let u = &kernel[entry * c_out * c_in..][..c_out * c_in];
            let v = &scratch.input[entry * c_in * columns..][..c_in * columns];
            let m = &mut scratch.products[entry * c_out * columns..][..c_out * columns];
            // SAFETY: `m` holds c_out x columns entries, `u` c_out x c_in and `v` c_in x columns.
            unsafe { matmul(m.as_mut_ptr(), Write::Overwrite, u, Operand::RowMajor, v, Operand::RowMajor, (c_out, c_in, columns), threads) };
        }
        for (s, y) in y.chunks_exact_mut(sample_out).enumerate() {
            (self.output)(&scratch.products, y, Columns { count: columns, first: s * tiles }, c_out, h, w);
        }
    }
}

/// `G g G^T` for each column `p` of a block of kernels, `taps[3i + j][p]` = `g[i][j]`: entry `(a,
/// b)` into `block[4a + b][p]`.
fn transform_kernel_block(taps: &[[f64; BLOCK]; 9], block: &mut [[f32; BLOCK]; ENTRIES]) {
    with_avx2!(transform_kernel_block_avx2, (taps: &[[f64; BLOCK]; 9], block: &mut [[f32; BLOCK]; ENTRIES]), {
        // `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]` applied to three values.
        let g = |a: f64, b: f64, c: f64| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        for p in 0..BLOCK {
            let k = |i: usize, j: usize| taps[3 * i + j][p];
            // G applied to each column of the kernel, then to each row of that.
            let columns: [[f64; 4]; 3] = std::array::from_fn(|j| g(k(0, j), k(1, j), k(2, j)));
            for a in 0..4 {
                for (b, u) in g(columns[0][a], columns[1][a], columns[2][a]).into_iter().enumerate() {
                    block[a * 4 + b][p] = u as f32;
                }
            }
        }
    })
}

/// One thread's buffers for [`Algorithm::conv3x3`] (either algorithm's), grown on first use and
/// reused.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The transformed input, `[ENTRIES, c_in, samples * tiles]`.
    input: Vec<f32>,
    /// The products, `[ENTRIES, c_out, samples * tiles]`.
    products: Vec<f32>,
}

/// Where one sample's tiles are in a transformed matrix's rows: `count` columns in all, the
/// sample's from `first` on.
#[derive(Clone, Copy)]
pub(crate) struct Columns {
    pub(crate) count: usize,
    pub(crate) first: usize,
}

/// `V = B^T d B` for every 4x4 patch `d` (rows `2i-1 ..= 2i+2`, columns `2j-1 ..= 2j+2` of the
/// zero-padded plane) of every channel of one sample, into its `columns` of `v` `[16, c_in,
/// columns.count]`, tiles row-major. With
/// `B^T = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]]` both passes are differences of
/// neighbours: the rows of a band of 4 first, then the columns of each result.
fn transform_input(x: &[f32], v: &mut [f32], columns: Columns, c_in: usize, h: usize, w: usize) {
    with_avx2!(transform_input_avx2, (x: &[f32], v: &mut [f32], columns: Columns, c_in: usize, h: usize, w: usize), {
        match w / 2 {
            2 => transform_input_loops::<2>(x, v, columns, c_in, h, w),
            4 => transform_input_loops::<4>(x, v, columns, c_in, h, w),
            8 => transform_input_loops::<8>(x, v, columns, c_in, h, w),
            16 => transform_input_loops::<16>(x, v, columns, c_in, h, w),
            _ => transform_input_loops::<0>(x, v, columns, c_in, h, w),
        }
    })
}

/// [`transform_input`]'s loops, inlined into each of its two compilations. `TILE_COLS` is `w / 2`
/// when not 0: with the trip count known, the compiler vectorizes short rows whole (otherwise rows
/// of 8 or 4 tiles ran entirely in its scalar remainder loop).
#[inline(always)]
fn transform_input_loops<const TILE_COLS: usize>(x: &[f32], v: &mut [f32], columns: Columns, c_in: usize, h: usize, w: usize) {
    let (w, tile_cols) = if TILE_COLS > 0 { (2 * TILE_COLS, TILE_COLS) } else { (w, w / 2) };
    let tile_rows = h / 2;
    let zeros = vec![0f32; w];
    // The row pass's four results over the padded columns; the padding columns stay zero.
    let mut t = [(); 4].map(|_| vec![0f32; w + 2]);
    for (ci, plane) in x.chunks_exact(h * w).enumerate() {
        let row = |r: usize| if (1..=h).contains(&r) { &plane[(r - 1) * w..][..w] } else { &zeros[..] };
        for i in 0..tile_rows {
            // Padded rows 2i ..= 2i + 3.
            let [d0, d1, d2, d3] = [row(2 * i), row(2 * i + 1), row(2 * i + 2), row(2 * i + 3)];
            let [t0, t1, t2, t3] = &mut t;
            let (t0, t1, t2, t3) = (&mut t0[1..=w], &mut t1[1..=w], &mut t2[1..=w], &mut t3[1..=w]);
            for c in 0..w {
                t0[c] = d0[c] - d2[c];
                t1[c] = d1[c] + d2[c];
                t2[c] = d2[c] - d1[c];
                t3[c] = d1[c] - d3[c];
            }
            for (a, t) in t.iter().enumerate() {
                let entry = |b: usize| {
                    let start = ((a * 4 + b) * c_in + ci) * columns.count + columns.first + i * tile_cols;
                    start..start + tile_cols
                };
                column_pass(t, v.get_disjoint_mut([0, 1, 2, 3].map(entry)).expect("distinct entries"));
            }
        }
    }
}

/// The column pass of [`transform_input`] on one row-pass result `t` over the padded columns
/// (`2n + 2` of them): tile `j` takes columns `2j ..= 2j + 3`, and `v[b][j]` is entry `b` of `B^T` times
/// them. Four tiles at a time with SSE (part of x86_64), whose shuffles split the columns by
/// parity: the compiler unrolled the strided reads into scalar code.
#[inline]
fn column_pass(t: &[f32], [v0, v1, v2, v3]: [&mut [f32]; 4]) {
    let n = v0.len();
    assert!(t.len() == 2 * n + 2 && v1.len() == n && v2.len() == n && v3.len() == n);
    #[allow(unused_mut)]
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    while j + 4 <= n {
        use std::arch::x86_64::*;
        // SAFETY: SSE is part of x86_64; the loads read t[2j .. 2j + 10] (within 2n + 2) and the
        // stores write v[b][j .. j + 4].
        unsafe {
            let at = t.as_ptr().add(2 * j);
            let split = |lo: *const f32| {
                let (lo, hi) = (_mm_loadu_ps(lo), _mm_loadu_ps(lo.add(4)));
                (_mm_shuffle_ps::<0b10_00_10_00>(lo, hi), _mm_shuffle_ps::<0b11_01_11_01>(lo, hi))
            };
            let ((even, odd), (even_next, odd_next)) = (split(at), split(at.add(2)));
            _mm_storeu_ps(v0.as_mut_ptr().add(j), _mm_sub_ps(even, even_next));
            _mm_storeu_ps(v1.as_mut_ptr().add(j), _mm_add_ps(odd, even_next));
            _mm_storeu_ps(v2.as_mut_ptr().add(j), _mm_sub_ps(even_next, odd));
            _mm_storeu_ps(v3.as_mut_ptr().add(j), _mm_sub_ps(odd, odd_next));
        }
        j += 4;
    }
    for j in j..n {
        v0[j] = t[2 * j] - t[2 * j + 2];
        v1[j] = t[2 * j + 1] + t[2 * j + 2];
        v2[j] = t[2 * j + 2] - t[2 * j + 1];
        v3[j] = t[2 * j + 1] - t[2 * j + 3];
    }
}

/// `y = A^T M A` for every tile of one sample, with `A^T = [[1,1,1,0], [0,1,-1,-1]]`: the 2x2
/// output tile at rows `2i, 2i+1` and columns `2j, 2j+1` from entry `(a, b)` of the tile's products
/// in `products[4a + b, co, columns.first + tile]`.
fn transform_output(products: &[f32], y: &mut [MaybeUninit<f32>], columns: Columns, c_out: usize, h: usize, w: usize) {
    with_avx2!(transform_output_avx2, (products: &[f32], y: &mut [MaybeUninit<f32>], columns: Columns, c_out: usize, h: usize, w: usize), {
        transform_output_loops(products, y, columns, c_out, h, w)
    })
}

/// [`transform_output`]'s loops, inlined into each of its two compilations. Unlike the input's,
/// they need no known row width: [`output_tiles`] works in fixed blocks of four tiles.
#[inline(always)]
fn transform_output_loops(products: &[f32], y: &mut [MaybeUninit<f32>], columns: Columns, c_out: usize, h: usize, w: usize) {
    let tile_cols = w / 2;
    for (co, plane) in y.chunks_exact_mut(h * w).enumerate() {
        for (i, rows) in plane.chunks_exact_mut(2 * w).enumerate() {
            let m: [&[f32]; ENTRIES] =
                std::array::from_fn(|entry| &products[(entry * c_out + co) * columns.count + columns.first + i * tile_cols..][..tile_cols]);
            let (top, bottom) = rows.split_at_mut(w);
            output_tiles(m, top, bottom);
        }
    }
}

/// One row of output tiles: from the products `m[4a + b][j]` of each tile `j`, its 2x2 outputs
/// into `top[2j ..= 2j + 1]` and `bottom[2j ..= 2j + 1]`. Columns first,
/// `p_a = m[a][0] + m[a][1] + m[a][2]` and `q_a = m[a][1] - m[a][2] - m[a][3]`, then rows. Four tiles at a time with SSE,
/// whose unpacks interleave the two columns of each output row.
#[inline]
fn output_tiles(m: [&[f32]; ENTRIES], top: &mut [MaybeUninit<f32>], bottom: &mut [MaybeUninit<f32>]) {
    let n = m[0].len();
    assert!(m.iter().all(|m| m.len() == n) && top.len() == 2 * n && bottom.len() == 2 * n);
    #[allow(unused_mut)]
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    while j + 4 <= n {
        use std::arch::x86_64::*;
        // SAFETY: SSE is part of x86_64; the loads read m[k][j .. j + 4] and the stores write
        // top and bottom [2j .. 2j + 8].
        unsafe {
            let m: [__m128; ENTRIES] = std::array::from_fn(|k| _mm_loadu_ps(m[k].as_ptr().add(j)));
            let p: [__m128; 4] = std::array::from_fn(|a| _mm_add_ps(_mm_add_ps(m[4 * a], m[4 * a + 1]), m[4 * a + 2]));
            let q: [__m128; 4] = std::array::from_fn(|a| _mm_sub_ps(_mm_sub_ps(m[4 * a + 1], m[4 * a + 2]), m[4 * a + 3]));
            let rows = [
                (top.as_mut_ptr(), _mm_add_ps(_mm_add_ps(p[0], p[1]), p[2]), _mm_add_ps(_mm_add_ps(q[0], q[1]), q[2])),
                (bottom.as_mut_ptr(), _mm_sub_ps(_mm_sub_ps(p[1], p[2]), p[3]), _mm_sub_ps(_mm_sub_ps(q[1], q[2]), q[3])),
            ];
            for (row, left, right) in rows {
                let row = (row as *mut f32).add(2 * j);
                _mm_storeu_ps(row, _mm_unpacklo_ps(left, right));
                _mm_storeu_ps(row.add(4), _mm_unpackhi_ps(left, right));
            }
        }
        j += 4;
    }
    for j in j..n {
        let p: [f32; 4] = std::array::from_fn(|a| m[4 * a][j] + m[4 * a + 1][j] + m[4 * a + 2][j]);
        let q: [f32; 4] = std::array::from_fn(|a| m[4 * a + 1][j] - m[4 * a + 2][j] - m[4 * a + 3][j]);
        top[2 * j].write(p[0] + p[1] + p[2]);
        top[2 * j + 1].write(q[0] + q[1] + q[2]);
        bottom[2 * j].write(p[1] - p[2] - p[3]);
        bottom[2 * j + 1].write(q[1] - q[2] - q[3]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::direct_conv::tests::{naive_conv3x3, test_operands};

    /// `algorithm` against a naive convolution on each shape `(c_in, c_out, h, w)`: every output
    /// within `tolerance` of the magnitude of its terms (a missed or repeated term is off by one
    /// term's size, about 0.25, far above it).
    pub(crate) fn assert_matches_naive<const E: usize>(algorithm: &Algorithm<E>, shapes: &[(usize, usize, usize, usize)], tolerance: f64) {
        for &(c_in, c_out, h, w) in shapes {
            let (x, weight) = test_operands(c_in, c_out, h, w);
            let (expected, magnitude) = naive_conv3x3(&x, &weight, (c_in, c_out, h, w));
            let mut y = vec![MaybeUninit::new(f32::NAN); c_out * h * w];
            let kernel = algorithm.transform_kernel(&weight, c_out, c_in);
            algorithm.conv3x3(&x, &kernel, &mut y, &mut Scratch::default(), (c_in, c_out, h, w), gemm::Parallelism::None);
            for ((a, b), m) in y.iter().zip(&expected).zip(&magnitude) {
                let a = unsafe { a.assume_init() };
                assert!((a as f64 - b).abs() <= tolerance * (1.0 + m), "{c_in}x{c_out} {h}x{w}: {a} vs {b}");
            }
        }
    }

    /// For each case `(c_in, c_out, h, w, n)`, a group of `n` samples in one call of `algorithm`
    /// gives each sample what it gets alone, within `tolerance`, however many columns the group
    /// makes; one scratch serves every call, so what a larger call left in it must not matter.
    pub(crate) fn assert_group_matches_samples_alone<const E: usize>(algorithm: &Algorithm<E>, cases: &[(usize, usize, usize, usize, usize)], tolerance: f32) {
        let mut scratch = Scratch::default();
        for &(c_in, c_out, h, w, n) in cases {
            let (x, weight) = test_operands(c_in, c_out, h, w);
            let xs: Vec<f32> = (0..n).flat_map(|k| x.iter().map(move |v| v * (1.0 - 0.1 * k as f32))).collect();
            let kernel = algorithm.transform_kernel(&weight, c_out, c_in);
            let mut run = |x: &[f32]| {
                let mut y = vec![MaybeUninit::new(f32::NAN); x.len() / c_in * c_out];
                algorithm.conv3x3(x, &kernel, &mut y, &mut scratch, (c_in, c_out, h, w), gemm::Parallelism::None);
                y.into_iter().map(|v| unsafe { v.assume_init() }).collect::<Vec<f32>>()
            };
            let together = run(&xs);
            let alone: Vec<f32> = xs.chunks(c_in * h * w).flat_map(&mut run).collect();
            for (a, b) in together.iter().zip(&alone) {
                assert!(a.is_finite() && (a - b).abs() <= tolerance * (1.0 + b.abs()), "{c_in}x{c_out} {h}x{w} n={n}: {a} vs {b}");
            }
        }
    }

    /// Square and oblong maps, 2x2 up to 32x32, odd channel counts, more input channels than
    /// gemm's inner block.
    #[test]
    fn matches_naive_convolution() {
        assert_matches_naive(&F2, &[(1, 1, 2, 2), (3, 8, 8, 8), (5, 3, 6, 16), (7, 16, 32, 32), (2, 5, 4, 10), (300, 6, 4, 4), (9, 10, 16, 8)], 4e-6);
    }

    /// The products see the same terms in the same order in a group as alone.
    #[test]
    fn group_matches_samples_alone() {
        assert_group_matches_samples_alone(&F2, &[(5, 3, 4, 4, 3), (16, 24, 8, 8, 5), (3, 7, 2, 6, 2)], 1e-6);
    }

    /// The scratch buffers carry nothing from one call to the next, even from a larger shape.
    #[test]
    fn scratch_reuse_is_harmless() {
        let mut scratch = Scratch::default();
        for &(c_in, c_out, h, w) in &[(8, 8, 16, 16), (3, 4, 4, 6)] {
            let (x, weight) = test_operands(c_in, c_out, h, w);
            let (expected, magnitude) = naive_conv3x3(&x, &weight, (c_in, c_out, h, w));
            let mut y = vec![MaybeUninit::new(f32::NAN); c_out * h * w];
            F2.conv3x3(&x, &F2.transform_kernel(&weight, c_out, c_in), &mut y, &mut scratch, (c_in, c_out, h, w), gemm::Parallelism::None);
            for ((a, b), m) in y.iter().zip(&expected).zip(&magnitude) {
                assert!((unsafe { a.assume_init() } as f64 - b).abs() <= 4e-6 * (1.0 + m));
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::direct_conv;
    use crate::winograd4::F4;

    /// One convolution of a group of samples, `(x, y)`, as the timing repeats it.
    type Convolve<'a> = dyn FnMut(&[f32], &mut [MaybeUninit<f32>]) + 'a;

    /// `cargo test --release -p bigroc-models --lib winograd::timing -- --ignored --nocapture`: one
    /// core, F(2x2) and F(4x4) against the direct kernel and im2col + gemm, each over a batch of 16
    /// distinct samples (Winograd one sample per call and in groups of 4 and 16, as the ops run
    /// them), best of 5 passes; GFLOP/s of the direct convolution's multiply-adds. Also the
    /// shortest of 5 F(4x4) kernel transforms (made on every call, four times the kernel's size).
    #[test]
    #[ignore]
    fn winograd_against_direct() {
        for &(c_in, c_out, hw) in &[(3, 32, 32), (32, 32, 32), (64, 64, 32), (128, 128, 32), (256, 128, 32), (384, 128, 32), (256, 256, 32), (32, 32, 16), (64, 64, 16), (128, 128, 16), (128, 256, 16), (256, 256, 16), (384, 256, 16), (512, 256, 16), (32, 32, 8), (64, 64, 8), (128, 128, 8), (256, 256, 8), (512, 256, 8), (512, 512, 8), (128, 128, 4), (256, 256, 4), (512, 512, 4)] {
            let samples = 16;
            let (sample_in, sample_out) = (c_in * hw * hw, c_out * hw * hw);
            let (x, weight) = direct_conv::tests::test_operands(c_in, c_out, hw, hw);
            let xs: Vec<f32> = (0..samples).flat_map(|k| x.iter().map(move |v| v * (1.0 + k as f32 * 0.01))).collect();
            let mut ys = vec![MaybeUninit::new(0f32); samples * sample_out];
            let flops = 2.0 * (samples * c_out * c_in * 9 * hw * hw) as f64;
            let best = |f: &mut dyn FnMut()| {
                (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        f();
                        flops / t.elapsed().as_secs_f64() / 1e9
                    })
                    .fold(0f64, f64::max)
            };
            let mut winograd = |convolve: &mut Convolve, group: usize| {
                best(&mut || {
                    for (x, y) in xs.chunks(group * sample_in).zip(ys.chunks_mut(group * sample_out)) {
                        convolve(x, y);
                    }
                })
            };
            let shape = (c_in, c_out, hw, hw);
            let (k2, k4) = (F2.transform_kernel(&weight, c_out, c_in), F4.transform_kernel(&weight, c_out, c_in));
            let mut scratch = Scratch::default();
            let groups = [1, 4, 16].map(|group| winograd(&mut |x, y| F2.conv3x3(x, &k2, y, &mut scratch, shape, gemm::Parallelism::None), group));
            let groups4 = [1, 4, 16].map(|group| winograd(&mut |x, y| F4.conv3x3(x, &k4, y, &mut scratch, shape, gemm::Parallelism::None), group));
            let kernel4_ms = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(F4.transform_kernel(&weight, c_out, c_in));
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min);
            let direct = if direct_conv::supports(c_out, hw, hw) {
                let packed = direct_conv::pack_weight(&weight, c_out, c_in);
                let mut padded = Vec::new();
                best(&mut || {
                    for (x, y) in xs.chunks_exact(sample_in).zip(ys.chunks_exact_mut(sample_out)) {
                        direct_conv::conv3x3(x, &packed, y, &mut padded, (c_in, c_out, hw, hw));
                    }
                })
            } else {
                f64::NAN
            };
            let cpu = &candle_core::Device::Cpu;
            let (one, w) = (candle_core::Tensor::zeros((1, c_in, hw, hw), candle_core::DType::F32, cpu), candle_core::Tensor::zeros((c_out, c_in, 3, 3), candle_core::DType::F32, cpu));
            let g = crate::conv::Geometry::of_forward(&one.unwrap(), &w.unwrap(), 1, 1).unwrap();
            let mut windows = vec![0f32; g.taps() * hw * hw];
            let im2col = best(&mut || {
                for (x, y) in xs.chunks_exact(sample_in).zip(ys.chunks_exact_mut(sample_out)) {
                    g.gather_sample(&mut windows, x);
                    // SAFETY: `y` holds c_out x hw^2 entries; the weight is [c_out, taps].
                    unsafe {
                        matmul(y.as_mut_ptr() as *mut f32, Write::Overwrite, &weight, Operand::RowMajor, &windows, Operand::RowMajor, (c_out, g.taps(), hw * hw), gemm::Parallelism::None)
                    };
                }
            });
            println!(
                "{c_in}->{c_out} {hw}x{hw}: F(2x2) {:.1} / {:.1} / {:.1}, F(4x4) {:.1} / {:.1} / {:.1} GFLOP/s (groups of 1 / 4 / 16), direct {direct:.1}, im2col {im2col:.1}; F(4x4) kernel transform {kernel4_ms:.2} ms",
                groups[0], groups[1], groups[2], groups4[0], groups4[1], groups4[2]
            );
        }
    }
}
