//! 2D convolutions with a fast backward: [`conv2d_const_weight`] (differentiable with respect to the
//! input only: PGD, guidance) and [`conv2d_trainable`] (input and weight: training).
//!
//! BIGRoC's PGD and classifier guidance differentiate a frozen classifier with respect to its input
//! image. candle 0.11's backward of `Tensor::conv2d` always computes the kernel gradient too (a
//! convolution whose "kernel" is the whole output gradient) and gets the input gradient from
//! `conv_transpose2d`, which on CPU is a loop of dot products; together they dominate PGD's time.
//!
//! [`conv2d_const_weight`] skips the kernel gradient and computes the input gradient as the adjoint of
//! the convolution:
//! * on CPU in f32/f64, one sample at a time (`conv_bn.rs`): for stride 1 the adjoint is a
//!   convolution of the output gradient with the flipped, channel-swapped kernel (for a 3x3 kernel in
//!   f32 one of `conv3x3.rs`'s, Winograd or the direct kernel; else a gather and a gemm); otherwise,
//!   the way PyTorch does, one gemm gives every output position's contributions to its window
//!   (`W^T g`) and col2im adds them into the input positions the window covers. The forward is
//!   im2col and one gemm per sample (or a kernel of `conv3x3.rs`);
//! * on CUDA in f32 by `im2col.rs`: this crate's im2col and col2im kernels around cuBLAS gemms
//!   (the forward, the input gradient gathered back from `W^T g`, and the kernel gradient);
//! * elsewhere (half precision) with candle's own forward `conv2d` only: the output gradient,
//!   spread out with `s - 1` zeros between neighbours for stride `s`, convolved with the weight flipped
//!   in both spatial dimensions and with in/out channels swapped, padded by `k - 1 - p` (plus one more
//!   row/column at the far end for input positions past the last window, whose gradient is zero).
//!
//! [`conv2d_trainable`] adds the kernel gradient, `sum_n g_n windows_n^T`: on CPU in f32/f64 a gemm
//! per few samples over their windows gathered side by side (`[c_in * kh * kw, n * oh * ow]`, so that
//! the contraction stays long where the maps are small), each thread summing its share of the batch;
//! on CUDA in f32 the same contraction over the im2col kernel's columns; elsewhere the same
//! contraction with the windows gathered by tensor ops (one strided copy per kernel tap) and a
//! device gemm, avoiding candle's dilated-convolution formulation.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Error, Layout, MetalStorage,
    Result, Shape, Tensor, WithDType,
};

use crate::matmul::{gemm_threads, matmul, Operand, Write};
use crate::ops::PrecomputedOutput;
use crate::parallel::{for_each_chunk_init, split_by_sample};

/// `x` convolved with `weight` (`[c_out, c_in, kh, kw]`, no bias, groups 1, dilation 1, the same
/// `stride` and zero `padding` on both spatial axes), equal to `x.conv2d(weight, padding, stride, 1, 1)`.
///
/// Differentiable with respect to `x` only: the weight is used as a constant (a `Var` weight receives
/// no gradient through this op), which is what gradients of a frozen network with respect to its
/// input need, at about the cost of one more forward convolution. Runs wherever candle's `conv2d`
/// does (f32/f64 on CPU through this module's im2col; f16 on CPU and everything on CUDA through
/// candle's kernels; candle 0.11 has no bf16 matmul, hence no bf16 convolution, on CPU).
pub fn conv2d_const_weight(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let weight = weight.detach();
    let y = conv2d_untracked(&x.detach(), &weight, stride, padding)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(ConstWeightConv2d {
        weight,
        stride,
        padding,
        output: PrecomputedOutput::new(y),
    })
}

/// `x` convolved with `weight` (`[c_out, c_in, kh, kw]`, no bias, groups 1, dilation 1, the same
/// `stride` and zero `padding` on both spatial axes), equal to `x.conv2d(weight, padding, stride, 1, 1)`,
/// differentiable with respect to both: what training needs.
///
/// The forward is [`conv2d_const_weight`]'s; the backward gives the input gradient by
/// [`conv2d_input_grad`] and the kernel gradient by [`conv2d_weight_grad`], each only for an operand
/// that tracks gradients (a constant image, a frozen weight cost nothing). Unlike candle 0.11's own
/// conv2d backward it needs no `conv_transpose2d` (a naive loop on CPU and CUDA) and handles every
/// stride/shape combination.
pub fn conv2d_trainable(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = conv2d_untracked(&x.detach(), &weight.detach(), stride, padding)?;
    if !x.track_op() && !weight.track_op() {
        return Ok(y);
    }
    x.apply_op2(
        weight,
        TrainableConv2d {
            stride,
            padding,
            output: PrecomputedOutput::new(y),
        },
    )
}

/// The forward convolution of untracked operands: im2col on CPU in f32/f64, this crate's im2col
/// kernel and a batched gemm on CUDA in f32, candle's kernel elsewhere.
fn conv2d_untracked(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let geometry = Geometry::of_forward(x, weight, stride, padding)?;
    if crate::im2col::runs_on(x) {
        crate::im2col::forward(x, weight, &geometry)
    } else if uses_im2col(x) {
        crate::conv_bn::conv2d_per_sample(x, weight, geometry)
    } else {
        x.conv2d(weight, padding, stride, 1, 1)
    }
}

/// The kernel gradient of `conv2d(x, weight, stride, padding)` for a `weight` of spatial size
/// `kernel_hw`, given the gradient `grad` (`[b, c_out, oh, ow]`) of its output: `[c_out, c_in, kh, kw]`,
/// summed over the batch. f32/f64 on CPU use [`conv2d_weight_grad_im2col`], f32 on CUDA the im2col
/// kernel and one gemm, everything else [`conv2d_weight_grad_taps`].
pub fn conv2d_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    kernel_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if crate::im2col::runs_on(x) {
        let geometry = Geometry::of_weight_grad(x, grad, kernel_hw, stride, padding)?;
        crate::im2col::weight_grad(x, grad, &geometry)
    } else if uses_im2col(x) {
        conv2d_weight_grad_im2col(x, grad, kernel_hw, stride, padding)
    } else {
        conv2d_weight_grad_taps(x, grad, kernel_hw, stride, padding)
    }
}

/// [`conv2d_weight_grad`] on CPU (f32/f64): the windows of the whole batch chunk gathered channel-major,
/// `[c_in * kh * kw, n * oh * ow]`, so that the kernel gradient is one gemm with the output gradient
/// `[c_out, n * oh * ow]` (a long contraction even where the maps are small, deep in the network).
pub fn conv2d_weight_grad_im2col(
    x: &Tensor,
    grad: &Tensor,
    kernel_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    im2col_weight_grad(x, grad, kernel_hw, stride, padding, WINDOW_BUDGET)
}

fn im2col_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    kernel_hw: (usize, usize),
    stride: usize,
    padding: usize,
    budget: usize,
) -> Result<Tensor> {
    let geometry = Geometry::of_weight_grad(x, grad, kernel_hw, stride, padding)?;
    let grad = grad.reshape((geometry.b, geometry.c_out, geometry.rows.out, geometry.cols.out))?;
    x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &WeightGrad { geometry, budget })
}

/// Contraction length (output positions times samples) below which [`WeightGrad`] puts more samples
/// into one gemm: deep in a network the maps are 4x4 or 8x8, and a gemm over 16 positions spends more
/// time packing its operands than multiplying.
const MIN_CONTRACTION: usize = 512;

/// The kernel gradient `[c_out, c_in, kh, kw]` of a convolution of `geometry` from its input `x` and
/// its output's gradient: `sum over samples of grad_s [c_out, positions] x windows_s^T`. Each thread
/// takes a fixed share of the batch into a partial sum of its own (so the result does not depend on
/// which thread was fastest), a few samples per gemm (their windows side by side, `[c_in * kh * kw,
/// n * positions]`, and their gradients likewise); the partial sums are added at the end. CPU,
/// f32/f64; no backward.
struct WeightGrad {
    geometry: Geometry,
    /// Most window entries gathered at once (per thread).
    budget: usize,
}

impl WeightGrad {
    fn run<T: WithDType + Default + std::ops::AddAssign>(&self, x: &[T], grad: &[T]) -> Vec<T> {
        let g = self.geometry;
        let positions = g.rows.out * g.cols.out;
        let (sample_in, sample_out, size) = (g.c_in * g.rows.n * g.cols.n, g.c_out * positions, g.c_out * g.taps());
        let chunk = MIN_CONTRACTION
            .div_ceil(positions)
            .min(self.budget / (g.taps() * positions).max(1))
            .max(1);
        let (parts, threads) = if split_by_sample(g.b) {
            (crate::parallel::threads(), gemm::Parallelism::None)
        } else {
            (1, gemm_threads())
        };
        // The product's longer side as gemm's rows: `[taps, c_out]` (transposed at the end) when the
        // windows have more rows than the gradient. For a 3x3 layer of 32 channels on 32x32 maps
        // that took 20-26 ms instead of 67-74 (batch 128, 2 threads); 1x1 layers widening the
        // channels do better the other way round.
        let taps_major = g.taps() >= g.c_out;
        let mut partial = vec![T::zero(); parts * size];
        // Scratch: the windows, the gradients side by side, and how many samples the windows' zero
        // padding entries are laid out for.
        let scratch = || (Vec::new(), Vec::new(), 0);
        for_each_chunk_init(&mut partial, size, scratch, |(windows, grads, laid_out), part, dw| {
            let (first, end) = (part * g.b / parts, (part + 1) * g.b / parts);
            let mut write = Write::Overwrite;
            for start in (first..end).step_by(chunk) {
                let n = chunk.min(end - start);
                let columns = n * positions;
                if *laid_out != n {
                    *windows = vec![T::zero(); g.taps() * columns];
                    *laid_out = n;
                }
                let plane_windows = g.rows.k * g.cols.k * positions;
                let plane_in = g.rows.n * g.cols.n;
                for c in 0..g.c_in {
                    let block = &mut windows[c * plane_windows * n..][..plane_windows * n];
                    for j in 0..n {
                        let src = &x[(start + j) * sample_in + c * plane_in..][..plane_in];
                        g.for_each_run(|window, input, count| {
                            let (tap, position) = (window / positions, window % positions);
                            let at = (tap * n + j) * positions + position;
                            gather(&mut block[at..at + count], &src[input..], g.cols.stride)
                        })
                    }
                }
                let grads: &[T] = if n == 1 {
                    &grad[start * sample_out..][..sample_out]
                } else {
                    grads.resize(g.c_out * columns, T::zero());
                    for j in 0..n {
                        let src = &grad[(start + j) * sample_out..][..sample_out];
                        for (c, plane) in src.chunks(positions).enumerate() {
                            grads[c * columns + j * positions..][..positions].copy_from_slice(plane);
                        }
                    }
                    grads
                };
                // SAFETY: `dw` holds `c_out x taps` entries; `grads` is `[c_out, columns]` and
                // `windows` `[taps, columns]`, each read transposed as the other's partner.
                unsafe {
                    if taps_major {
                        matmul(dw.as_mut_ptr(), write, windows, Operand::RowMajor, grads, Operand::Transposed, (g.taps(), columns, g.c_out), threads)
                    } else {
                        matmul(dw.as_mut_ptr(), write, grads, Operand::RowMajor, windows, Operand::Transposed, (g.c_out, columns, g.taps()), threads)
                    }
                };
                write = Write::Accumulate;
            }
        });
        let (total, rest) = partial.split_at_mut(size);
        for part in rest.chunks(size) {
            total.iter_mut().zip(part).for_each(|(t, &p)| *t += p);
        }
        partial.truncate(size);
        if taps_major {
            // `[taps, c_out]` to `[c_out, taps]`.
            let (taps, c_out) = (g.taps(), g.c_out);
            (0..c_out * taps).map(|i| partial[(i % taps) * c_out + i / taps]).collect()
        } else {
            partial
        }
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, g: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let slice = |l: &Layout, what: &str| match l.contiguous_offsets() {
            Some(range) => Ok(range),
            None => bail!("conv2d_weight_grad: {what} must be contiguous"),
        };
        let ((xs, xe), (gs, ge)) = (slice(lx, "the input")?, slice(lg, "the gradient")?);
        let out = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(self.run(&x[xs..xe], &g[gs..ge])),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(self.run(&x[xs..xe], &g[gs..ge])),
            _ => bail!("conv2d_weight_grad: unsupported dtypes {:?}, {:?} (f32 and f64 only)", x.dtype(), g.dtype()),
        };
        let g = self.geometry;
        Ok((out, Shape::from((g.c_out, g.c_in, g.rows.k, g.cols.k))))
    }
}

/// [`conv2d_weight_grad`] with tensor ops only (any device and dtype with a matmul): the input is
/// zero-padded once and split into stride phases, `[b, c_in, h/s, s, w/s, s]`, so that every kernel
/// tap's window positions are a plain strided view; the views, stacked `[kh * kw, c_in, n * oh * ow]`
/// (one copy), meet the output gradient `[c_out, n * oh * ow]` in one gemm per batch chunk.
pub fn conv2d_weight_grad_taps(
    x: &Tensor,
    grad: &Tensor,
    kernel_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    taps_weight_grad(x, grad, kernel_hw, stride, padding, WINDOW_BUDGET)
}

fn taps_weight_grad(
    x: &Tensor,
    grad: &Tensor,
    kernel_hw: (usize, usize),
    stride: usize,
    padding: usize,
    budget: usize,
) -> Result<Tensor> {
    let g = Geometry::of_weight_grad(x, grad, kernel_hw, stride, padding)?;
    let (rows, cols) = (g.rows, g.cols);
    let (kh, kw, s) = (rows.k, cols.k, stride);
    let positions = rows.out * cols.out;
    // Padded extents: multiples of the stride reaching past the last window of the last tap.
    let (hp, wp) = (s * ((kh - 1) / s + rows.out), s * ((kw - 1) / s + cols.out));
    let pad_after = |n: usize, p: usize, full: usize| full as isize - n as isize - p as isize;
    let chunk = chunk_size(&g, budget);
    let mut total: Option<Tensor> = None;
    for start in (0..g.b).step_by(chunk) {
        let n = chunk.min(g.b - start);
        let xc = x.narrow(0, start, n)?;
        let xc = pad_or_crop(&xc, 2, padding as isize, pad_after(rows.n, padding, hp))?;
        let xc = pad_or_crop(&xc, 3, padding as isize, pad_after(cols.n, padding, wp))?
            .contiguous()?
            .reshape((n, g.c_in, hp / s, s, wp / s, s))?;
        let mut taps = Vec::with_capacity(kh * kw);
        for i in 0..kh {
            for j in 0..kw {
                // Input rows i, i + s, ...: phase i % s of the blocks from i / s on.
                let view = xc
                    .narrow(2, i / s, rows.out)?
                    .narrow(3, i % s, 1)?
                    .narrow(4, j / s, cols.out)?
                    .narrow(5, j % s, 1)?
                    .squeeze(5)?
                    .squeeze(3)?;
                taps.push(view.transpose(0, 1)?);
            }
        }
        // [kh * kw, c_in, n, oh, ow]: tap-major, so the result is permuted (a small copy) at the end.
        let windows = Tensor::stack(&taps, 0)?.reshape((kh * kw * g.c_in, n * positions))?;
        let grad = grad
            .narrow(0, start, n)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((g.c_out, n * positions))?;
        let part = grad.matmul(&windows.t()?)?;
        total = Some(match total {
            None => part,
            Some(t) => (t + part)?,
        });
    }
    let total = total.ok_or_else(|| Error::Msg("conv2d_weight_grad: empty batch".into()))?;
    total
        .reshape((g.c_out, kh * kw, g.c_in))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((g.c_out, g.c_in, kh, kw))
}

/// The input gradient of `conv2d(x, weight, stride, padding)` for an `x` of spatial size `input_hw`,
/// given the gradient `grad` (`[b, c_out, oh, ow]`) of its output: the adjoint of the convolution
/// (a transposed convolution). f32/f64 on CPU use [`conv2d_input_grad_col2im`], f32 on CUDA a
/// batched gemm and the col2im kernel, everything else [`conv2d_input_grad_conv`].
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if crate::im2col::runs_on(grad) {
        let geometry = Geometry::of_grad(grad, weight, input_hw, stride, padding)?;
        crate::im2col::input_grad(grad, weight, &geometry)
    } else if uses_im2col(grad) {
        conv2d_input_grad_col2im(grad, weight, input_hw, stride, padding)
    } else {
        conv2d_input_grad_conv(grad, weight, input_hw, stride, padding)
    }
}

/// Whether the im2col/col2im kernels of this module handle `t`'s device and dtype.
pub(crate) fn uses_im2col(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Largest window buffer of the kernel gradient (`[c_in * kh * kw, n * oh * ow]`, per thread on CPU),
/// in elements: the batch goes through in chunks of at most this size (at least one sample) to bound
/// the extra memory, `kh * kw` times the input's for stride 1.
const WINDOW_BUDGET: usize = 1 << 25;

/// Samples per chunk of at most `budget` window elements.
fn chunk_size(g: &Geometry, budget: usize) -> usize {
    (budget / (g.taps() * g.rows.out * g.cols.out).max(1)).clamp(1, g.b.max(1))
}

/// [`conv2d_input_grad`] as a gemm and a scatter-add, the way PyTorch computes it on CPU: every
/// output position's gradient times the weight gives its window's `c_in x kh x kw` contributions
/// (`W^T g`, the same multiply-adds as the forward convolution whatever the stride), which col2im adds
/// into the input positions the window covers. CPU, f32 and f64 only.
pub fn conv2d_input_grad_col2im(
    grad: &Tensor,
    weight: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let geometry = Geometry::of_grad(grad, weight, input_hw, stride, padding)?;
    crate::conv_bn::conv2d_input_grad_per_sample(grad, weight, geometry)
}

/// [`conv2d_input_grad`] with candle's forward `conv2d` only: the output gradient spread out with
/// `s - 1` zeros between neighbours, padded, and convolved (stride 1) with the weight flipped in both
/// spatial dimensions and with its in/out channels swapped. Any device and dtype candle's convolution
/// supports; costs `s^2` times the forward's multiply-adds for stride `s`, and is slow on CPU when
/// `c_in` is small (the image-facing stem).
pub fn conv2d_input_grad_conv(
    grad: &Tensor,
    weight: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let Geometry { rows, cols, .. } = Geometry::of_grad(grad, weight, input_hw, stride, padding)?;
    // [c_out, c_in, kh, kw] -> flipped, [c_in, c_out, kh, kw]: the adjoint's kernel.
    let adjoint_kernel = weight.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    // A 1x1 kernel mixes channels per position, so it commutes with spreading and padding: apply it
    // to the small gradient first instead of to the spread-out one (s^2 times fewer positions).
    let pointwise = rows.k == 1 && cols.k == 1;
    let grad = if pointwise {
        grad.conv2d(&adjoint_kernel, 0, 1, 1, 1)?
    } else {
        grad.clone()
    };
    let spread = spread_with_zeros(&grad, stride)?;
    // Padding both axes share goes to conv2d (no copy); the rest is explicit padding or cropping.
    let (rows_before, rows_after) = rows.pad_of_spread();
    let (cols_before, cols_after) = cols.pad_of_spread();
    let shared = if pointwise {
        0
    } else {
        rows_before
            .min(rows_after)
            .min(cols_before)
            .min(cols_after)
            .max(0)
    };
    let spread = pad_or_crop(&spread, 2, rows_before - shared, rows_after - shared)?;
    let spread = pad_or_crop(&spread, 3, cols_before - shared, cols_after - shared)?;
    if pointwise {
        Ok(spread)
    } else {
        spread.conv2d(&adjoint_kernel, shared as usize, 1, 1, 1)
    }
}

/// Shapes of one convolution (batch, channels, both spatial axes), checked against each other.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) b: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) rows: AxisGeometry,
    pub(crate) cols: AxisGeometry,
}

impl Geometry {
    /// The convolution of `x` (`[b, c_in, h, w]`) by `weight`.
    pub(crate) fn of_forward(
        x: &Tensor,
        weight: &Tensor,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (b, c_in, h, w) = x.dims4()?;
        let (c_out, c_in_k, kh, kw) = weight.dims4()?;
        if c_in != c_in_k {
            bail!("conv2d: input has {c_in} channels but the weight expects {c_in_k}")
        }
        Ok(Self {
            b,
            c_in,
            c_out,
            rows: AxisGeometry::new("height", h, kh, stride, padding)?,
            cols: AxisGeometry::new("width", w, kw, stride, padding)?,
        })
    }

    /// The convolution whose output gradient is `grad` (`[b, c_out, oh, ow]`), for an input of
    /// spatial size `(h, w)`.
    fn of_grad(
        grad: &Tensor,
        weight: &Tensor,
        (h, w): (usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (b, c_out, oh, ow) = grad.dims4()?;
        let (c_out_k, c_in, kh, kw) = weight.dims4()?;
        if c_out != c_out_k {
            bail!("conv2d_input_grad: gradient has {c_out} channels but the weight has {c_out_k} outputs")
        }
        let geometry = Self {
            b,
            c_in,
            c_out,
            rows: AxisGeometry::new("height", h, kh, stride, padding)?,
            cols: AxisGeometry::new("width", w, kw, stride, padding)?,
        };
        let (eh, ew) = (geometry.rows.out, geometry.cols.out);
        if (oh, ow) != (eh, ew) {
            bail!(
                "conv2d_input_grad: gradient size {oh}x{ow} does not match input {h}x{w} (kernel {kh}x{kw}, stride {stride}, padding {padding}: expected {eh}x{ew})"
            )
        }
        Ok(geometry)
    }

    /// The convolution of `x` (`[b, c_in, h, w]`) whose output gradient is `grad`, for a kernel of
    /// spatial size `(kh, kw)`.
    fn of_weight_grad(
        x: &Tensor,
        grad: &Tensor,
        (kh, kw): (usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (b, c_in, h, w) = x.dims4()?;
        let (gb, c_out, oh, ow) = grad.dims4()?;
        let geometry = Self {
            b,
            c_in,
            c_out,
            rows: AxisGeometry::new("height", h, kh, stride, padding)?,
            cols: AxisGeometry::new("width", w, kw, stride, padding)?,
        };
        let (eh, ew) = (geometry.rows.out, geometry.cols.out);
        if (gb, oh, ow) != (b, eh, ew) {
            bail!(
                "conv2d_weight_grad: gradient of shape {:?} does not match input {:?} (kernel {kh}x{kw}, stride {stride}, padding {padding}: expected batch {b}, {eh}x{ew})",
                grad.dims(),
                x.dims()
            )
        }
        Ok(geometry)
    }

    /// Entries of one window: `c_in * kh * kw`.
    pub(crate) fn taps(&self) -> usize {
        self.c_in * self.rows.k * self.cols.k
    }

    /// 1x1 kernel, stride 1, no padding: windows are the input positions themselves.
    pub(crate) fn is_pointwise(&self) -> bool {
        [self.rows, self.cols]
            .iter()
            .all(|a| a.k == 1 && a.stride == 1 && a.padding == 0)
    }

    /// Calls `f(window_start, input_start, count)` for every run of window entries of one
    /// (sample, channel) plane that come from inside the input (not from padding): window entries
    /// `window_start..window_start + count` of the plane's `[kh * kw, oh * ow]` window buffer are input
    /// entries `input_start, input_start + s, ...` of its `[h, w]` plane. Shared by im2col and col2im.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (rows, cols) = (self.rows, self.cols);
        let plane = rows.out * cols.out;
        for i in 0..rows.k {
            let (oy_first, oy_end) = rows.outputs_inside(i);
            for j in 0..cols.k {
                let (ox_first, ox_end) = cols.outputs_inside(j);
                if ox_first == ox_end {
                    continue;
                }
                let x_first = ox_first * cols.stride + j - cols.padding;
                let tap = (i * cols.k + j) * plane;
                for oy in oy_first..oy_end {
                    let y = oy * rows.stride + i - rows.padding;
                    f(
                        tap + oy * cols.out + ox_first,
                        y * cols.n + x_first,
                        ox_end - ox_first,
                    );
                }
            }
        }
    }
}

/// One spatial axis of the convolution: input length `n`, kernel `k`, output length `out`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AxisGeometry {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) out: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl AxisGeometry {
    fn new(axis: &str, n: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        if stride == 0 || k == 0 {
            bail!("conv2d: stride ({stride}) and kernel {axis} ({k}) must be positive")
        }
        if n + 2 * padding < k {
            bail!("conv2d: input {axis} {n} with padding {padding} is smaller than the kernel {k}")
        }
        Ok(Self {
            n,
            k,
            out: (n + 2 * padding - k) / stride + 1,
            stride,
            padding,
        })
    }

    /// The output positions whose window puts kernel tap `i` inside the input (not on padding):
    /// `o` in `first..end` with `0 <= o * s + i - p < n`.
    fn outputs_inside(&self, i: usize) -> (usize, usize) {
        let first = self.padding.saturating_sub(i).div_ceil(self.stride);
        let end = if self.n + self.padding > i {
            ((self.n + self.padding - i - 1) / self.stride + 1).min(self.out)
        } else {
            0
        };
        (first.min(end), end)
    }

    /// Zeros to add (negative: entries to drop) before and after the spread gradient, whose length is
    /// `out * s` (the last `s - 1` entries being zeros), so that a stride-1 valid convolution with
    /// the `k`-long adjoint kernel yields exactly `n` positions. Input positions past the last window,
    /// `(n + 2p - k) mod s` of them, get padding and hence a zero gradient.
    fn pad_of_spread(&self) -> (isize, isize) {
        let (k, s, p) = (self.k as isize, self.stride as isize, self.padding as isize);
        let uncovered = ((self.n + 2 * self.padding - self.k) % self.stride) as isize;
        (k - 1 - p, k - 1 - p + uncovered - (s - 1))
    }
}

/// `[b, c, h, w]` -> `[b, c, h * s, w * s]` with each entry followed by `s - 1` zeros along both spatial
/// axes (entry `(i, j)` moves to `(i * s, j * s)`).
fn spread_with_zeros(t: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let (b, c, h, w) = t.dims4()?;
    t.reshape((b, c, h, 1, w, 1))?
        .pad_with_zeros(5, 0, s - 1)?
        .pad_with_zeros(3, 0, s - 1)?
        .reshape((b, c, h * s, w * s))
}

/// Adds `before`/`after` zeros along `dim`, or drops entries where they are negative.
fn pad_or_crop(t: &Tensor, dim: usize, before: isize, after: isize) -> Result<Tensor> {
    let len = t.dim(dim)? as isize;
    let (drop_before, drop_after) = ((-before).max(0), (-after).max(0));
    let t = if drop_before + drop_after > 0 {
        if drop_before + drop_after >= len {
            bail!("conv2d_input_grad: padding too large for the kernel along dimension {dim}")
        }
        t.narrow(
            dim,
            drop_before as usize,
            (len - drop_before - drop_after) as usize,
        )?
    } else {
        t.clone()
    };
    t.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)
}

/// The op [`conv2d_const_weight`] puts in the graph (input gradient only).
struct ConstWeightConv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    output: PrecomputedOutput,
}

impl CustomOp1 for ConstWeightConv2d {
    fn name(&self) -> &'static str {
        "conv2d-const-weight"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output.take_cpu(self.name())
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.output.take_cuda(self.name())
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.output.take_metal(self.name())
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        conv2d_input_grad(grad_res, &self.weight, (h, w), self.stride, self.padding).map(Some)
    }
}

/// The op [`conv2d_trainable`] puts in the graph: gradients for the input and the weight, each only
/// when that operand tracks gradients.
struct TrainableConv2d {
    stride: usize,
    padding: usize,
    output: PrecomputedOutput,
}

impl CustomOp2 for TrainableConv2d {
    fn name(&self) -> &'static str {
        "conv2d-trainable"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output.take_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.output.take_cuda(self.name())
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.output.take_metal(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = weight.dims4()?;
        let (stride, padding) = (self.stride, self.padding);
        let grad_x = if x.track_op() {
            Some(conv2d_input_grad(
                grad_res,
                &weight.detach(),
                (h, w),
                stride,
                padding,
            )?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            Some(conv2d_weight_grad(
                &x.detach(),
                grad_res,
                (kh, kw),
                stride,
                padding,
            )?)
        } else {
            None
        };
        Ok((grad_x, grad_weight))
    }
}

/// Copies `dst.len()` input entries from `src` on, every `stride`-th, to `dst`.
fn gather<T: Copy>(dst: &mut [T], src: &[T], stride: usize) {
    if stride == 1 {
        dst.copy_from_slice(&src[..dst.len()]);
    } else {
        for (d, &s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
            *d = s;
        }
    }
}

impl Geometry {
    /// One (sample, channel) plane's windows, `[kh * kw, oh * ow]`, gathered from its `[h, w]` input
    /// plane `src`. Entries on padding are left as they are: zero in a buffer that only ever holds
    /// windows of this geometry.
    pub(crate) fn gather_plane<T: Copy>(&self, dst: &mut [T], src: &[T]) {
        self.for_each_run(|window, input, count| {
            gather(&mut dst[window..window + count], &src[input..], self.cols.stride)
        })
    }

    /// One sample's windows, `[c_in * kh * kw, oh * ow]`, from its `[c_in, h, w]` input, on the
    /// calling thread (see [`Geometry::gather_plane`] for padding).
    pub(crate) fn gather_sample<T: Copy>(&self, windows: &mut [T], input: &[T]) {
        let plane_windows = self.rows.k * self.cols.k * self.rows.out * self.cols.out;
        for (dst, src) in windows
            .chunks_mut(plane_windows)
            .zip(input.chunks(self.rows.n * self.cols.n))
        {
            self.gather_plane(dst, src)
        }
    }

    /// Adds one (sample, channel) plane's window contributions `[kh * kw, oh * ow]` into the input
    /// positions of its `[h, w]` plane `dst` they belong to (those on padding are dropped): the
    /// adjoint of [`Geometry::gather_plane`].
    pub(crate) fn scatter_add_plane<T: Copy + std::ops::AddAssign>(&self, dst: &mut [T], src: &[T]) {
        let stride = self.cols.stride;
        self.for_each_run(|window, input, count| {
            let src = &src[window..window + count];
            if stride == 1 {
                for (d, &s) in dst[input..input + count].iter_mut().zip(src) {
                    *d += s;
                }
            } else {
                for (d, &s) in dst[input..].iter_mut().step_by(stride).zip(src) {
                    *d += s;
                }
            }
        })
    }

    /// A stride-1 convolution's adjoint as a forward convolution: its output gradient `[c_out, oh,
    /// ow]` convolved with [`Geometry::adjoint_kernel`] (padding `k - 1 - p`) is the input gradient
    /// `[c_in, h, w]`, one sample at a time. `None` for other strides, or padding past `k - 1`.
    pub(crate) fn stride_one_adjoint(&self) -> Option<Geometry> {
        let axis = |a: AxisGeometry| {
            (a.stride == 1 && a.padding < a.k).then(|| AxisGeometry {
                n: a.out,
                k: a.k,
                out: a.n,
                stride: 1,
                padding: a.k - 1 - a.padding,
            })
        };
        Some(Geometry {
            b: 1,
            c_in: self.c_out,
            c_out: self.c_in,
            rows: axis(self.rows)?,
            cols: axis(self.cols)?,
        })
    }

    /// The kernel of [`Geometry::stride_one_adjoint`], `[c_in, c_out, kh, kw]`: `weight`
    /// (`[c_out, c_in, kh, kw]`) with its channel axes swapped and both spatial axes flipped.
    pub(crate) fn adjoint_kernel<T: Copy + Default>(&self, weight: &[T]) -> Vec<T> {
        let (kh, kw) = (self.rows.k, self.cols.k);
        let mut out = vec![T::default(); weight.len()];
        for co in 0..self.c_out {
            for ci in 0..self.c_in {
                let src = &weight[(co * self.c_in + ci) * kh * kw..][..kh * kw];
                let dst = &mut out[(ci * self.c_out + co) * kh * kw..][..kh * kw];
                for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = v;
                }
            }
        }
        out
    }

    /// [`Geometry::scatter_add_plane`] for every channel of one sample, on the calling thread.
    pub(crate) fn scatter_add_sample<T: Copy + std::ops::AddAssign>(&self, input: &mut [T], windows: &[T]) {
        let plane_windows = self.rows.k * self.cols.k * self.rows.out * self.cols.out;
        for (dst, src) in input
            .chunks_mut(self.rows.n * self.cols.n)
            .zip(windows.chunks(plane_windows))
        {
            self.scatter_add_plane(dst, src)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Going through the batch in chunks (here of one or two samples) gives the same result as one
    /// chunk, for both kernel gradients; the forward equals candle's convolution and the input
    /// gradient the adjoint computed by convolution.
    #[test]
    fn chunked_batches_match_one_chunk() -> Result<()> {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)] {
            let x = Tensor::randn(0f64, 1., (5, 3, 9, 8), &dev)?;
            let w = Tensor::randn(0f64, 1., (4, 3, k, k), &dev)?;
            let g = Geometry::of_forward(&x, &w, stride, padding)?;
            let window = g.taps() * g.rows.out * g.cols.out;
            // The per-sample forward against candle's own convolution.
            let whole = conv2d_untracked(&x, &w, stride, padding)?;
            let e = (&whole - x.conv2d(&w, padding, stride, 1, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(e <= 1e-12, "forward k{k} s{stride} p{padding}: {e}");
            let grad = Tensor::randn(0f64, 1., whole.dims(), &dev)?;
            // The per-sample col2im input gradient against the adjoint-by-convolution one.
            let gx = conv2d_input_grad_col2im(&grad, &w, (9, 8), stride, padding)?;
            let gx_conv = conv2d_input_grad_conv(&grad, &w, (9, 8), stride, padding)?;
            let e = (gx - gx_conv)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(e <= 1e-12, "input gradient k{k} s{stride} p{padding}: {e}");
            let kernel = (k, k);
            let gw_whole = im2col_weight_grad(&x, &grad, kernel, stride, padding, usize::MAX)?;
            let gw_taps_whole = taps_weight_grad(&x, &grad, kernel, stride, padding, usize::MAX)?;
            let diff = |a: Tensor, b: &Tensor| -> Result<f64> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
            };
            for budget in [1, 2 * window] {
                let gw = im2col_weight_grad(&x, &grad, kernel, stride, padding, budget)?;
                let gw_taps = taps_weight_grad(&x, &grad, kernel, stride, padding, budget)?;
                let errs = [
                    diff(gw, &gw_whole)?,
                    diff(gw_taps, &gw_taps_whole)?,
                ];
                assert!(
                    errs.iter().all(|&e| e <= 1e-12),
                    "k{k} s{stride} p{padding} budget {budget}: {errs:?}"
                );
            }
        }
        Ok(())
    }
}
