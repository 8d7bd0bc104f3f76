//! One AdamW update (`torch.optim.AdamW`'s rule) and one EMA update of one parameter tensor.
//!
//! From candle ops an AdamW update is twelve kernels and an EMA update three, per parameter tensor
//! and iteration; the diffusion UNet has 245 tensors, so a training step launched about 3,700
//! small kernels for them alone, of the roughly 11,700 a step launched in stop 12's ncu profile on
//! an H100. On CUDA in f32 each update here is one kernel (`src/cuda/optimizer_step.cu`) whose
//! arithmetic is the composed one's, rounding for rounding, so the results are equal, not close.
//! On the CPU (and in other dtypes) the composed ops run: [`AdamW::composed`], [`ema_composed`].

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::ops::cpu_f32;

/// The settings of one AdamW update: the learning rate, decoupled weight decay, the betas and eps,
/// and the step number (from 1) for the bias corrections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step: usize,
}

impl AdamW {
    /// `(p', exp_avg', exp_avg_sq')` from the parameter `p`, its gradient `g` and the moments `m`, `v`
    /// (zeros before the first step): `p' = p (1 - lr wd) - lr / (1 - beta1^t) * m' / (sqrt(v') /
    /// sqrt(1 - beta2^t) + eps)`.
    pub fn update(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        for (name, t) in [("gradient", g), ("exp_avg", m), ("exp_avg_sq", v)] {
            if t.dims() != p.dims() {
                bail!("adamw: the {name} has shape {:?}, the parameter {:?}", t.dims(), p.dims())
            }
        }
        if !runs_fused(p) {
            return self.composed(p, g, m, v);
        }
        let numel = p.elem_count();
        let packed = p.contiguous()?.apply_op2_no_bwd(
            &g.contiguous()?,
            &FusedAdamW { scalars: self.scalars(), m: m.contiguous()?, v: v.contiguous()? },
        )?;
        let part = |i: usize| packed.narrow(0, i * numel, numel)?.reshape(p.shape());
        Ok((part(0)?, part(1)?, part(2)?))
    }

    /// The same from candle ops (the trainers' rule since they were written, on every device).
    pub fn composed(&self, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let p = (p * (1.0 - self.lr * self.weight_decay))?;
        let m = ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let (bias1, bias2) = self.bias_corrections();
        let denom = ((v.sqrt()? / bias2.sqrt())? + self.eps)?;
        let p = (p - ((&m / denom)? * (self.lr / bias1))?)?;
        Ok((p, m, v))
    }

    fn bias_corrections(&self) -> (f64, f64) {
        (1.0 - self.beta1.powi(self.step as i32), 1.0 - self.beta2.powi(self.step as i32))
    }

    /// The kernel's constants, rounded to f32 as candle rounds an affine op's `mul` and `add`
    /// (`t / x` is `t * (1 / x)`).
    fn scalars(&self) -> [f32; 8] {
        let (bias1, bias2) = self.bias_corrections();
        [
            1.0 - self.lr * self.weight_decay,
            self.beta1,
            1.0 - self.beta1,
            self.beta2,
            1.0 - self.beta2,
            1.0 / bias2.sqrt(),
            self.eps,
            self.lr / bias1,
        ]
        .map(|s| s as f32)
    }
}

/// `ema * rate + p * (1 - rate)` (guided-diffusion's `update_ema`).
pub fn ema_update(ema: &Tensor, p: &Tensor, rate: f64) -> Result<Tensor> {
    if ema.dims() != p.dims() {
        bail!("ema: the average has shape {:?}, the parameter {:?}", ema.dims(), p.dims())
    }
    if !runs_fused(p) {
        return ema_composed(ema, p, rate);
    }
    ema.contiguous()?.apply_op2_no_bwd(&p.contiguous()?, &FusedEma { rate: rate as f32, one_minus_rate: (1.0 - rate) as f32 })
}

/// [`ema_update`] from candle ops.
pub fn ema_composed(ema: &Tensor, p: &Tensor, rate: f64) -> Result<Tensor> {
    (ema * rate)? + (p * (1.0 - rate))?
}

/// Whether the updates of `p` run as one kernel: f32 on CUDA with the crate's kernels on
/// (`BIGROC_CUDA_KERNELS`), within the kernels' 32-bit indices (three times the count for AdamW's
/// packed output).
fn runs_fused(p: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && p.device().is_cuda()
        && p.dtype() == DType::F32
        && 3 * p.elem_count() <= i32::MAX as usize
        && crate::own_cuda_kernel("optimizer")
}

/// The AdamW kernel's op: arguments `p` and `g`, the moments held here; output the new `p`, `m`
/// and `v` one after the other.
struct FusedAdamW {
    scalars: [f32; 8],
    m: Tensor,
    v: Tensor,
}

/// The EMA kernel's op: arguments the average and the parameter.
struct FusedEma {
    rate: f32,
    one_minus_rate: f32,
}

impl CustomOp2 for FusedAdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }

    /// The kernel's arithmetic on the CPU (unused by the trainers, which compose candle ops there;
    /// it lets the tests hold the kernel's order of operations against the composed one).
    fn cpu_fwd(&self, p: &CpuStorage, pl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, g) = (cpu_f32(p, pl, "adamw", "the parameter")?, cpu_f32(g, gl, "adamw", "the gradient")?);
        let (m_guard, ml) = self.m.storage_and_layout();
        let (v_guard, vl) = self.v.storage_and_layout();
        let (m, v) = match (&*m_guard, &*v_guard) {
            (candle_core::Storage::Cpu(m), candle_core::Storage::Cpu(v)) => (cpu_f32(m, ml, "adamw", "exp_avg")?, cpu_f32(v, vl, "adamw", "exp_avg_sq")?),
            _ => bail!("adamw: the moments are not on the CPU"),
        };
        let [decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bias2, eps, lr_over_bias1] = self.scalars;
        let numel = p.len();
        let mut out = vec![0f32; 3 * numel];
        for i in 0..numel {
            let m1 = m[i] * beta1 + g[i] * one_minus_beta1;
            let v1 = v[i] * beta2 + (g[i] * g[i]) * one_minus_beta2;
            let denom = v1.sqrt() * inv_sqrt_bias2 + eps;
            out[i] = p[i] * decay - m1 / denom * lr_over_bias1;
            out[numel + i] = m1;
            out[2 * numel + i] = v1;
        }
        Ok((CpuStorage::F32(out), Shape::from(3 * numel)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, p: &candle_core::CudaStorage, pl: &Layout, g: &candle_core::CudaStorage, gl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::adamw(self, p, pl, g, gl)
    }
}

impl CustomOp2 for FusedEma {
    fn name(&self) -> &'static str {
        "ema"
    }

    fn cpu_fwd(&self, ema: &CpuStorage, el: &Layout, p: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ema, p) = (cpu_f32(ema, el, "ema", "the average")?, cpu_f32(p, pl, "ema", "the parameter")?);
        let out = ema.iter().zip(p).map(|(e, p)| e * self.rate + p * self.one_minus_rate).collect();
        Ok((CpuStorage::F32(out), el.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ema: &candle_core::CudaStorage, el: &Layout, p: &candle_core::CudaStorage, pl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::ema(self, ema, el, p, pl)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The launches of `src/cuda/optimizer_step.cu` (compiled to PTX by build.rs).

    use super::{FusedAdamW, FusedEma};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{bail, CudaStorage, Layout, Result, Shape, Storage};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optimizer_step.ptx"));
    const MODULE: &str = "bigroc_optimizer_step";
    fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
        crate::cuda_launch::f32_view(s, l, "optimizer step", what)
    }

    pub(super) fn adamw(op: &FusedAdamW, p: &CudaStorage, pl: &Layout, g: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let numel = pl.shape().elem_count();
        let dev = p.device().clone();
        let (ps, gs) = (f32_view(p, pl, "parameter")?, f32_view(g, gl, "gradient")?);
        let (m_guard, ml) = op.m.storage_and_layout();
        let (v_guard, vl) = op.v.storage_and_layout();
        let (ms, vs) = match (&*m_guard, &*v_guard) {
            (Storage::Cuda(m), Storage::Cuda(v)) => (f32_view(m, ml, "exp_avg")?, f32_view(v, vl, "exp_avg_sq")?),
            _ => bail!("adamw: the moments are not on the GPU"),
        };
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(3 * numel)? };
        let func = dev.get_or_load_custom_func("adamw_f32", MODULE, PTX)?;
        let numel_ = numel as u32;
        let [decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bias2, eps, lr_over_bias1] = op.scalars;
        let mut builder = func.builder();
        builder.arg(&ps).arg(&gs).arg(&ms).arg(&vs).arg(&out).arg(&numel_);
        builder.arg(&decay).arg(&beta1).arg(&one_minus_beta1).arg(&beta2).arg(&one_minus_beta2);
        builder.arg(&inv_sqrt_bias2).arg(&eps).arg(&lr_over_bias1);
        // SAFETY: the arguments match the kernel's signature; p, g, m and v hold numel floats (the
        // caller checked their shapes), out 3 * numel.
        unsafe { builder.launch(crate::cuda_launch::grid_stride(numel)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(3 * numel)))
    }

    pub(super) fn ema(op: &FusedEma, ema: &CudaStorage, el: &Layout, p: &CudaStorage, pl: &Layout) -> Result<(CudaStorage, Shape)> {
        let numel = el.shape().elem_count();
        let dev = ema.device().clone();
        let (es, ps) = (f32_view(ema, el, "average")?, f32_view(p, pl, "parameter")?);
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(numel)? };
        let func = dev.get_or_load_custom_func("ema_f32", MODULE, PTX)?;
        let numel_ = numel as u32;
        let mut builder = func.builder();
        builder.arg(&es).arg(&ps).arg(&out).arg(&numel_).arg(&op.rate).arg(&op.one_minus_rate);
        // SAFETY: the arguments match the kernel's signature; ema and p hold numel floats.
        unsafe { builder.launch(crate::cuda_launch::grid_stride(numel)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), el.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The kernels' order of operations (their CPU twins) gives exactly the composed ops' results,
    /// over several steps (bias corrections), with weight decay, and over values spanning many
    /// magnitudes; so does the EMA.
    #[test]
    fn fused_arithmetic_equals_the_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let shape = (7, 33);
        // Normal values scaled to magnitudes from 1e-6 to 1e2.
        let spread = || -> Result<Tensor> {
            let exponents = Tensor::rand(-6f32, 2.0, shape, &dev)?;
            Tensor::randn(0f32, 1.0, shape, &dev)? * exponents.affine(std::f64::consts::LN_10, 0.0)?.exp()?
        };
        let (mut p_ref, mut m_ref, mut v_ref) = (spread()?, Tensor::zeros(shape, DType::F32, &dev)?, Tensor::zeros(shape, DType::F32, &dev)?);
        let (mut p, mut m, mut v) = (p_ref.clone(), m_ref.clone(), v_ref.clone());
        for step in 1..=5 {
            let g = spread()?;
            let settings = AdamW { lr: 3e-4 * step as f64, weight_decay: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, step };
            (p_ref, m_ref, v_ref) = settings.composed(&p_ref, &g, &m_ref, &v_ref)?;
            let packed = p.apply_op2_no_bwd(&g, &FusedAdamW { scalars: settings.scalars(), m: m.clone(), v: v.clone() })?;
            let n = p.elem_count();
            (p, m, v) = (packed.narrow(0, 0, n)?.reshape(shape)?, packed.narrow(0, n, n)?.reshape(shape)?, packed.narrow(0, 2 * n, n)?.reshape(shape)?);
            for (name, a, b) in [("parameter", &p, &p_ref), ("exp_avg", &m, &m_ref), ("exp_avg_sq", &v, &v_ref)] {
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "step {step}: {name} differs by {diff}");
            }
        }
        let ema = spread()?;
        let fused = ema.apply_op2_no_bwd(&p, &FusedEma { rate: 0.9995f64 as f32, one_minus_rate: (1.0 - 0.9995f64) as f32 })?;
        let diff = (fused - ema_composed(&ema, &p, 0.9995)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "ema differs by {diff}");
        Ok(())
    }
}
