//! A frozen network's convolution, batch norm, optional residual and ReLU as one op:
//! `relu?(conv2d(x, weight) * scale + shift + residual?)`, differentiable with respect to `x` and the
//! residual (the weights are constants: PGD and guidance differentiate with respect to the image).
//!
//! Every ResNet block in inference mode is a chain of these (`scale`/`shift` are batch norm's running
//! statistics folded per channel, as PyTorch's CPU kernel evaluates it). Done as separate candle ops,
//! the batch norm, the residual sum and the ReLU each read and write every activation in the forward
//! and again in the backward (with temporaries for the ReLU mask), and the convolution's output is
//! copied once more into the graph; on CPU that was as much time as the convolutions' gemms.
//!
//! On CPU in f32/f64 the forward runs inside the op, one sample at a time: im2col, a gemm written
//! straight into the output, then scale, shift, residual and ReLU applied while the sample is in
//! cache. The backward likewise: `g * [y > 0] * scale`, `W^T` times it, col2im (and `g * [y > 0]` for
//! the residual). The ReLU passes the gradient where its
//! output is positive, as PyTorch's does (candle's own ReLU also passes it at exactly zero). Other
//! devices and dtypes compose the same arithmetic from candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::ops::contiguous_slice;
use crate::conv::{conv2d_const_weight, uses_im2col, Col2Im, Geometry, Im2Col, WindowOrder};

/// `relu?(conv2d(x, weight) * scale + shift + residual?)` with `scale`, `shift` per output channel
/// (`[c_out]`), `residual` of the output's shape, and `weight` `[c_out, c_in, kh, kw]` used as a
/// constant (no bias, groups 1, dilation 1, the same `stride` and zero `padding` on both axes).
/// Gradients reach `x` and `residual`; `weight`, `scale` and `shift` are constants.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bn_eval(
    x: &Tensor,
    weight: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let geometry = Geometry::of_forward(x, weight, stride, padding)?;
    for (name, t) in [("scale", scale), ("shift", shift)] {
        if t.dims() != [geometry.c_out] {
            bail!(
                "conv2d_bn_eval: {name} has shape {:?}, expected [{}]",
                t.dims(),
                geometry.c_out
            )
        }
    }
    if !uses_im2col(x) {
        return composed(x, weight, scale, shift, residual, relu, stride, padding);
    }
    let op = ConvBnEval {
        geometry,
        weight: weight.detach().contiguous()?,
        affine: Some((scale.detach(), shift.detach())),
        relu,
    };
    let x = x.contiguous()?;
    match residual {
        None => x.apply_op1(op),
        Some(r) => {
            let out_shape = (
                geometry.b,
                geometry.c_out,
                geometry.rows.out,
                geometry.cols.out,
            );
            if r.dims() != [out_shape.0, out_shape.1, out_shape.2, out_shape.3] {
                bail!(
                    "conv2d_bn_eval: residual has shape {:?}, expected {out_shape:?}",
                    r.dims()
                )
            }
            x.apply_op2(&r.contiguous()?, op)
        }
    }
}

/// The same arithmetic from candle ops (CUDA, half precision): autograd gives the backward.
#[allow(clippy::too_many_arguments)]
fn composed(
    x: &Tensor,
    weight: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let c = scale.dim(0)?;
    let y = conv2d_const_weight(x, weight, stride, padding)?
        .broadcast_mul(&scale.detach().reshape((1, c, 1, 1))?)?
        .broadcast_add(&shift.detach().reshape((1, c, 1, 1))?)?;
    let y = match residual {
        Some(r) => (y + r)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// The op [`conv2d_bn_eval`] puts in the graph on CPU: input `x` (and the residual as a second
/// argument when there is one).
struct ConvBnEval {
    geometry: Geometry,
    weight: Tensor,
    /// `None` for a plain convolution (no epilogue at all).
    affine: Option<(Tensor, Tensor)>,
    relu: bool,
}

impl ConvBnEval {
    /// im2col, gemm and the epilogue one sample at a time: the sample's windows (at most a few MB)
    /// stay in cache between the gather and the gemm, and its output between the gemm and the
    /// epilogue.
    fn forward<T: Float>(&self, x: &[T], residual: Option<&[T]>) -> Result<Vec<T>> {
        let g = self.geometry;
        let positions = g.rows.out * g.cols.out;
        let weight = self.weight.flatten_all()?.to_vec1::<T>()?;
        let (scale, shift) = match &self.affine {
            Some((scale, shift)) => (scale.to_vec1::<T>()?, shift.to_vec1::<T>()?),
            None => (Vec::new(), Vec::new()),
        };
        let epilogue = self.affine.is_some() || residual.is_some() || self.relu;
        let (sample_in, sample_out) = (g.c_in * g.rows.n * g.cols.n, g.c_out * positions);
        let im2col = Im2Col {
            geometry: Geometry { b: 1, ..g },
            order: WindowOrder::SampleMajor,
        };
        let mut out: Vec<T> = Vec::with_capacity(g.b * sample_out);
        for s in 0..g.b {
            let x = &x[s * sample_in..(s + 1) * sample_in];
            let windows_buffer;
            let windows: &[T] = if g.is_pointwise() {
                x
            } else {
                windows_buffer = im2col.run(x);
                &windows_buffer
            };
            // SAFETY: the spare capacity holds at least `sample_out` more entries, all of which gemm
            // writes (read_dst false) before `set_len` exposes them.
            unsafe {
                let dst = out.spare_capacity_mut().as_mut_ptr() as *mut T;
                matmul(
                    dst,
                    &weight,
                    Operand::RowMajor,
                    windows,
                    (g.c_out, g.taps(), positions),
                );
                out.set_len(out.len() + sample_out);
            }
            if !epilogue {
                continue;
            }
            let y = &mut out[s * sample_out..];
            let r = residual.map(|r| &r[s * sample_out..(s + 1) * sample_out]);
            y[..sample_out]
                .par_chunks_mut(positions)
                .enumerate()
                .for_each(|(c, plane)| {
                    let (a, b) = match self.affine {
                        Some(_) => (scale[c], shift[c]),
                        None => (T::one(), T::zero()),
                    };
                    match r {
                        Some(r) => {
                            let r = &r[c * positions..(c + 1) * positions];
                            for (v, &r) in plane.iter_mut().zip(r) {
                                *v = *v * a + b + r;
                            }
                        }
                        None => plane.iter_mut().for_each(|v| *v = *v * a + b),
                    }
                    if self.relu {
                        plane.iter_mut().for_each(|v| *v = v.relu());
                    }
                });
        }
        Ok(out)
    }

    fn output_shape(&self) -> Shape {
        let g = self.geometry;
        Shape::from((g.b, g.c_out, g.rows.out, g.cols.out))
    }

    /// The input's gradient and, with a residual, the residual's (`g * [y > 0]`).
    fn backward(
        &self,
        y: &Tensor,
        grad: &Tensor,
        has_residual: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // With a residual its gradient is the masked gradient, which the convolution's path reuses.
        let (grad, relu) = if has_residual && self.relu {
            (grad.apply_op2_no_bwd(y, &ReluMask)?, false)
        } else {
            (grad, self.relu)
        };
        let grad_x = grad.apply_op2_no_bwd(
            y,
            &ConvBnEvalInputGrad {
                geometry: self.geometry,
                weight: self.weight.clone(),
                scale: self.affine.as_ref().map(|(scale, _)| scale.clone()),
                relu,
            },
        )?;
        Ok((grad_x, has_residual.then_some(grad)))
    }
}

/// The input gradient of `conv2d(x, weight)` for an `x` of `geometry`'s shape given the output's
/// gradient `grad`, one sample at a time: `W^T` times the sample's gradient (each output position's
/// window contributions, written by gemm straight into the input gradient for a pointwise
/// convolution), then col2im. CPU, f32/f64.
pub(crate) fn conv2d_input_grad_per_sample(grad: &Tensor, weight: &Tensor, geometry: Geometry) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    let op = ConvBnEvalInputGrad { geometry, weight: weight.detach().contiguous()?, scale: None, relu: false };
    // Without the ReLU the op's second operand (the output it masks by) is never read.
    grad.apply_op2_no_bwd(&grad, &op)
}

/// `conv2d(x, weight)` for `x` of `geometry`'s shape, one sample at a time (im2col, then gemm straight
/// into the output). No backward: the callers' ops provide it. CPU, f32/f64.
pub(crate) fn conv2d_per_sample(x: &Tensor, weight: &Tensor, geometry: Geometry) -> Result<Tensor> {
    let op = ConvBnEval { geometry, weight: weight.detach().contiguous()?, affine: None, relu: false };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// How gemm reads the left operand of [`matmul`].
#[derive(Clone, Copy)]
enum Operand {
    /// As stored, `[m, k]` row-major.
    RowMajor,
    /// Transposed: stored `[k, m]` row-major.
    Transposed,
}

/// `dst[m, n] = lhs[m, k] x rhs[k, n]`, everything row-major (`lhs` possibly stored transposed),
/// overwriting `dst` without reading it.
///
/// # Safety
/// `dst` must be valid for writes of `m * n` entries; `lhs` holds `m * k` and `rhs` at least `k * n`.
unsafe fn matmul<T: Float>(
    dst: *mut T,
    lhs: &[T],
    lhs_layout: Operand,
    rhs: &[T],
    (m, k, n): (usize, usize, usize),
) {
    debug_assert!(lhs.len() >= m * k && rhs.len() >= k * n && k > 0);
    let (lhs_cs, lhs_rs) = match lhs_layout {
        Operand::RowMajor => (1, k as isize),
        Operand::Transposed => (m as isize, 1),
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            1,
            n as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism(),
        )
    }
}

/// The input gradient of [`ConvBnEval`] given the output's gradient `g` and the output `y`: the
/// convolution's adjoint applied to `g * [y > 0] * scale` (without the mask when `relu` is false),
/// one sample at a time: scaled gradient, `W^T` times it (each output position's window
/// contributions), col2im into the sample's input gradient.
struct ConvBnEvalInputGrad {
    geometry: Geometry,
    weight: Tensor,
    /// `None`: a plain convolution's adjoint (unit scale).
    scale: Option<Tensor>,
    relu: bool,
}

impl ConvBnEvalInputGrad {
    fn run<T: Float>(&self, grad: &[T], y: &[T]) -> Result<Vec<T>> {
        let g = self.geometry;
        let positions = g.rows.out * g.cols.out;
        let (sample_in, sample_out) = (g.c_in * g.rows.n * g.cols.n, g.c_out * positions);
        let weight = self.weight.flatten_all()?.to_vec1::<T>()?;
        let scale = match &self.scale {
            Some(scale) => scale.to_vec1::<T>()?,
            None => vec![T::one(); g.c_out],
        };
        let col2im = Col2Im {
            geometry: Geometry { b: 1, ..g },
        };
        let mut scaled = vec![T::zero(); sample_out];
        let mut windows = if g.is_pointwise() {
            Vec::new()
        } else {
            vec![T::zero(); g.taps() * positions]
        };
        let mut out = vec![T::zero(); g.b * sample_in];
        for s in 0..g.b {
            let (grad, y) = (
                &grad[s * sample_out..][..sample_out],
                &y[s * sample_out..][..sample_out],
            );
            scaled
                .par_chunks_mut(positions)
                .zip(grad.par_chunks(positions).zip(y.par_chunks(positions)))
                .enumerate()
                .for_each(|(c, (dst, (grad, y)))| {
                    let a = scale[c];
                    for ((d, &g), &y) in dst.iter_mut().zip(grad).zip(y) {
                        *d = if !self.relu || y > T::zero() {
                            g * a
                        } else {
                            T::zero()
                        };
                    }
                });
            let out = &mut out[s * sample_in..][..sample_in];
            let shape = (g.taps(), g.c_out, positions);
            // SAFETY: the destinations hold `taps x positions` entries (the input plane itself when
            // the convolution is pointwise); the weight is `[c_out, taps]`, read transposed.
            unsafe {
                if g.is_pointwise() {
                    matmul(
                        out.as_mut_ptr(),
                        &weight,
                        Operand::Transposed,
                        &scaled,
                        shape,
                    );
                } else {
                    matmul(
                        windows.as_mut_ptr(),
                        &weight,
                        Operand::Transposed,
                        &scaled,
                        shape,
                    );
                }
            }
            if !g.is_pointwise() {
                col2im.add_into(&windows, out);
            }
        }
        Ok(out)
    }
}

impl CustomOp2 for ConvBnEvalInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-bn-eval-input-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (g, y) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => CpuStorage::F32(
                self.run(contiguous(g, lg, "gradient")?, contiguous(y, ly, "output")?)?,
            ),
            (CpuStorage::F64(g), CpuStorage::F64(y)) => CpuStorage::F64(
                self.run(contiguous(g, lg, "gradient")?, contiguous(y, ly, "output")?)?,
            ),
            _ => bail!(
                "conv2d_bn_eval: unsupported gradient dtypes {:?}, {:?}",
                g.dtype(),
                y.dtype()
            ),
        };
        let g = self.geometry;
        Ok((out, Shape::from((g.b, g.c_in, g.rows.n, g.cols.n))))
    }
}

/// gemm's threads: candle's count, looked up once (candle reads it from /proc and /sys per call).
fn parallelism() -> gemm::Parallelism {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match *THREADS.get_or_init(candle_core::utils::get_num_threads) {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// f32 and f64, the dtypes the CPU path handles.
trait Float: WithDType + Default {
    fn relu(self) -> Self {
        if self > Self::zero() {
            self
        } else {
            Self::zero()
        }
    }
}
impl Float for f32 {}
impl Float for f64 {}

fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    contiguous_slice(v, layout, "conv2d_bn_eval", what)
}

impl CustomOp1 for ConvBnEval {
    fn name(&self) -> &'static str {
        "conv2d-bn-eval"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward(contiguous(v, l, "x")?, None)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward(contiguous(v, l, "x")?, None)?),
            other => bail!("conv2d_bn_eval: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, self.output_shape()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(y, grad, false)?.0))
    }
}

impl CustomOp2 for ConvBnEval {
    fn name(&self) -> &'static str {
        "conv2d-bn-eval-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (x, r) {
            (CpuStorage::F32(x), CpuStorage::F32(r)) => CpuStorage::F32(self.forward(
                contiguous(x, lx, "x")?,
                Some(contiguous(r, lr, "residual")?),
            )?),
            (CpuStorage::F64(x), CpuStorage::F64(r)) => CpuStorage::F64(self.forward(
                contiguous(x, lx, "x")?,
                Some(contiguous(r, lr, "residual")?),
            )?),
            _ => bail!(
                "conv2d_bn_eval: input and residual must both be f32 or f64, got {:?} and {:?}",
                x.dtype(),
                r.dtype()
            ),
        };
        Ok((out, self.output_shape()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_r) = self.backward(y, grad, true)?;
        Ok((Some(grad_x), grad_r))
    }
}

/// `g * [y > 0]` for a gradient `g` and an output `y` of the same shape. CPU, f32/f64.
struct ReluMask;

impl ReluMask {
    fn run<T: Float>(g: &[T], y: &[T]) -> Vec<T> {
        g.par_iter()
            .zip(y.par_iter())
            .map(|(&g, &y)| if y > T::zero() { g } else { T::zero() })
            .collect()
    }
}

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu-mask"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lg.dims() != ly.dims() {
            bail!(
                "relu-mask: gradient {:?} and output {:?} differ in shape",
                lg.dims(),
                ly.dims()
            )
        }
        let out = match (g, y) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => CpuStorage::F32(Self::run(
                contiguous(g, lg, "gradient")?,
                contiguous(y, ly, "output")?,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(y)) => CpuStorage::F64(Self::run(
                contiguous(g, lg, "gradient")?,
                contiguous(y, ly, "output")?,
            )),
            _ => bail!(
                "relu-mask: unsupported dtypes {:?}, {:?}",
                g.dtype(),
                y.dtype()
            ),
        };
        Ok((out, lg.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused CPU op and the same arithmetic composed from candle ops agree (f64) on the output and
    /// on the gradients of the input and the residual, for the ResNets' convolution shapes.
    #[test]
    fn fused_matches_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)] {
            for (relu, with_residual) in [(true, false), (true, true), (false, false)] {
                let x = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 4, 9, 8), &dev)?)?;
                let w = Tensor::randn(0f64, 1., (5, 4, k, k), &dev)?;
                let scale = Tensor::randn(0f64, 1., 5, &dev)?;
                let shift = Tensor::randn(0f64, 1., 5, &dev)?;
                let (oh, ow) = (
                    (9 + 2 * padding - k) / stride + 1,
                    (8 + 2 * padding - k) / stride + 1,
                );
                let r = Var::from_tensor(&Tensor::randn(0f64, 1., (3, 5, oh, ow), &dev)?)?;
                let residual = with_residual.then(|| r.as_tensor());
                let g = Tensor::randn(0f64, 1., (3, 5, oh, ow), &dev)?;
                let run = |fused: bool| -> Result<Vec<Tensor>> {
                    let args = (
                        x.as_tensor(),
                        &w,
                        &scale,
                        &shift,
                        residual,
                        relu,
                        stride,
                        padding,
                    );
                    let y = if fused {
                        conv2d_bn_eval(
                            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                        )?
                    } else {
                        composed(
                            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                        )?
                    };
                    let grads = (&y * &g)?.sum_all()?.backward()?;
                    let mut out =
                        vec![y, grads.get(x.as_tensor()).expect("input gradient").clone()];
                    if with_residual {
                        out.push(grads.get(r.as_tensor()).expect("residual gradient").clone());
                    }
                    Ok(out)
                };
                for (a, b) in run(true)?.iter().zip(run(false)?.iter()) {
                    let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(
                        err < 1e-12,
                        "k{k} s{stride} p{padding} relu {relu} residual {with_residual}: {err}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Shapes that do not fit are refused with the shape at fault.
    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((3, 2, 3, 3), candle_core::DType::F32, &dev)?;
        let ok = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
        let bad = Tensor::zeros(2, candle_core::DType::F32, &dev)?;
        let err = conv2d_bn_eval(&x, &w, &bad, &ok, None, true, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scale has shape [2]"), "{err}");
        let r = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &dev)?;
        let err = conv2d_bn_eval(&x, &w, &ok, &ok, Some(&r), true, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual has shape [1, 3, 2, 2]"), "{err}");
        Ok(())
    }
}
