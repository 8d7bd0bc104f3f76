//! Differentiable tensor ops whose candle 0.11 versions do not match PyTorch's gradients.
//!
//! * [`clamp_with_torch_grad`]: candle builds `clamp` from `minimum`/`maximum`, whose backward splits
//!   the gradient in half where the input equals a bound. PyTorch's `clamp(x, lo, hi)` with scalar
//!   bounds (the pinned torch 2.15, see `xtask/reference/requirements.txt`) passes the gradient only
//!   strictly inside, `lo < x < hi`, and gives zero at the bounds. Pixels sit exactly at 0 or 1 all the
//!   time (saturated images, PGD's projection), so robust classifiers' input normalization needs the
//!   PyTorch rule to reproduce robustness' gradients and attacks.
//! * [`max_pool2d`]: candle's `max_pool2d` has no backward unless kernel == stride, and ResNet's ImageNet
//!   stem pools 3x3 with stride 2 and padding 1. This one pads with -inf like PyTorch and routes each
//!   window's gradient to its first maximum in row-major order, as PyTorch does on ties.
//! * [`batch_norm_train`]: training-mode batch norm from candle ops is right but its backward is slow
//!   (every broadcast's gradient is a strided reduction over batch and space); this one has the
//!   closed-form backward, its per-channel passes [`channel_affine`]'s.

use std::sync::Mutex;

use crate::channel_affine::channel_affine;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Error, Layout,
    MetalStorage, Result, Shape, Storage, Tensor, WithDType,
};

/// Clamps to `[lo, hi]` with the gradient of PyTorch's scalar-bound `clamp` (torch 2.15): the upstream
/// gradient passes unchanged where `lo < x < hi` and is zero elsewhere, bounds included. (Older torch
/// releases passed it at the bounds too; the fixtures pin the reference version's behaviour.) Built
/// from device-generic candle ops.
pub fn clamp_with_torch_grad(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let inside = x.gt(lo)?.mul(&x.lt(hi)?)?;
    // Strictly inside the interval the value is x itself, and so is the gradient's path; elsewhere it
    // is the clamped value from a detached clamp, so no gradient reaches x there.
    inside.where_cond(x, &x.clamp(lo, hi)?.detach())
}

/// Output size and window placement of a 2D pooling, with PyTorch's rules (floor mode, no dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolGeometry {
    kernel: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl PoolGeometry {
    fn new(h: usize, w: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            bail!("max_pool2d: kernel ({kernel}) and stride ({stride}) must be positive")
        }
        if 2 * padding > kernel {
            bail!("max_pool2d: padding ({padding}) must be at most half the kernel ({kernel})")
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            bail!("max_pool2d: input {h}x{w} with padding {padding} is smaller than the kernel {kernel}")
        }
        let oh = (h + 2 * padding - kernel) / stride + 1;
        let ow = (w + 2 * padding - kernel) / stride + 1;
        Ok(Self {
            kernel,
            stride,
            padding,
            h,
            w,
            oh,
            ow,
        })
    }

    /// Index (within one `h x w` plane) of the maximum of output window `(oy, ox)`: the first maximum
    /// in row-major window order, NaN winning like in PyTorch's CPU kernel. Out-of-range (padding)
    /// positions count as -inf, so they are never chosen over an in-range element.
    fn argmax<T: WithDType>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let y0 = (oy * self.stride).saturating_sub(self.padding);
        let x0 = (ox * self.stride).saturating_sub(self.padding);
        let y1 = (oy * self.stride + self.kernel - self.padding).min(self.h);
        let x1 = (ox * self.stride + self.kernel - self.padding).min(self.w);
        let mut best = y0 * self.w + x0;
        let mut best_val = T::from_f64(f64::NEG_INFINITY);
        for y in y0..y1 {
            for x in x0..x1 {
                let i = y * self.w + x;
                let v = plane[i];
                #[allow(clippy::eq_op)]
                let is_nan = v != v;
                if v > best_val || is_nan {
                    best_val = v;
                    best = i;
                }
            }
        }
        best
    }

    fn forward<T: WithDType>(&self, x: &[T], planes: usize) -> Vec<T> {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut out = Vec::with_capacity(planes * ohw);
        for plane in x.chunks_exact(hw).take(planes) {
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    out.push(plane[self.argmax(plane, oy, ox)]);
                }
            }
        }
        out
    }

    fn backward<T: WithDType>(&self, x: &[T], grad_out: &[T], planes: usize) -> Vec<T> {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut grad = vec![T::zero(); planes * hw];
        for p in 0..planes {
            let plane = &x[p * hw..(p + 1) * hw];
            let g_plane = &mut grad[p * hw..(p + 1) * hw];
            let go = &grad_out[p * ohw..(p + 1) * ohw];
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    g_plane[self.argmax(plane, oy, ox)] += go[oy * self.ow + ox];
                }
            }
        }
        grad
    }
}

/// The entries of a contiguous operand of the custom op `op` (an error naming `op` and `what`
/// otherwise).
pub(crate) fn contiguous_slice<'a, T>(data: &'a [T], layout: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// The f32 elements of a contiguous CPU operand of the custom op `op`; `what` names the operand in
/// the error.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous_slice(v, l, op, what),
        other => bail!("{op}: {what} is {:?}, expected f32", other.dtype()),
    }
}

/// Calls `f` with a CPU tensor's elements in place (no copy), for the custom ops that read their
/// constant operands (a layer's weight) while running; `op` and `what` name them in the error.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    op: &str,
    what: &str,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: {what} must be on the CPU")
    };
    Ok(f(contiguous_slice(cpu.as_slice::<T>()?, layout, op, what)?))
}

/// CPU max pooling (f32/f64) as a candle custom op, so it gets its own backward.
struct MaxPool2dCpu {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for MaxPool2dCpu {
    fn name(&self) -> &'static str {
        "bigroc-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let g = PoolGeometry::new(h, w, self.kernel, self.stride, self.padding)?;
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(g.forward(contiguous_slice(v, layout, "max_pool2d", "input")?, n * c))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(g.forward(contiguous_slice(v, layout, "max_pool2d", "input")?, n * c))
            }
            s => bail!(
                "max_pool2d: CPU kernel supports f32 and f64, got {:?}",
                s.dtype()
            ),
        };
        Ok((out, Shape::from((n, c, g.oh, g.ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let backward = MaxPool2dCpuBackward {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        let grad = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &backward)?;
        Ok(Some(grad))
    }
}

/// Gradient of [`MaxPool2dCpu`]: inputs (pooled input, gradient of the output), output the gradient
/// of the input, scattered to each window's argmax (summed where windows overlap).
struct MaxPool2dCpuBackward {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp2 for MaxPool2dCpuBackward {
    fn name(&self) -> &'static str {
        "bigroc-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let g = PoolGeometry::new(h, w, self.kernel, self.stride, self.padding)?;
        if l2.shape().dims() != [n, c, g.oh, g.ow] {
            bail!(
                "max_pool2d backward: gradient shape {:?} does not match the output {:?}",
                l2.shape(),
                (n, c, g.oh, g.ow)
            )
        }
        let grad = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(go)) => CpuStorage::F32(g.backward(
                contiguous_slice(x, l1, "max_pool2d", "input")?,
                contiguous_slice(go, l2, "max_pool2d", "gradient")?,
                n * c,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(go)) => CpuStorage::F64(g.backward(
                contiguous_slice(x, l1, "max_pool2d", "input")?,
                contiguous_slice(go, l2, "max_pool2d", "gradient")?,
                n * c,
            )),
            (a, b) => bail!(
                "max_pool2d backward: unsupported dtypes {:?}/{:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((grad, l1.shape().clone()))
    }
}

/// 2D max pooling of an `(N, C, H, W)` tensor with PyTorch's semantics (`F.max_pool2d(x, kernel,
/// stride, padding)`, floor mode): padding counts as -inf, and the backward pass sends each window's
/// gradient to its first maximum in row-major order. f32/f64 on the CPU run a direct kernel; other
/// devices and dtypes use [`max_pool2d_composite`].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    PoolGeometry::new(h, w, kernel, stride, padding)?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(MaxPool2dCpu {
            kernel,
            stride,
            padding,
        })
    } else {
        max_pool2d_composite(x, kernel, stride, padding)
    }
}

/// [`max_pool2d`] built only from differentiable candle ops, so it runs (forward and backward) on any
/// device: the input is padded with -inf, each of the `kernel^2` window offsets becomes a strided view
/// (narrow + reshape), and the output picks, per window, the first offset that attains the maximum
/// (`where_cond`, whose backward routes the gradient to exactly that element). Unlike the CPU kernel
/// it does not propagate NaN.
pub fn max_pool2d_composite(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let g = PoolGeometry::new(h, w, kernel, stride, padding)?;
    // Rows/columns the windows need: offsets 0..kernel, each followed by oh (ow) strides.
    let need_h = kernel - 1 + stride * g.oh;
    let need_w = kernel - 1 + stride * g.ow;
    let neg_inf = |rows: usize, cols: usize| -> Result<Tensor> {
        Tensor::full(f32::NEG_INFINITY, (n, c, rows, cols), x.device())?.to_dtype(x.dtype())
    };
    let pad_to = |t: &Tensor, dim: usize, before: usize, total: usize| -> Result<Tensor> {
        let (_, _, th, tw) = t.dims4()?;
        let size = if dim == 2 { th } else { tw };
        let after = total.saturating_sub(before + size);
        let block = |len: usize| {
            if dim == 2 {
                neg_inf(len, tw)
            } else {
                neg_inf(th, len)
            }
        };
        let mut parts = Vec::with_capacity(3);
        if before > 0 {
            parts.push(block(before)?);
        }
        parts.push(t.clone());
        if after > 0 {
            parts.push(block(after)?);
        }
        let t = if parts.len() == 1 {
            t.clone()
        } else {
            Tensor::cat(&parts, dim)?
        };
        t.narrow(dim, 0, total)
    };
    let padded = pad_to(&pad_to(x, 2, padding, need_h)?, 3, padding, need_w)?;

    let mut windows = Vec::with_capacity(kernel * kernel);
    for ky in 0..kernel {
        let rows = padded
            .narrow(2, ky, stride * g.oh)?
            .reshape((n, c, g.oh, stride, need_w))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for kx in 0..kernel {
            let win = rows
                .narrow(3, kx, stride * g.ow)?
                .reshape((n, c, g.oh, g.ow, stride))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            windows.push(win);
        }
    }
    let mut max = windows[0].detach();
    for win in &windows[1..] {
        max = max.maximum(&win.detach())?;
    }
    let zeros = max.zeros_like()?;
    let mut taken = zeros.clone();
    let mut out = zeros.clone();
    for win in &windows {
        let is_max = win.detach().eq(&max)?.to_dtype(x.dtype())?;
        let first = (is_max * (1.0 - &taken)?)?;
        taken = (taken + &first)?;
        out = (out + first.to_dtype(DType::U8)?.where_cond(win, &zeros)?)?;
    }
    Ok(out)
}

/// The forward value of a custom op whose forward is best computed by ordinary tensor ops (candle 0.11
/// offers no public way to call a backend's convolution from a custom op: `ParamsConv2D` cannot be
/// built outside candle), computed before the op is applied, from detached inputs, and handed over
/// once: the op's forward empties it, so the graph does not keep a second copy alive. The op then only
/// contributes its backward.
pub(crate) struct PrecomputedOutput(Mutex<Option<Tensor>>);

impl PrecomputedOutput {
    pub(crate) fn new(y: Tensor) -> Self {
        Self(Mutex::new(Some(y)))
    }

    /// Copies the output out of its storage for the backend `pick` selects.
    fn take_on<S: BackendStorage>(
        &self,
        op: &str,
        pick: impl FnOnce(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let y = self
            .0
            .lock()
            .map_err(|_| Error::Msg(format!("{op}: poisoned lock")))?
            .take()
            .ok_or_else(|| Error::Msg(format!("{op}: forward ran twice")))?;
        let (storage, layout) = y.storage_and_layout();
        // The forward allocates a fresh, exactly sized, contiguous output, so a plain clone of the
        // storage is the output in row-major order.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            bail!("{op}: unexpected strided precomputed output")
        }
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => bail!("{op}: input and output on different devices"),
        }
    }

    pub(crate) fn take_cpu(&self, op: &str) -> Result<(CpuStorage, Shape)> {
        self.take_on(op, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    pub(crate) fn take_cuda(&self, op: &str) -> Result<(CudaStorage, Shape)> {
        self.take_on(op, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    pub(crate) fn take_metal(&self, op: &str) -> Result<(MetalStorage, Shape)> {
        self.take_on(op, |s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }
}

/// Training-mode batch norm of `x` (`[n, c, h, w]`) with the statistics of the batch, as
/// `torch.nn.functional.batch_norm(training=True)`: `(x - mean) / sqrt(var + eps) * weight + bias`,
/// mean and biased variance over `(n, h, w)` per channel. Returns the output and the batch's `(mean,
/// biased variance)` as `[c]` tensors (detached), for the caller's running statistics.
///
/// Differentiable with respect to `x`, `weight` and `bias` (each only if it tracks gradients), with
/// the closed-form backward: for `x_hat = (x - mean) / sqrt(var + eps)` and `m = n * h * w` values per
/// channel, `d bias = sum g`, `d weight = sum g * x_hat`, and
/// `d x = weight / sqrt(var + eps) * (g - d bias / m - x_hat * d weight / m)`. Tensor ops only (any
/// device); per-channel sums reduce the contiguous `h * w` axis first, then the batch.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, h, w) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "batch_norm_train: weight {:?} and bias {:?} must have shape [{c}] for input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        )
    }
    if n * h * w < 2 {
        bail!("batch norm in training mode needs more than one value per channel, got input of shape {:?}", x.dims())
    }
    if crate::conv::uses_im2col(x) {
        let stats = crate::train_ops::channel_mean_var(&x.detach())?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let mean_f64: Vec<f64> = mean.to_dtype(DType::F64)?.to_vec1()?;
        let inv_std = var.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let y = crate::train_ops::normalize(x, weight, bias, mean_f64, inv_std)?;
        return Ok((y, mean, var));
    }
    batch_norm_train_tensor_ops(x, weight, bias, eps)
}

/// [`batch_norm_train`] from tensor ops (CUDA, half precision): per-channel sums of contiguous rows,
/// and [`channel_affine`] for every per-channel affine pass (one kernel each on CUDA in f32, where
/// candle's broadcast kernels spend a 64-bit division and modulo per dimension per element). The
/// centered input is kept for the backward.
fn batch_norm_train_tensor_ops(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let xd = x.detach();
    let mean = channel_mean(&xd)?;
    let centered = channel_affine(&xd, None, &mean.neg()?, None, false)?;
    let var = channel_mean(&centered.sqr()?)?;
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let scale = (&inv_std * weight.detach().reshape((1, c, 1, 1))?)?;
    let y = channel_affine(&centered, Some(&scale), &bias.detach(), None, false)?;
    let stats = (mean.flatten_all()?, var.flatten_all()?);
    if !(x.track_op() || weight.track_op() || bias.track_op()) {
        return Ok((y, stats.0, stats.1));
    }
    let y = x.apply_op3(
        weight,
        bias,
        BatchNormTrain {
            centered,
            inv_std,
            output: PrecomputedOutput::new(y),
        },
    )?;
    Ok((y, stats.0, stats.1))
}

/// Per-channel mean of `[n, c, h, w]` as `[1, c, 1, 1]`: the contiguous `h * w` sums first.
fn channel_mean(t: &Tensor) -> Result<Tensor> {
    let (n, _, h, w) = t.dims4()?;
    channel_sum(t)? / (n * h * w) as f64
}

/// Per-channel sum of `[n, c, h, w]` as `[1, c, 1, 1]`.
fn channel_sum(t: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = t.dims4()?;
    t.reshape((n, c, h * w))?
        .sum_keepdim(2)?
        .sum_keepdim(0)?
        .reshape((1, c, 1, 1))
}

/// The op [`batch_norm_train`] puts in the graph; `mean` and `inv_std` are the batch's, `[1, c, 1, 1]`.
struct BatchNormTrain {
    /// `x - mean`, per channel.
    centered: Tensor,
    /// `1 / sqrt(var + eps)`, `[1, c, 1, 1]`.
    inv_std: Tensor,
    output: PrecomputedOutput,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
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
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.output.take_metal(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let m = (n * h * w) as f64;
        let grad = grad.contiguous()?;
        let grad_bias = channel_sum(&grad)?;
        // sum g * x_hat, x_hat = centered * inv_std.
        let grad_weight = (channel_sum(&(&grad * &self.centered)?)? * &self.inv_std)?;
        let grad_x = if x.track_op() {
            // dx = a * (g - grad_bias / m - x_hat * grad_weight / m), a = weight * inv_std: the
            // centered input times a per-channel slope plus a per-channel shift, then a * g added.
            let a = (&self.inv_std * weight.detach().reshape((1, c, 1, 1))?)?;
            let slope = ((&a * &self.inv_std)? * &grad_weight)?.affine(-1.0 / m, 0.0)?;
            let shift = (&a * &grad_bias)?.affine(-1.0 / m, 0.0)?;
            let rest = channel_affine(&self.centered, Some(&slope), &shift, None, false)?;
            let zero = Tensor::zeros(c, grad.dtype(), grad.device())?;
            Some(channel_affine(&grad, Some(&a), &zero, Some(&rest), false)?)
        } else {
            None
        };
        let per_channel = |t: Tensor, tracked: bool| -> Result<Option<Tensor>> {
            Ok(if tracked {
                Some(t.flatten_all()?)
            } else {
                None
            })
        };
        Ok((
            grad_x,
            per_channel(grad_weight, weight.track_op())?,
            per_channel(grad_bias, bias.track_op())?,
        ))
    }
}

/// Training-mode batch norm as the textbook writes it, from broadcast candle ops (autograd gives
/// its backward): the output and the `[1, c, 1, 1]` batch mean and biased variance. The tests'
/// reference for the batch norm ops.
#[cfg(test)]
pub(crate) fn batch_norm_textbook(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = (1, x.dim(1)?, 1, 1);
    let mean = x.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let y = centered
        .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape(shape)?)?
        .broadcast_add(&bias.reshape(shape)?)?;
    Ok((y, mean, var))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// The tensor-ops batch norm (CUDA's, run here on the CPU: in f32 through the channel affine's
    /// CPU op, in f64 through composed candle ops) against the textbook formula in f64 with autograd:
    /// output, statistics and the gradients of x, weight and bias.
    #[test]
    fn tensor_ops_batch_norm_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f64, 2., (3, 4, 5, 6), &dev)?;
        let w = Tensor::randn(1f64, 0.3, 4, &dev)?;
        let b = Tensor::randn(0f64, 0.3, 4, &dev)?;
        let probe = Tensor::randn(0f64, 1., (3, 4, 5, 6), &dev)?;
        let eps = 1e-5;
        let run = |dtype: DType, textbook: bool| -> Result<Vec<Tensor>> {
            let (xv, wv, bv) = (Var::from_tensor(&x.to_dtype(dtype)?)?, Var::from_tensor(&w.to_dtype(dtype)?)?, Var::from_tensor(&b.to_dtype(dtype)?)?);
            let (xv, wv, bv) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
            let (y, mean, var) = if textbook {
                let (y, m, v) = batch_norm_textbook(xv, wv, bv, eps)?;
                (y, m.flatten_all()?, v.flatten_all()?)
            } else {
                batch_norm_train_tensor_ops(xv, wv, bv, eps)?
            };
            let grads = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let mut out = vec![y, mean, var];
            for t in [xv, wv, bv] {
                out.push(grads.get(t).expect("every input has a gradient").clone());
            }
            Ok(out)
        };
        let want = run(DType::F64, true)?;
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
            let got = run(dtype, false)?;
            for (name, (g, w)) in ["y", "mean", "var", "dx", "dweight", "dbias"].iter().zip(got.iter().zip(&want)) {
                let err = max_diff(g, w)?;
                assert!(err < tol, "{dtype:?} {name}: max error {err:.2e}");
            }
        }
        Ok(())
    }
}
