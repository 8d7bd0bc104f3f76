//! A 2-D convolution whose backward pass computes only the gradient with respect to its input.
//!
//! Classifier guidance differentiates the classifier with respect to x_t, never its weights.
//! candle's own conv2d backward always also computes the kernel gradient and takes the input
//! gradient through `conv_transpose2d`, whose CPU kernel is a direct loop; that made the
//! classifier gradient several times slower than its forward pass. Here the input gradient is
//! the usual identity "transposed conv = conv of the (zero-dilated) output gradient with the
//! spatially flipped, in/out-swapped kernel", computed with candle's fast conv2d.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Conv2d with bias (weights as in PyTorch: (out, in, k, k)), "same"-style padding `k / 2`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    /// The flipped, transposed kernel for the input gradient, made on first use.
    flipped: Arc<OnceLock<Tensor>>,
}

impl Conv2d {
    pub fn new(in_ch: usize, out_ch: usize, kernel: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_ch, in_ch, kernel, kernel), "weight")?,
            bias: vb.get(out_ch, "bias")?,
            stride,
            padding: kernel / 2,
            flipped: Arc::new(OnceLock::new()),
        })
    }

    fn flipped_kernel(&self) -> Result<Tensor> {
        if let Some(k) = self.flipped.get() {
            return Ok(k.clone());
        }
        let k = self.weight.dim(2)?;
        let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, self.weight.device())?;
        let flipped = self
            .weight
            .transpose(0, 1)?
            .contiguous()?
            .index_select(&rev, 2)?
            .index_select(&rev, 3)?
            .contiguous()?;
        Ok(self.flipped.get_or_init(|| flipped).clone())
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = x
            .detach()
            .conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        if !x.track_op() {
            return Ok(out);
        }
        let (_, _, h, w) = x.dims4()?;
        x.apply_op2(
            &out,
            InputGrad {
                conv: self.clone(),
                in_hw: (h, w),
            },
        )
    }
}

/// Forward: passes the already computed convolution output through; backward: the gradient
/// with respect to the convolution's input (none for the output it carries).
struct InputGrad {
    conv: Conv2d,
    in_hw: (usize, usize),
}

impl InputGrad {
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        let c = &self.conv;
        let k = c.weight.dim(2)?;
        let (h, w) = self.in_hw;
        let g_h = grad.dim(2)?;
        let dilated = if c.stride == 1 {
            grad.clone()
        } else {
            // zero-dilate: every gradient row/column followed by stride - 1 zeros
            let (b, o, gh, gw) = grad.dims4()?;
            let s = c.stride;
            let z = Tensor::zeros((b, o, gh, s - 1, gw), grad.dtype(), grad.device())?;
            let g = Tensor::cat(&[&grad.unsqueeze(3)?, &z], 3)?.reshape((b, o, gh * s, gw))?;
            let z = Tensor::zeros((b, o, gh * s, gw, s - 1), grad.dtype(), grad.device())?;
            Tensor::cat(&[&g.unsqueeze(4)?, &z], 4)?.reshape((b, o, gh * s, gw * s))?
        };
        let pad = k - 1 - c.padding;
        let gx = dilated.conv2d(&c.flipped_kernel()?, pad, 1, 1, 1)?;
        let (_, _, gh, gw) = gx.dims4()?;
        if (gh, gw) == (h, w) {
            Ok(gx)
        } else {
            // sizes the dilation trick does not cover (odd inputs with stride 2): candle's way
            let out_pad = (h + 2 * c.padding).saturating_sub((g_h - 1) * c.stride + k);
            grad.conv_transpose2d(&c.weight, c.padding, out_pad, c.stride, 1)
        }
    }
}

fn check_passthrough(l: &Layout) -> Result<()> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("conv input-grad op: the carried output must be contiguous")
    }
    Ok(())
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, out: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        check_passthrough(l)?;
        Ok((out.try_clone(l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        out: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_passthrough(l)?;
        Ok((out.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _out: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.input_grad(grad)?), None))
    }
}
