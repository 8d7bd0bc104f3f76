//! Convolutions on CUDA in f32 as this crate's im2col and col2im kernels (`src/cuda/im2col.cu`)
//! around cuBLAS gemms: the forward, the input gradient and the kernel gradient of
//! [`crate::conv`]'s convolutions.
//!
//! candle 0.11's CUDA convolution is im2col, one gemm and a transposing copy of the output into
//! NCHW, and its im2col finds every element's source with a 64-bit division and modulo per
//! dimension. In a kernel profile of robust-guided sampling on an H100 (ncu, 2026-11-23;
//! docs/benchmarks.md) that im2col took a third of the GPU time, several times what writing its
//! columns costs in memory traffic, and in a diffusion training step im2col and copies took 37%.
//! Here the columns are laid out so that no output needs transposing:
//! * forward: per sample `[c_in * kh * kw, oh * ow]` columns, and the weight `[c_out, c_in * kh *
//!   kw]` times them (one batched gemm, the weight shared) is the sample's output in NCHW;
//! * input gradient: the weight's transpose times the output gradient gives each sample's column
//!   gradients, which col2im gathers back onto the input positions (the way PyTorch does, any
//!   stride, the same multiply-adds as the forward);
//! * kernel gradient: the whole batch's columns side by side, `[c_in * kh * kw, n * oh * ow]`, meet
//!   the output gradient `[c_out, n * oh * ow]` in one gemm whose contraction is long even where
//!   the maps are small.
//!
//! The batch goes through in chunks whose columns stay under [`COLUMNS_BUDGET`] elements. On the
//! CPU the two ops are the kernels' index arithmetic in plain loops: not a fast path (the CPU has
//! its own in [`crate::conv`]), but what lets the tests check the layouts and the gemms around the
//! kernels on a machine without a GPU; `examples/cuda_kernels_check` checks the kernels themselves.

use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::conv::Geometry;
use crate::ops::cpu_f32;

/// Largest column buffer of one chunk, in elements (1 GiB in f32): bounds the extra memory and
/// keeps the kernels' 32-bit indices in range.
const COLUMNS_BUDGET: usize = 1 << 28;

/// Whether the convolutions of `t` (an input or an output gradient) run here: f32 on CUDA with the
/// crate's kernels on (`BIGROC_CUDA_KERNELS`), and an input small enough for 32-bit indices.
pub(crate) fn runs_on(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && t.dtype() == DType::F32
        && t.elem_count() <= i32::MAX as usize
        && crate::own_cuda_kernel("conv")
}

/// How the rows of a column buffer are ordered: one row per (sample, window entry), each holding
/// that entry at every output position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// `[n, c_in * kh * kw, oh * ow]`: each sample's columns together.
    SampleMajor,
    /// `[c_in * kh * kw, n * oh * ow]`: each window entry's row across the whole batch.
    EntryMajor,
}

/// `conv2d(x, weight)` for the convolution `g` (`x` `[b, c_in, h, w]`, `weight` `[c_out, c_in, kh,
/// kw]`): `[b, c_out, oh, ow]`.
pub(crate) fn forward(x: &Tensor, weight: &Tensor, g: &Geometry) -> Result<Tensor> {
    forward_in_chunks(x, weight, g, COLUMNS_BUDGET)
}

fn forward_in_chunks(x: &Tensor, weight: &Tensor, g: &Geometry, budget: usize) -> Result<Tensor> {
    let (entries, positions) = (g.taps(), g.rows.out * g.cols.out);
    let x = x.contiguous()?;
    let weight = weight.contiguous()?.reshape((1, g.c_out, entries))?;
    let outputs = chunks(g, budget)
        .map(|(start, n)| {
            let part = x.narrow(0, start, n)?;
            let columns = if g.is_pointwise() {
                part.reshape((n, g.c_in, positions))?
            } else {
                part.apply_op1_no_bwd(&Im2Col { g: Geometry { b: n, ..*g }, rows: Rows::SampleMajor })?
            };
            weight.broadcast_as((n, g.c_out, entries))?.matmul(&columns)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outputs, 0)?.reshape((g.b, g.c_out, g.rows.out, g.cols.out))
}

/// The input gradient of the convolution `g` given its output gradient `grad` (`[b, c_out, oh,
/// ow]`): `[b, c_in, h, w]`.
pub(crate) fn input_grad(grad: &Tensor, weight: &Tensor, g: &Geometry) -> Result<Tensor> {
    input_grad_in_chunks(grad, weight, g, COLUMNS_BUDGET)
}

fn input_grad_in_chunks(grad: &Tensor, weight: &Tensor, g: &Geometry, budget: usize) -> Result<Tensor> {
    let (entries, positions) = (g.taps(), g.rows.out * g.cols.out);
    let grad = grad.contiguous()?;
    // [1, entries, c_out] as a transposed view: cuBLAS reads it transposed, no copy.
    let weight_t = weight.contiguous()?.reshape((1, g.c_out, entries))?.transpose(1, 2)?;
    let inputs = chunks(g, budget)
        .map(|(start, n)| {
            let part = grad.narrow(0, start, n)?.reshape((n, g.c_out, positions))?;
            let columns = weight_t.broadcast_as((n, entries, g.c_out))?.matmul(&part)?;
            if g.is_pointwise() {
                Ok(columns)
            } else {
                columns.apply_op1_no_bwd(&Col2Im { g: Geometry { b: n, ..*g } })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&inputs, 0)?.reshape((g.b, g.c_in, g.rows.n, g.cols.n))
}

/// The kernel gradient of the convolution `g` of `x` given its output gradient `grad`: `[c_out,
/// c_in, kh, kw]`, summed over the batch.
pub(crate) fn weight_grad(x: &Tensor, grad: &Tensor, g: &Geometry) -> Result<Tensor> {
    weight_grad_in_chunks(x, grad, g, COLUMNS_BUDGET)
}

fn weight_grad_in_chunks(x: &Tensor, grad: &Tensor, g: &Geometry, budget: usize) -> Result<Tensor> {
    let positions = g.rows.out * g.cols.out;
    let (x, grad) = (x.contiguous()?, grad.contiguous()?);
    let mut total: Option<Tensor> = None;
    for (start, n) in chunks(g, budget) {
        let columns = x.narrow(0, start, n)?.apply_op1_no_bwd(&Im2Col { g: Geometry { b: n, ..*g }, rows: Rows::EntryMajor })?;
        let part = grad.narrow(0, start, n)?.transpose(0, 1)?.contiguous()?.reshape((g.c_out, n * positions))?;
        let part = part.matmul(&columns.t()?)?;
        total = Some(match total {
            None => part,
            Some(t) => (t + part)?,
        });
    }
    match total {
        Some(t) => t.reshape((g.c_out, g.c_in, g.rows.k, g.cols.k)),
        None => bail!("conv2d_weight_grad: empty batch"),
    }
}

/// `(first sample, samples)` of each chunk of the batch whose columns fit `budget` elements (at
/// least one sample).
fn chunks(g: &Geometry, budget: usize) -> impl Iterator<Item = (usize, usize)> {
    let per_sample = (g.taps() * g.rows.out * g.cols.out).max(1);
    let chunk = (budget / per_sample).clamp(1, g.b.max(1));
    let b = g.b;
    (0..b).step_by(chunk).map(move |start| (start, chunk.min(b - start)))
}

/// The columns of a contiguous `[b, c_in, h, w]` input, rows ordered as `rows` says.
struct Im2Col {
    g: Geometry,
    rows: Rows,
}

impl Im2Col {
    fn shape(&self) -> Shape {
        let (entries, positions) = (self.g.taps(), self.g.rows.out * self.g.cols.out);
        match self.rows {
            Rows::SampleMajor => Shape::from((self.g.b, entries, positions)),
            Rows::EntryMajor => Shape::from((entries, self.g.b * positions)),
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    /// The kernel's arithmetic, element by element.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "im2col", "the input")?;
        let g = &self.g;
        let (rows, cols) = (g.rows, g.cols);
        let (taps, entries, positions) = (rows.k * cols.k, g.taps(), rows.out * cols.out);
        let mut out = vec![0f32; g.b * entries * positions];
        for (row, out) in out.chunks_mut(positions.max(1)).enumerate() {
            let (sample, k) = match self.rows {
                Rows::SampleMajor => (row / entries, row % entries),
                Rows::EntryMajor => (row % g.b, row / g.b),
            };
            let (channel, tap) = (k / taps, k % taps);
            let (ky, kx) = (tap / cols.k, tap % cols.k);
            let plane = &x[(sample * g.c_in + channel) * rows.n * cols.n..];
            for (p, v) in out.iter_mut().enumerate() {
                let y = ((p / cols.out) * rows.stride + ky) as isize - rows.padding as isize;
                let xx = ((p % cols.out) * cols.stride + kx) as isize - cols.padding as isize;
                if y >= 0 && (y as usize) < rows.n && xx >= 0 && (xx as usize) < cols.n {
                    *v = plane[y as usize * cols.n + xx as usize];
                }
            }
        }
        Ok((CpuStorage::F32(out), self.shape()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda(s, l)
    }
}

/// The input gradient from sample-major column gradients `[b, c_in * kh * kw, oh * ow]`.
struct Col2Im {
    g: Geometry,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    /// The kernel's arithmetic: each input position gathers its windows' entries, taps in order.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let columns = cpu_f32(s, l, "col2im", "the columns")?;
        let g = &self.g;
        let (rows, cols) = (g.rows, g.cols);
        let (taps, positions, area) = (rows.k * cols.k, rows.out * cols.out, rows.n * cols.n);
        let mut out = vec![0f32; g.b * g.c_in * area];
        for (plane, out) in out.chunks_mut(area.max(1)).enumerate() {
            let columns = &columns[plane * taps * positions..];
            for (i, v) in out.iter_mut().enumerate() {
                let (y, xx) = (i / cols.n, i % cols.n);
                let mut sum = 0f32;
                for ky in 0..rows.k {
                    let Some(oy) = window_of(y, ky, rows.padding, rows.stride, rows.out) else { continue };
                    for kx in 0..cols.k {
                        let Some(ox) = window_of(xx, kx, cols.padding, cols.stride, cols.out) else { continue };
                        sum += columns[(ky * cols.k + kx) * positions + oy * cols.out + ox];
                    }
                }
                *v = sum;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c_in * area))))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda(s, l)
    }
}

/// The output position whose window puts tap `k` on input position `i`, if any: `(i + pad - k) /
/// stride` when exact and below `out`.
fn window_of(i: usize, k: usize, padding: usize, stride: usize, out: usize) -> Option<usize> {
    let t = (i + padding).checked_sub(k)?;
    (t % stride == 0 && t / stride < out).then_some(t / stride)
}

#[cfg(not(feature = "cuda"))]
impl Im2Col {
    fn cuda(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        bail!("im2col: built without the cuda feature")
    }
}

#[cfg(not(feature = "cuda"))]
impl Col2Im {
    fn cuda(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        bail!("col2im: built without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launches of `src/cuda/im2col.cu` (compiled to PTX by build.rs).

    use super::*;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/im2col.ptx"));
    const MODULE: &str = "bigroc_im2col";
    /// Grid rows at most (CUDA's limit for the y dimension); the kernels loop over the rest.
    const MAX_GRID_Y: usize = 65_535;

    /// Threads along a row of `len` elements (a multiple of 32, at most 256) and blocks per row.
    fn launch(len: usize, rows: usize) -> LaunchConfig {
        let threads = len.next_multiple_of(32).clamp(32, 256);
        let blocks_x = len.div_ceil(threads).max(1);
        LaunchConfig {
            grid_dim: (blocks_x as u32, rows.clamp(1, MAX_GRID_Y) as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The u32 shape arguments both kernels take after their counts.
    fn dims(g: &Geometry) -> [u32; 6] {
        let (r, c) = (g.rows, g.cols);
        [r.n, c.n, r.k, c.k, r.stride, r.padding].map(|v| v as u32)
    }

    impl Im2Col {
        pub(super) fn cuda(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let g = &self.g;
            if l.dims() != [g.b, g.c_in, g.rows.n, g.cols.n] {
                bail!("im2col: needs a [{}, {}, {}, {}] input, got {:?}", g.b, g.c_in, g.rows.n, g.cols.n, l.dims())
            }
            if g.rows.stride != g.cols.stride || g.rows.padding != g.cols.padding {
                bail!("im2col: the kernel takes one stride and one padding for both axes")
            }
            let dev = s.device().clone();
            let x = crate::cuda_launch::f32_view(s, l, "im2col", "the input")?;
            let shape = self.shape();
            let (rows, positions) = (g.b * g.taps(), g.rows.out * g.cols.out);
            // SAFETY: the kernel writes every element (zeros where a window lies on padding).
            let columns = unsafe { dev.alloc::<f32>(shape.elem_count())? };
            let func = dev.get_or_load_custom_func("im2col_f32", MODULE, PTX)?;
            let [h, w, kh, kw, stride, pad] = dims(g);
            let (rows_, samples, channels, oh, ow) = (rows as u32, g.b as u32, g.c_in as u32, g.rows.out as u32, g.cols.out as u32);
            let sample_major = (self.rows == Rows::SampleMajor) as i32;
            let mut builder = func.builder();
            builder.arg(&x).arg(&columns).arg(&rows_).arg(&samples).arg(&channels).arg(&h).arg(&w);
            builder.arg(&kh).arg(&kw).arg(&stride).arg(&pad).arg(&oh).arg(&ow).arg(&sample_major);
            // SAFETY: the arguments match the kernel's signature; x holds b * c_in * h * w floats,
            // the columns rows * positions.
            unsafe { builder.launch(launch(positions, rows)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(columns, dev), shape))
        }
    }

    impl Col2Im {
        pub(super) fn cuda(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let g = &self.g;
            let (entries, positions, area) = (g.taps(), g.rows.out * g.cols.out, g.rows.n * g.cols.n);
            if l.dims() != [g.b, entries, positions] {
                bail!("col2im: needs [{}, {entries}, {positions}] columns, got {:?}", g.b, l.dims())
            }
            if g.rows.stride != g.cols.stride || g.rows.padding != g.cols.padding {
                bail!("col2im: the kernel takes one stride and one padding for both axes")
            }
            let dev = s.device().clone();
            let columns = crate::cuda_launch::f32_view(s, l, "col2im", "the columns")?;
            let planes = g.b * g.c_in;
            // SAFETY: the kernel writes every element.
            let dx = unsafe { dev.alloc::<f32>(planes * area)? };
            let func = dev.get_or_load_custom_func("col2im_f32", MODULE, PTX)?;
            let [h, w, kh, kw, stride, pad] = dims(g);
            let (planes_, oh, ow) = (planes as u32, g.rows.out as u32, g.cols.out as u32);
            let mut builder = func.builder();
            builder.arg(&columns).arg(&dx).arg(&planes_).arg(&h).arg(&w).arg(&kh).arg(&kw);
            builder.arg(&stride).arg(&pad).arg(&oh).arg(&ow);
            // SAFETY: the arguments match the kernel's signature; the columns hold planes * kh * kw
            // * positions floats, dx planes * h * w.
            unsafe { builder.launch(launch(area, planes)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dx, dev), Shape::from((g.b, g.c_in * area))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        diff / want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30) as f64
    }

    /// The layouts and gemms around the kernels (their CPU twins here) against the CPU convolution: forward, input gradient and kernel gradient, for the strides, paddings and kernel
    /// sizes the networks use, with batches split into chunks.
    #[test]
    fn matches_cpu_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c_in, c_out, h, w, (kh, kw), stride, padding) in [
            (3, 5, 7, 9, 8, (3, 3), 1, 1),
            (2, 4, 6, 9, 9, (3, 3), 2, 1),
            (2, 3, 8, 11, 10, (7, 7), 2, 3),
            (3, 6, 5, 6, 7, (1, 1), 1, 0),
            (2, 6, 5, 7, 7, (1, 1), 2, 0),
            (2, 3, 4, 8, 8, (4, 4), 2, 1),
            (1, 2, 3, 5, 5, (3, 3), 1, 0),
            (2, 4, 3, 7, 9, (1, 7), 1, 0),
            (2, 4, 3, 9, 7, (7, 1), 1, 0),
        ] {
            // The reference: this crate's CPU convolution in f64 (tested against PyTorch), whose
            // backward, unlike candle's, handles input positions no window reaches.
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, c_in, h, w), &dev)?)?;
            let weight = Var::from_tensor(&Tensor::randn(0f64, 1.0, (c_out, c_in, kh, kw), &dev)?)?;
            let y = crate::conv::conv2d_trainable(&x, &weight, stride, padding)?;
            let dy = Tensor::randn(0f64, 1.0, y.shape(), &dev)?;
            let grads = (&y * &dy)?.sum_all()?.backward()?;
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let (dx, dw) = (f32(grads.get(&x).unwrap())?, f32(grads.get(&weight).unwrap())?);
            let (x, weight, y, dy) = (f32(&x)?, f32(&weight)?, f32(&y)?, f32(&dy)?);
            let g = Geometry::of_forward(&x, &weight, stride, padding)?;
            let case = format!("b {b} c {c_in}->{c_out} {h}x{w} k {kh}x{kw} s {stride} p {padding}");
            // One chunk, and chunks of one sample (a budget of one sample's columns).
            for budget in [usize::MAX, g.taps() * g.rows.out * g.cols.out] {
                let err = rel_err(&forward_in_chunks(&x, &weight, &g, budget)?, &y);
                assert!(err < 1e-5, "{case} budget {budget}: forward rel err {err:.2e}");
                let err = rel_err(&input_grad_in_chunks(&dy, &weight, &g, budget)?, &dx);
                assert!(err < 1e-5, "{case} budget {budget}: input gradient rel err {err:.2e}");
                let err = rel_err(&weight_grad_in_chunks(&x, &dy, &g, budget)?, &dw);
                assert!(err < 1e-5, "{case} budget {budget}: kernel gradient rel err {err:.2e}");
            }
        }
        Ok(())
    }

    /// Both row orders hold the same windows: entry-major is sample-major with the first two axes
    /// swapped.
    #[test]
    fn row_orders_agree() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (3, 2, 6, 5), &Device::Cpu)?;
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu)?;
        let g = Geometry::of_forward(&x, &w, 2, 1)?;
        let per_sample = x.apply_op1_no_bwd(&Im2Col { g, rows: Rows::SampleMajor })?;
        let batch = x.apply_op1_no_bwd(&Im2Col { g, rows: Rows::EntryMajor })?;
        let positions = g.rows.out * g.cols.out;
        let swapped = per_sample.transpose(0, 1)?.contiguous()?.reshape((g.taps(), 3 * positions))?;
        assert_eq!(rel_err(&batch, &swapped), 0.0);
        Ok(())
    }
}
