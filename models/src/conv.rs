//! A 2D convolution with a constant weight whose backward computes only the input gradient, with fast
//! forward convolutions.
//!
//! BIGRoC's PGD and classifier guidance differentiate a frozen classifier with respect to its input
//! image. candle 0.11's backward of `Tensor::conv2d` always computes the kernel gradient too (a
//! convolution whose "kernel" is the whole output gradient) and gets the input gradient from
//! `conv_transpose2d`, which on CPU is a loop of dot products; together they dominate PGD's time.
//!
//! The input gradient of a convolution is itself a convolution. For stride 1 it is the output gradient
//! convolved with the weight flipped in both spatial dimensions and with its in/out channels swapped,
//! padded by `k - 1 - p`. For stride `s > 1` the output gradient is first spread out with `s - 1` zeros
//! between neighbours, so that every output position lands back over the input position where its
//! window started; input rows/columns past the last window (when `H + 2p - k` is not a multiple of `s`)
//! get one more row/column of padding at the far end and so a zero gradient. Everything here is
//! candle's own forward `conv2d` (im2col + gemm on CPU, cuDNN on CUDA) plus reshapes and zero padding,
//! so it runs on every device and dtype candle's convolution supports.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, Error, Layout, MetalStorage, Result, Shape, Storage,
    Tensor,
};

/// `x` convolved with `weight` (`[c_out, c_in, kh, kw]`, no bias, groups 1, dilation 1, the same
/// `stride` and zero `padding` on both spatial axes), equal to `x.conv2d(weight, padding, stride, 1, 1)`.
///
/// Differentiable with respect to `x` only: the weight is used as a constant (a `Var` weight receives
/// no gradient through this op), which is what gradients of a frozen network with respect to its
/// input need, at about the cost of one more forward convolution.
pub fn conv2d_const_weight(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, c_in, h, w) = x.dims4()?;
    let (_, c_in_k, kh, kw) = weight.dims4()?;
    if c_in != c_in_k {
        bail!("conv2d_const_weight: input has {c_in} channels but the weight expects {c_in_k}")
    }
    if stride == 0 {
        bail!("conv2d_const_weight: stride must be positive")
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        bail!(
            "conv2d_const_weight: input {h}x{w} with padding {padding} is smaller than the kernel {kh}x{kw}"
        )
    }
    let weight = weight.detach();
    let y = x.detach().conv2d(&weight, padding, stride, 1, 1)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(ConstWeightConv2d {
        weight,
        stride,
        padding,
        output: Mutex::new(Some(y)),
    })
}

/// The input gradient of `conv2d(x, weight, stride, padding)` for an `x` of spatial size `input_hw`,
/// given the gradient `grad` (`[b, c_out, oh, ow]`) of its output: the adjoint of the convolution
/// (a transposed convolution), computed with forward convolutions only.
pub fn conv2d_input_grad(
    grad: &Tensor,
    weight: &Tensor,
    input_hw: (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, c_out, oh, ow) = grad.dims4()?;
    let (c_out_k, _, kh, kw) = weight.dims4()?;
    if c_out != c_out_k {
        bail!("conv2d_input_grad: gradient has {c_out} channels but the weight has {c_out_k} outputs")
    }
    let (h, w) = input_hw;
    let rows = AxisGeometry::new("height", h, kh, stride, padding, oh)?;
    let cols = AxisGeometry::new("width", w, kw, stride, padding, ow)?;

    // [c_out, c_in, kh, kw] -> flipped, [c_in, c_out, kh, kw]: the adjoint's kernel.
    let adjoint_kernel = weight.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    // A 1x1 kernel mixes channels per position, so it commutes with spreading and padding: apply it
    // to the small gradient first instead of to the spread-out one (s^2 times fewer positions).
    let pointwise = kh == 1 && kw == 1;
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
        rows_before.min(rows_after).min(cols_before).min(cols_after).max(0)
    };
    let spread = pad_or_crop(&spread, 2, rows_before - shared, rows_after - shared)?;
    let spread = pad_or_crop(&spread, 3, cols_before - shared, cols_after - shared)?;
    if pointwise {
        Ok(spread)
    } else {
        spread.conv2d(&adjoint_kernel, shared as usize, 1, 1, 1)
    }
}

/// One spatial axis of the convolution: input length `n`, kernel `k`, and what the adjoint needs.
struct AxisGeometry {
    k: usize,
    stride: usize,
    padding: usize,
    /// Input positions after the last window: `(n + 2p - k) mod s`.
    uncovered: usize,
}

impl AxisGeometry {
    fn new(
        axis: &str,
        n: usize,
        k: usize,
        stride: usize,
        padding: usize,
        out: usize,
    ) -> Result<Self> {
        if stride == 0 {
            bail!("conv2d_input_grad: stride must be positive")
        }
        if n + 2 * padding < k {
            bail!("conv2d_input_grad: input {axis} {n} with padding {padding} is smaller than the kernel {k}")
        }
        let span = n + 2 * padding - k;
        if span / stride + 1 != out {
            bail!(
                "conv2d_input_grad: gradient {axis} {out} does not match input {axis} {n} (kernel {k}, stride {stride}, padding {padding}, expected {})",
                span / stride + 1
            )
        }
        Ok(Self {
            k,
            stride,
            padding,
            uncovered: span % stride,
        })
    }

    /// Zeros to add (negative: entries to drop) before and after the spread gradient, whose length is
    /// `out * s` (the last `s - 1` entries being zeros), so that a stride-1 valid convolution with
    /// the `k`-long adjoint kernel yields exactly `n` positions.
    fn pad_of_spread(&self) -> (isize, isize) {
        let (k, s, p) = (self.k as isize, self.stride as isize, self.padding as isize);
        let before = k - 1 - p;
        let after = k - 1 - p + self.uncovered as isize - (s - 1);
        (before, after)
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
        t.narrow(dim, drop_before as usize, (len - drop_before - drop_after) as usize)?
    } else {
        t.clone()
    };
    t.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)
}

/// The op [`conv2d_const_weight`] puts in the graph. Its forward value is computed before the op is
/// applied, by candle's own `conv2d` on detached inputs (there is no public way to call a backend's
/// convolution from a custom op), and handed over once through `output`, which the forward empties so
/// the graph does not keep a second copy alive.
struct ConstWeightConv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    output: Mutex<Option<Tensor>>,
}

impl ConstWeightConv2d {
    fn take_output(&self) -> Result<Tensor> {
        let mut output = self
            .output
            .lock()
            .map_err(|_| Error::Msg("conv2d_const_weight: poisoned lock".into()))?;
        output
            .take()
            .ok_or_else(|| Error::Msg("conv2d_const_weight: forward ran twice".into()))
    }

    /// Copies the precomputed output out of its storage for the backend `pick` selects.
    fn forward_on<S: BackendStorage>(
        &self,
        pick: impl FnOnce(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        // conv2d allocates a fresh, exactly sized, contiguous output, so a plain clone of the storage
        // is the output in row-major order.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            bail!("conv2d_const_weight: unexpected strided conv2d output")
        }
        match pick(&storage) {
            Some(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            None => bail!("conv2d_const_weight: input and output on different devices"),
        }
    }
}

impl CustomOp1 for ConstWeightConv2d {
    fn name(&self) -> &'static str {
        "conv2d-const-weight"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward_on(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.forward_on(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.forward_on(|s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        conv2d_input_grad(grad_res, &self.weight, (h, w), self.stride, self.padding).map(Some)
    }
}
