//! A direct 3x3, stride-1, padding-1 convolution of one sample for AVX2 + FMA CPUs, f32.
//!
//! im2col + gemm does well when the output has many channels, but with 32 or 64 (a CIFAR ResNet's
//! first stages, the embedded classifier's whole first half) every gathered window entry is used for
//! only 32-64 multiply-adds, and gemm packs the 9x window buffer once more: 33-43 GFLOP/s on one core
//! for 32 channels against 85-90 for 256. Here each output tile of 6 (or 4) channels x 16 positions
//! (two rows of 8 on an 8-wide map) lives in AVX registers while the kernel runs over input channels
//! and taps, reading the zero-padded input rows in place: no window buffer at all. Six channels give
//! 12 accumulators: FMA's latency of 4 cycles on 2 units needs 8 in flight, and more leave slack for
//! the loads; blocks of 4 take what is left of the channel count.
//!
//! The same kernel gives the input gradient of such a convolution (its adjoint is a 3x3, stride-1,
//! padding-1 convolution with the flipped, channel-swapped kernel).

use std::mem::MaybeUninit;

/// The widths of the register tiles, in output channels: each with two vectors of 8 positions, side
/// by side on one row when the map is a multiple of 16 wide, else on two consecutive rows of a map
/// 8 wide.
const WIDE_TILE: usize = 6;
const NARROW_TILE: usize = 4;

/// The blocks of output channels, `(first channel, width)`: as many [`WIDE_TILE`]s as leave a
/// multiple of [`NARROW_TILE`], then narrow ones (any even count from 4 up splits this way).
fn channel_blocks(c_out: usize) -> impl Iterator<Item = (usize, usize)> {
    let wide = (0..=c_out / WIDE_TILE).rev().find(|&n| (c_out - n * WIDE_TILE) % NARROW_TILE == 0).unwrap_or(0);
    let narrow = (c_out - wide * WIDE_TILE) / NARROW_TILE;
    let widths = std::iter::repeat_n(WIDE_TILE, wide).chain(std::iter::repeat_n(NARROW_TILE, narrow));
    widths.scan(0, |start, width| {
        let block = (*start, width);
        *start += width;
        Some(block)
    })
}

/// Whether [`conv3x3`] handles this shape on this CPU.
pub(crate) fn supports(c_out: usize, h: usize, w: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        c_out % 2 == 0
            && c_out >= NARROW_TILE
            && h > 0
            && (w % 16 == 0 || (w == 8 && h % 2 == 0))
            && crate::vector::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (c_out, h, w);
        false
    }
}

/// The kernel `[c_out, c_in, 3, 3]` regrouped for [`conv3x3`]: per block of output channels (see
/// [`channel_blocks`]), `[c_in, 3, 3, width]` starting at `first channel * c_in * 9`, so that the
/// inner loop reads consecutive weights.
pub(crate) fn pack_weight(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut packed = vec![0f32; weight.len()];
    for (start, width) in channel_blocks(c_out) {
        let block = &mut packed[start * c_in * 9..][..width * c_in * 9];
        for lane in 0..width {
            for ci in 0..c_in {
                for tap in 0..9 {
                    block[(ci * 9 + tap) * width + lane] = weight[((start + lane) * c_in + ci) * 9 + tap];
                }
            }
        }
    }
    packed
}

/// `y = conv2d(x, weight, stride 1, padding 1)` for one sample: `x` `[c_in, h, w]`, `y` `[c_out, h,
/// w]` (overwritten), `packed` from [`pack_weight`], `padded` scratch (resized here). Only for shapes
/// [`supports`] accepts.
pub(crate) fn conv3x3(
    x: &[f32],
    packed: &[f32],
    y: &mut [MaybeUninit<f32>],
    padded: &mut Vec<f32>,
    (c_in, c_out, h, w): (usize, usize, usize, usize),
) {
    assert!(supports(c_out, h, w), "conv3x3: unsupported shape");
    assert!(x.len() == c_in * h * w && y.len() == c_out * h * w && packed.len() == c_out * c_in * 9);
    // Zero border of one entry on every side; rows `w + 2` long. Every entry is written (the
    // scratch is reused between calls), the borders without a separate zeroing pass.
    let (ph, pw) = (h + 2, w + 2);
    padded.resize(c_in * ph * pw, 0.0);
    for (plane, x) in padded[..c_in * ph * pw].chunks_exact_mut(ph * pw).zip(x.chunks_exact(h * w)) {
        let (top, rest) = plane.split_at_mut(pw);
        let (rows, bottom) = rest.split_at_mut(h * pw);
        top.fill(0.0);
        bottom.fill(0.0);
        for (row, x) in rows.chunks_exact_mut(pw).zip(x.chunks_exact(w)) {
            row[0] = 0.0;
            row[1..=w].copy_from_slice(x);
            row[w + 1] = 0.0;
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supports` checked AVX2 and FMA; the kernels index within the asserted lengths.
    unsafe {
        kernel(padded, packed, y, c_in, c_out, h, w)
    }
}

/// Input floats of one band of rows in [`kernel`] (128 KB, a quarter of this EPYC's L2).
const BAND_FLOATS: usize = 32 * 1024;

/// Input channels summed per pass in [`kernel`]: a tile's input rows (32 x 3 x 18 floats) and its
/// weights (32 x 9 x 4) then stay together in half of the 32 KB L1.
const MAX_BLOCK_CHANNELS: usize = 32;

/// Tiles of 6 or 4 output channels x 2 vectors of 8 positions (side by side, or one above the
/// other on a map 8 wide).
///
/// Blocking: the input channels are summed in blocks of at most [`MAX_BLOCK_CHANNELS`], and the
/// output rows split into bands whose input rows for one block (about 128 KB) stay in L2 while
/// every block of output channels passes over them; each block's weights (at most 7 KB) then serve
/// every tile of the band from L1. Without the channel blocks, 256 or more input channels on 16x16
/// or 32x32 maps left bands of one row and weights read from L3 for one or two tiles each: 48-58
/// GFLOP/s on one core against 70-98 for narrower layers (`direct_conv::timing`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(
    padded: &[f32],
    packed: &[f32],
    y: &mut [MaybeUninit<f32>],
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
) {
    let pw = w + 2;
    let shape = Tiles::new(h, w);
    // Equal blocks of at most MAX_BLOCK_CHANNELS input channels.
    let block_channels = c_in.div_ceil(c_in.div_ceil(MAX_BLOCK_CHANNELS));
    let rows = shape.rows_per_tile;
    let band = (BAND_FLOATS / (block_channels * pw)).saturating_sub(2).max(rows).min(h) / rows * rows;
    let out = y.as_mut_ptr() as *mut f32;
    for band_start in (0..h).step_by(band) {
        let band_rows = band_start..(band_start + band).min(h);
        for ci_start in (0..c_in).step_by(block_channels) {
            let channels = ci_start..(ci_start + block_channels).min(c_in);
            for (co_start, width) in channel_blocks(c_out) {
                let weights = packed.as_ptr().add(co_start * c_in * 9);
                let out = out.add(co_start * h * w);
                let (rows, channels) = (band_rows.clone(), channels.clone());
                match width {
                    WIDE_TILE => shape.block::<WIDE_TILE>(padded.as_ptr(), weights, out, rows, channels),
                    _ => shape.block::<NARROW_TILE>(padded.as_ptr(), weights, out, rows, channels),
                }
            }
        }
    }
}

/// The tile layout for a map of `h x w`.
#[cfg(target_arch = "x86_64")]
struct Tiles {
    h: usize,
    w: usize,
    /// Where a tile's second vector sits after its first, in the padded input and in the output.
    second_in: usize,
    second_out: usize,
    rows_per_tile: usize,
    cols_per_tile: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tiles {
    fn new(h: usize, w: usize) -> Self {
        let pw = w + 2;
        let (second_in, second_out, rows_per_tile, cols_per_tile) = if w % 16 == 0 { (8, 8, 1, 16) } else { (pw, w, 2, 8) };
        Self { h, w, second_in, second_out, rows_per_tile, cols_per_tile }
    }

    /// Every tile of one block of `CO` output channels on output `rows`, summing input `channels`:
    /// written when they start at channel 0, added to the output otherwise. `weights` is the block's
    /// packing, `out` its first channel's plane.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const CO: usize>(
        &self,
        padded: *const f32,
        weights: *const f32,
        out: *mut f32,
        rows: std::ops::Range<usize>,
        channels: std::ops::Range<usize>,
    ) {
        use std::arch::x86_64::*;
        let Self { h, w, second_in, second_out, rows_per_tile, cols_per_tile } = *self;
        let (ph, pw) = (h + 2, w + 2);
        let first = channels.start == 0;
        for r in rows.step_by(rows_per_tile) {
            for x0 in (0..w).step_by(cols_per_tile) {
                let dst = |c: usize| out.add((c * h + r) * w + x0);
                let mut acc = [[_mm256_setzero_ps(); 2]; CO];
                if !first {
                    for (c, pair) in acc.iter_mut().enumerate() {
                        *pair = [_mm256_loadu_ps(dst(c)), _mm256_loadu_ps(dst(c).add(second_out))];
                    }
                }
                for ci in channels.clone() {
                    let input_rows = padded.add((ci * ph + r) * pw + x0);
                    let taps = weights.add(ci * 9 * CO);
                    for i in 0..3 {
                        for j in 0..3 {
                            let src = input_rows.add(i * pw + j);
                            let input = [_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(second_in))];
                            let tap = taps.add((i * 3 + j) * CO);
                            for (c, pair) in acc.iter_mut().enumerate() {
                                let weight = _mm256_broadcast_ss(&*tap.add(c));
                                pair[0] = _mm256_fmadd_ps(weight, input[0], pair[0]);
                                pair[1] = _mm256_fmadd_ps(weight, input[1], pair[1]);
                            }
                        }
                    }
                }
                for (c, pair) in acc.iter().enumerate() {
                    _mm256_storeu_ps(dst(c), pair[0]);
                    _mm256_storeu_ps(dst(c).add(second_out), pair[1]);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An input `[c_in, h, w]` and a kernel `[c_out, c_in, 3, 3]` of values in [-1, 1].
    pub(crate) fn test_operands(c_in: usize, c_out: usize, h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..c_in * h * w).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let weight = (0..c_out * c_in * 9).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        (x, weight)
    }

    /// The 3x3, stride-1, padding-1 convolution summed in f64, and the sums of the terms'
    /// magnitudes (which bound f32 rounding), both `[c_out, h, w]`.
    pub(crate) fn naive_conv3x3(x: &[f32], weight: &[f32], (c_in, c_out, h, w): (usize, usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
        let mut expected = vec![0f64; c_out * h * w];
        let mut magnitude = vec![0f64; c_out * h * w];
        for co in 0..c_out {
            for r in 0..h {
                for col in 0..w {
                    let (mut sum, mut abs_sum) = (0f64, 0f64);
                    for ci in 0..c_in {
                        for i in 0..3 {
                            for j in 0..3 {
                                let (rr, cc) = (r as isize + i as isize - 1, col as isize + j as isize - 1);
                                if rr >= 0 && cc >= 0 && (rr as usize) < h && (cc as usize) < w {
                                    let term = weight[((co * c_in + ci) * 3 + i) * 3 + j] as f64
                                        * x[(ci * h + rr as usize) * w + cc as usize] as f64;
                                    sum += term;
                                    abs_sum += term.abs();
                                }
                            }
                        }
                    }
                    expected[(co * h + r) * w + col] = sum;
                    magnitude[(co * h + r) * w + col] = abs_sum;
                }
            }
        }
        (expected, magnitude)
    }

    /// The channel blocks tile every even count from 4 exactly, wide blocks first.
    #[test]
    fn channel_blocks_cover_the_output_channels() {
        for c_out in (4..=520).step_by(2) {
            let blocks: Vec<_> = channel_blocks(c_out).collect();
            let mut next = 0;
            for &(start, width) in &blocks {
                assert!(start == next && (width == WIDE_TILE || width == NARROW_TILE), "{c_out}: {blocks:?}");
                next += width;
            }
            assert_eq!(next, c_out, "{c_out}: {blocks:?}");
            assert!(blocks.windows(2).all(|b| b[0].1 >= b[1].1), "{c_out}: {blocks:?}");
            assert!(blocks.iter().filter(|b| b.1 == NARROW_TILE).count() <= 2, "{c_out}: {blocks:?}");
        }
    }

    /// Against a naive convolution, for both tile shapes, a few channel counts and map sizes.
    #[test]
    fn matches_naive_convolution() {
        for &(c_in, c_out, h, w) in &[(3, 8, 8, 8), (5, 4, 6, 16), (7, 16, 16, 32), (2, 8, 4, 8), (3, 4, 3, 48), (130, 8, 6, 16), (200, 4, 8, 8), (3, 6, 4, 16), (9, 10, 8, 8), (70, 22, 2, 32)] {
            if !supports(c_out, h, w) {
                eprintln!("skipping {c_in}x{c_out} {h}x{w}: no AVX2/FMA");
                continue;
            }
            let (x, weight) = test_operands(c_in, c_out, h, w);
            let (expected, magnitude) = naive_conv3x3(&x, &weight, (c_in, c_out, h, w));
            let mut y = vec![MaybeUninit::new(f32::NAN); c_out * h * w];
            conv3x3(&x, &pack_weight(&weight, c_out, c_in), &mut y, &mut Vec::new(), (c_in, c_out, h, w));
            // A missed or repeated term is off by one term's size (about 0.25), far above this.
            for ((a, b), m) in y.iter().zip(&expected).zip(&magnitude) {
                let a = unsafe { a.assume_init() };
                assert!((a as f64 - b).abs() <= 1e-6 * (1.0 + m), "{c_in}x{c_out} {h}x{w}: {a} vs {b}");
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::conv::Geometry;
    use crate::matmul::{matmul, Operand, Write};

    /// `cargo test --release -p bigroc-models --lib direct_conv::timing -- --ignored --nocapture`:
    /// one core, the direct kernel against im2col + gemm, best of many runs.
    #[test]
    #[ignore]
    fn direct_against_im2col_gemm() -> candle_core::Result<()> {
        for &(c_in, c_out, hw) in &[(3, 32, 32), (32, 32, 32), (64, 64, 16), (64, 64, 32), (32, 32, 8), (64, 64, 8), (128, 128, 8), (128, 128, 16), (128, 128, 32), (256, 256, 8), (256, 256, 16), (512, 512, 8), (256, 128, 32), (384, 128, 32), (256, 256, 32), (512, 256, 16), (512, 256, 8)] {
            if !supports(c_out, hw, hw) {
                continue;
            }
            let x = candle_core::Tensor::randn(0f32, 1., (1, c_in, hw, hw), &candle_core::Device::Cpu)?;
            let w = candle_core::Tensor::randn(0f32, 1., (c_out, c_in, 3, 3), &candle_core::Device::Cpu)?;
            let g = Geometry::of_forward(&x, &w, 1, 1)?;
            let (x, w) = (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
            let packed = pack_weight(&w, c_out, c_in);
            let mut y = vec![MaybeUninit::new(0f32); c_out * hw * hw];
            let mut padded = Vec::new();
            let mut windows = vec![0f32; g.taps() * hw * hw];
            let mut y2 = vec![0f32; c_out * hw * hw];
            let (mut direct, mut gemm) = (f64::MAX, f64::MAX);
            let flops = 2.0 * (c_out * c_in * 9 * hw * hw) as f64;
            let reps = (2e8 / flops) as usize + 1;
            for _ in 0..7 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    conv3x3(&x, &packed, &mut y, &mut padded, (c_in, c_out, hw, hw));
                }
                direct = direct.min(t.elapsed().as_secs_f64() / reps as f64);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    g.gather_sample(&mut windows, &x);
                    unsafe {
                        matmul(y2.as_mut_ptr(), Write::Overwrite, &w, Operand::RowMajor, &windows, Operand::RowMajor, (c_out, g.taps(), hw * hw), gemm::Parallelism::None)
                    };
                }
                gemm = gemm.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            println!("{c_in}->{c_out} {hw}x{hw}: direct {:.1} GFLOP/s, im2col+gemm {:.1} GFLOP/s", flops / direct / 1e9, flops / gemm / 1e9);
        }
        Ok(())
    }
}

