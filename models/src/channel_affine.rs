//! `relu?(x * scale + shift + residual?)` with `scale` and `shift` given per channel (`[c]`: a bias,
//! a folded batch norm) or per sample and channel (`[n, c]`: a timestep embedding) of an `[n, c, ...]`
//! activation: what follows most convolutions of the ResNets and the ADM UNet.
//!
//! From candle ops this is up to four passes over the activation forward (multiply, add, add, ReLU)
//! and as many backward, and on CUDA the broadcast ones are candle's slowest kernels: each element's
//! operand index is found by a division and a modulo per dimension, in 64 bits. In a kernel profile of
//! robust-guided sampling on an H100 (ncu, 2026-11-23; docs/benchmarks.md) broadcast adds and
//! multiplies took 54% of the GPU time, the matrix products under a tenth. On CUDA in f32 this module
//! is one kernel forward and one backward (`src/cuda/channel_affine.cu`); the sums over positions
//! that give `shift` its gradient are candle's contiguous row sums. On the CPU in f32 the same op
//! runs as loops over whole rows on candle's threads: candle's CPU broadcast add and its gradient
//! (a sum over three of four dimensions) are slow too, and trained layers use this (frozen ones
//! apply their epilogue inside the convolution, see [`crate::conv_bn`]). Other dtypes compose
//! candle ops.
//!
//! Gradients reach `x`, `shift` and `residual`; `scale` is a constant (a folded batch norm of a
//! frozen network, or none).

use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::ops::cpu_f32;
use crate::parallel::for_each_chunk;

/// `relu?(x * scale + shift + residual)` for `x` `[n, c, ...]`; `scale` (when given) and `shift`
/// have `c` or `n * c` elements (any shape: `[c]`, `[1, c, 1, 1]`, `[n, c]`, ...), `residual` the
/// shape of `x`. Differentiable with respect to `x`, `shift` and `residual`; `scale` is used as a
/// constant.
pub fn channel_affine(x: &Tensor, scale: Option<&Tensor>, shift: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let op = ChannelAffine::new(x, scale, shift, residual, relu)?;
    if !runs_fused(x) {
        return op.composed(x, shift, residual);
    }
    op.apply(x, shift, residual)
}

/// Whether [`channel_affine`] on `x` runs as this module's op rather than candle ops: f32 on the CPU
/// or on CUDA (unless `BIGROC_CUDA_KERNELS=off`), with element indices that fit the kernels' 32-bit
/// arithmetic.
fn runs_fused(x: &Tensor) -> bool {
    let device = x.device();
    let on_device = device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda() && crate::own_cuda_kernel("channel-affine"));
    on_device && x.dtype() == DType::F32 && x.elem_count() <= i32::MAX as usize
}

/// The op: its constant `scale`, whether a ReLU ends it, and the layout of `x` it was checked for.
#[derive(Clone)]
struct ChannelAffine {
    scale: Option<Tensor>,
    relu: bool,
    /// Elements per row (the product of the dimensions after the channel one).
    spatial: usize,
    /// Rows: samples times channels.
    rows: usize,
}

impl ChannelAffine {
    fn new(x: &Tensor, scale: Option<&Tensor>, shift: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Self> {
        let dims = x.dims();
        if dims.len() < 2 {
            bail!("channel_affine: input has shape {dims:?}, expected [n, c, ...]")
        }
        let (n, c) = (dims[0], dims[1]);
        let rows = n * c;
        for (name, t) in [("scale", scale), ("shift", Some(shift))] {
            if let Some(t) = t {
                let len = t.elem_count();
                if len != c && len != rows {
                    bail!("channel_affine: {name} has shape {:?}, expected {c} (per channel) or {rows} (per sample and channel) elements", t.dims())
                }
            }
        }
        if let Some(r) = residual {
            if r.dims() != dims {
                bail!("channel_affine: residual has shape {:?}, expected {dims:?}", r.dims())
            }
        }
        let spatial = x.elem_count().checked_div(rows).unwrap_or(0);
        let scale = scale.map(|s| s.detach().flatten_all()?.to_dtype(x.dtype())).transpose()?;
        Ok(Self { scale, relu, spatial, rows })
    }

    /// The same arithmetic from candle ops: the fallback for other dtypes, and the reference in tests.
    fn composed(&self, x: &Tensor, shift: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let mut y = match &self.scale {
            Some(scale) => x.broadcast_mul(&self.per_row(scale, x)?)?,
            None => x.clone(),
        };
        y = y.broadcast_add(&self.per_row(&shift.flatten_all()?, x)?)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if self.relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// A flat per-channel or per-row vector shaped to broadcast against `x`: `[1, c, 1, ...]` or
    /// `[n, c, 1, ...]`.
    fn per_row(&self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let mut shape = vec![1; x.rank()];
        shape[1] = x.dim(1)?;
        if v.elem_count() == self.rows && self.rows != shape[1] {
            shape[0] = x.dim(0)?;
        }
        v.reshape(shape)
    }

    fn apply(self, x: &Tensor, shift: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let (x, shift) = (x.contiguous()?, shift.contiguous()?);
        match residual {
            None => x.apply_op2(&shift, self),
            Some(r) => x.apply_op3(&shift, &r.contiguous()?, self),
        }
    }

    /// Gradients given `grad` of the output `y`: `(dx, dshift, dresidual)`, the last two only for
    /// operands that track gradients.
    fn backward(&self, x: &Tensor, shift: &Tensor, residual: Option<&Tensor>, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let count = x.elem_count();
        let (masked, dx) = if !self.relu && self.scale.is_none() {
            (grad.clone(), grad.clone())
        } else {
            let packed = grad.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &ChannelAffineGrad(self.clone()))?;
            let masked = packed.narrow(0, 0, count)?.reshape(x.shape())?;
            let dx = match self.scale {
                Some(_) => packed.narrow(0, count, count)?.reshape(x.shape())?,
                None => masked.clone(),
            };
            (masked, dx)
        };
        let dshift = if shift.track_op() {
            // Row sums over positions, then over samples for a per-channel shift.
            let per_row = masked.contiguous()?.reshape((self.rows, self.spatial))?.sum(1)?;
            let c = x.dim(1)?;
            let summed = if shift.elem_count() == self.rows { per_row } else { per_row.reshape((self.rows / c.max(1), c))?.sum(0)? };
            Some(summed.reshape(shift.shape())?)
        } else {
            None
        };
        let dresidual = residual.filter(|r| r.track_op()).map(|_| masked.clone());
        Ok((Some(dx), dshift, dresidual))
    }
}

/// Rows per task of the CPU loops: about 64k elements, so that small tensors stay on one thread.
fn rows_per_task(spatial: usize) -> usize {
    (65_536 / spatial.max(1)).max(1)
}

impl ChannelAffine {
    /// The scale as f32 values, read before the parallel loops (which must not call candle ops).
    fn scale_values(&self) -> Result<Option<Vec<f32>>> {
        self.scale.as_ref().map(|s| s.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()
    }

    /// The forward on the CPU, whole rows spread over candle's threads: the kernel's arithmetic.
    fn cpu(&self, x: &[f32], shift: &[f32], residual: Option<&[f32]>) -> Result<Vec<f32>> {
        let scale = self.scale_values()?;
        let spatial = self.spatial.max(1);
        let rows = rows_per_task(spatial);
        let mut y: Vec<f32> = Vec::with_capacity(x.len());
        // Whole rows per task, so that each row's scale and shift are looked up once.
        for_each_chunk(&mut y.spare_capacity_mut()[..x.len()], rows * spatial, || (), |_, t, out| {
            for (k, out) in out.chunks_mut(spatial).enumerate() {
                let row = t * rows + k;
                let a = scale.as_ref().map_or(1.0, |s| s[row % s.len()]);
                let b = shift[row % shift.len()];
                let x = &x[row * spatial..][..spatial];
                let r = residual.map(|r| &r[row * spatial..][..spatial]);
                for (j, out) in out.iter_mut().enumerate() {
                    // x * 1 is x exactly: one formula with or without a scale.
                    let mut v = x[j] * a + b;
                    if let Some(r) = r {
                        v += r[j];
                    }
                    out.write(if self.relu && v < 0.0 { 0.0 } else { v });
                }
            }
        });
        // SAFETY: every task wrote its whole chunk.
        unsafe { y.set_len(x.len()) };
        Ok(y)
    }
}

impl CustomOp2 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, shift: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        let y = self.cpu(cpu_f32(x, xl, name, "x")?, cpu_f32(shift, sl, name, "shift")?, None)?;
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, shift: &CudaStorage, sl: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda_forward(x, xl, shift, sl, None)
    }

    fn bwd(&self, x: &Tensor, shift: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dshift, _) = self.backward(x, shift, None, y, grad)?;
        Ok((dx, dshift))
    }
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine-residual"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, shift: &CpuStorage, sl: &Layout, r: &CpuStorage, rl: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp3::name(self);
        let y = self.cpu(cpu_f32(x, xl, name, "x")?, cpu_f32(shift, sl, name, "shift")?, Some(cpu_f32(r, rl, name, "residual")?))?;
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, shift: &CudaStorage, sl: &Layout, r: &CudaStorage, rl: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda_forward(x, xl, shift, sl, Some((r, rl)))
    }

    fn bwd(&self, x: &Tensor, shift: &Tensor, r: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, shift, Some(r), y, grad)
    }
}

/// The backward kernel as an op of `(dy, y)`: `masked` (dy where the ReLU passed) and, with a
/// scale, `dx = masked * scale` after it, flattened.
struct ChannelAffineGrad(ChannelAffine);

impl CustomOp2 for ChannelAffineGrad {
    fn name(&self) -> &'static str {
        "channel-affine-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, y: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, y) = (cpu_f32(g, gl, self.name(), "dy")?, cpu_f32(y, yl, self.name(), "y")?);
        let scale = self.0.scale_values()?;
        let spatial = self.0.spatial.max(1);
        let task = rows_per_task(spatial) * spatial;
        let n = g.len();
        let total = if scale.is_some() { 2 * n } else { n };
        let mut out: Vec<f32> = Vec::with_capacity(total);
        let (masked, dx) = out.spare_capacity_mut()[..total].split_at_mut(n);
        for_each_chunk(masked, task, || (), |_, t, masked| {
            let (g, y) = (&g[t * task..][..masked.len()], &y[t * task..][..masked.len()]);
            for ((m, &g), &y) in masked.iter_mut().zip(g).zip(y) {
                m.write(if !self.0.relu || y > 0.0 { g } else { 0.0 });
            }
        });
        if let Some(s) = &scale {
            // SAFETY: the loop above wrote every element of `masked`, and `MaybeUninit<f32>` has f32's layout.
            let masked = unsafe { &*(masked as *const [std::mem::MaybeUninit<f32>] as *const [f32]) };
            let rows = task / spatial;
            for_each_chunk(dx, task, || (), |_, t, dx| {
                for (k, dx) in dx.chunks_mut(spatial).enumerate() {
                    let row = t * rows + k;
                    let a = s[row % s.len()];
                    for (d, &m) in dx.iter_mut().zip(&masked[row * spatial..][..spatial]) {
                        d.write(m * a);
                    }
                }
            });
        }
        // SAFETY: `masked` and, with a scale, `dx` were written in full.
        unsafe { out.set_len(total) };
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, y: &CudaStorage, yl: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0.cuda_backward(g, gl, y, yl)
    }
}

#[cfg(not(feature = "cuda"))]
impl ChannelAffine {
    fn cuda_forward(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout, _: Option<(&CudaStorage, &Layout)>) -> Result<(CudaStorage, Shape)> {
        bail!("channel-affine: built without the cuda feature")
    }

    fn cuda_backward(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        bail!("channel-affine-grad: built without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launches of `src/cuda/channel_affine.cu` (compiled to PTX by build.rs).

    use super::ChannelAffine;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CudaStorage, Layout, Result, Shape, Storage, StorageRef};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/channel_affine.ptx"));
    const MODULE: &str = "bigroc_channel_affine";
    /// The f32 elements of a contiguous operand.
    fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
        crate::cuda_launch::f32_view(s, l, "channel-affine", what)
    }

    /// The constant scale on the op's device, or `None`.
    fn scale_storage(op: &ChannelAffine) -> Option<(StorageRef<'_>, Layout)> {
        op.scale.as_ref().map(|s| {
            let (storage, layout) = s.storage_and_layout();
            (storage, layout.clone())
        })
    }

    /// The f32 view of the scale held by [`scale_storage`]'s guard.
    fn scale_view<'a>(scale: &'a Option<(StorageRef<'_>, Layout)>) -> Result<Option<CudaView<'a, f32>>> {
        match scale {
            None => Ok(None),
            Some((guard, layout)) => match &**guard {
                Storage::Cuda(s) => Ok(Some(f32_view(s, layout, "scale")?)),
                _ => bail!("channel-affine: the scale is not on the GPU"),
            },
        }
    }

    impl ChannelAffine {
        pub(super) fn cuda_forward(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            shift: &CudaStorage,
            sl: &Layout,
            residual: Option<(&CudaStorage, &Layout)>,
        ) -> Result<(CudaStorage, Shape)> {
            let numel = xl.shape().elem_count();
            let dev = x.device().clone();
            let xs = f32_view(x, xl, "x")?;
            let shift_v = f32_view(shift, sl, "shift")?;
            let scale = scale_storage(self);
            let scale_v = scale_view(&scale)?;
            let residual_v = residual.map(|(r, rl)| f32_view(r, rl, "residual")).transpose()?;
            // SAFETY: the kernel writes every element.
            let y = unsafe { dev.alloc::<f32>(numel)? };
            let func = dev.get_or_load_custom_func("channel_affine_fwd_f32", MODULE, PTX)?;
            // Absent operands are passed as x, never read.
            let scale_arg = scale_v.as_ref().unwrap_or(&xs);
            let residual_arg = residual_v.as_ref().unwrap_or(&xs);
            let (numel_, spatial, scale_len, shift_len) =
                (numel as u32, self.spatial as u32, scale_v.as_ref().map_or(1, |s| s.len()) as u32, shift_v.len() as u32);
            let (has_scale, has_residual, relu) = (scale_v.is_some() as i32, residual_v.is_some() as i32, self.relu as i32);
            let mut builder = func.builder();
            builder.arg(&xs).arg(scale_arg).arg(&shift_v).arg(residual_arg).arg(&y);
            builder.arg(&numel_).arg(&spatial).arg(&scale_len).arg(&shift_len).arg(&has_scale).arg(&has_residual).arg(&relu);
            // SAFETY: the arguments match the kernel's signature; every buffer read holds numel
            // elements, or scale_len and shift_len for the vectors.
            unsafe { builder.launch(crate::cuda_launch::grid_stride(numel)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
        }

        pub(super) fn cuda_backward(&self, g: &CudaStorage, gl: &Layout, y: &CudaStorage, yl: &Layout) -> Result<(CudaStorage, Shape)> {
            let numel = gl.shape().elem_count();
            if yl.shape().elem_count() != numel {
                bail!("channel-affine-grad: dy has {numel} elements, y {}", yl.shape().elem_count())
            }
            let dev = g.device().clone();
            let (gs, ys) = (f32_view(g, gl, "dy")?, f32_view(y, yl, "y")?);
            let scale = scale_storage(self);
            let scale_v = scale_view(&scale)?;
            let total = if scale_v.is_some() { 2 * numel } else { numel };
            // SAFETY: the kernel writes every element (the second half only with a scale).
            let out = unsafe { dev.alloc::<f32>(total)? };
            // Without a scale there is no dx: the kernel gets `masked` twice and writes it once.
            let masked = out.slice(0..numel);
            let dx = if scale_v.is_some() { out.slice(numel..total) } else { out.slice(0..numel) };
            let func = dev.get_or_load_custom_func("channel_affine_bwd_f32", MODULE, PTX)?;
            let scale_arg = scale_v.as_ref().unwrap_or(&gs);
            let (numel_, spatial, scale_len) = (numel as u32, self.spatial as u32, scale_v.as_ref().map_or(1, |s| s.len()) as u32);
            let (has_scale, relu) = (scale_v.is_some() as i32, self.relu as i32);
            let mut builder = func.builder();
            builder.arg(&gs).arg(&ys).arg(scale_arg).arg(&masked).arg(&dx);
            builder.arg(&numel_).arg(&spatial).arg(&scale_len).arg(&has_scale).arg(&relu);
            // SAFETY: the arguments match the kernel's signature; `masked` and `dx` hold numel floats
            // each (without a scale `dx` aliases `masked` and is never written).
            unsafe { builder.launch(crate::cuda_launch::grid_stride(numel)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(total)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-30)
    }

    /// The op (its CPU forward and backward, which do the CUDA kernels' arithmetic) against
    /// the composed candle ops in f64, for every combination of scale, shift layout, residual and ReLU.
    #[test]
    fn op_matches_composed_ops_with_gradients() {
        let dev = Device::Cpu;
        for dims in [vec![3usize, 5, 4, 6], vec![2, 7, 9], vec![4, 3]] {
            let (n, c) = (dims[0], dims[1]);
            for (scaled, per_sample, with_residual, relu) in (0..16).map(|k| (k & 1 != 0, k & 2 != 0, k & 4 != 0, k & 8 != 0)) {
                let x = Tensor::randn(0f64, 1.0, dims.as_slice(), &dev).unwrap();
                let vec_len = if per_sample { n * c } else { c };
                let scale = Tensor::randn(1f64, 0.5, vec_len, &dev).unwrap();
                let shift = Tensor::randn(0f64, 0.5, vec_len, &dev).unwrap();
                let residual = Tensor::randn(0f64, 1.0, dims.as_slice(), &dev).unwrap();
                let weight = Tensor::randn(0f64, 1.0, dims.as_slice(), &dev).unwrap();
                let run = |dtype: DType, fused: bool| -> Vec<Tensor> {
                    let vars: Vec<Var> = [&x, &shift, &residual].iter().map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()).collect();
                    let scale = scale.to_dtype(dtype).unwrap();
                    let scale = scaled.then_some(&scale);
                    let residual = with_residual.then(|| vars[2].as_tensor());
                    let op = ChannelAffine::new(vars[0].as_tensor(), scale, vars[1].as_tensor(), residual, relu).unwrap();
                    let y = if fused {
                        op.apply(vars[0].as_tensor(), vars[1].as_tensor(), residual).unwrap()
                    } else {
                        op.composed(vars[0].as_tensor(), vars[1].as_tensor(), residual).unwrap()
                    };
                    let grads = (&y * weight.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
                    let mut out = vec![y];
                    for v in &vars[..if with_residual { 3 } else { 2 }] {
                        out.push(grads.get(v.as_tensor()).expect("a gradient for every operand").clone());
                    }
                    out
                };
                let want = run(DType::F64, false);
                let got = run(DType::F32, true);
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.dims(), w.dims());
                    let err = rel_err(g, w);
                    assert!(err < 2e-6, "{dims:?} scale {scaled} per-sample {per_sample} residual {with_residual} relu {relu}: output {k} rel err {err:.2e}");
                }
            }
        }
    }

    #[test]
    fn frozen_operands_get_no_gradient_and_bad_shapes_are_named() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap()).unwrap();
        let shift = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
        let op = ChannelAffine::new(x.as_tensor(), None, &shift, None, true).unwrap();
        let y = op.apply(x.as_tensor(), &shift, None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&shift).is_none());

        let bad = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let err = channel_affine(x.as_tensor(), None, &bad, None, false).unwrap_err().to_string();
        assert!(err.contains("shift") && err.contains("[4]"), "{err}");
        let err = channel_affine(x.as_tensor(), Some(&bad), &shift, None, false).unwrap_err().to_string();
        assert!(err.contains("scale"), "{err}");
        let short = Tensor::zeros((2, 3, 4, 3), DType::F32, &dev).unwrap();
        let err = channel_affine(x.as_tensor(), None, &shift, Some(&short), false).unwrap_err().to_string();
        assert!(err.contains("residual"), "{err}");
    }
}
