//! [`group_norm_affine`](crate::group_norm::group_norm_affine) on CUDA in f32: one kernel forward,
//! one backward (`src/cuda/group_norm.cu`, compiled to PTX by build.rs).
//!
//! From candle ops a group norm with its affine and SiLU is about fifteen kernels forward and twice
//! that backward, each a pass over the activation. In a kernel profile of guided sampling on an
//! H100 (ncu, 2026-11-23; docs/benchmarks.md) such elementwise passes took about half of the GPU
//! time and the matrix products under a tenth. Unlike the CPU op, this one is differentiable with
//! respect to `scale` and `shift` as well, so training uses it too: a trained norm's weight and bias
//! and the timestep embedding's scale and shift reach it through the small `[n, c]` products that
//! form `scale` and `shift`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
const MODULE: &str = "bigroc_group_norm";
/// Threads per block, one block per (sample, group). The kernels read the block size at run time;
/// it must be a multiple of 32 (their warp reductions) and at most 1024.
const THREADS: u32 = 256;

/// `silu?(normalize(x) * scale + shift)` for f32 `x` `[n, c, ...]` on CUDA, `scale`/`shift` `[n, c]`.
pub(crate) fn group_norm_affine_cuda(
    x: &Tensor,
    groups: usize,
    eps: f64,
    scale: &Tensor,
    shift: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, GroupNormCuda { groups, eps, silu })
}

#[derive(Clone, Copy)]
struct GroupNormCuda {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// The f32 elements of a contiguous operand.
fn f32_view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    crate::cuda_launch::f32_view(s, l, "group-norm-affine-cuda", "an operand")
}

/// The kernels' shape arguments: samples, channels, channels per group, positions per channel.
fn geometry(l: &Layout, groups: usize) -> Result<(usize, usize, usize, usize)> {
    let dims = l.dims();
    if !l.is_contiguous() || dims.len() < 2 || dims[1] % groups != 0 {
        bail!("group-norm-affine-cuda: needs a contiguous [n, c, ...] input with c divisible by {groups}, got {dims:?}")
    }
    let (n, c) = (dims[0], dims[1]);
    Ok((n, c, c / groups, l.shape().elem_count() / (n * c).max(1)))
}

fn launch(n: usize, groups: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n * groups) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl CustomOp3 for GroupNormCuda {
    fn name(&self) -> &'static str {
        "group-norm-affine-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("group-norm-affine-cuda runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, c, cpg, spatial) = geometry(xl, self.groups)?;
        let dev = x.device().clone();
        let (xs, a, b) = (f32_view(x, xl)?, f32_view(a, al)?, f32_view(b, bl)?);
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<f32>(xl.shape().elem_count())? };
        let func = dev.get_or_load_custom_func("group_norm_fwd_f32", MODULE, PTX)?;
        let (c_, cpg_, spatial_, eps, silu) = (c as i32, cpg as i32, spatial as i32, self.eps as f32, self.silu as i32);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&a).arg(&b).arg(&y).arg(&c_).arg(&cpg_).arg(&spatial_).arg(&eps).arg(&silu);
        // SAFETY: the arguments match the kernel's signature; the buffers hold n * c * spatial and n * c floats.
        unsafe { builder.launch(launch(n, self.groups)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let ab = Tensor::cat(&[a.detach(), b.detach()], 0)?;
        let packed = x.detach().apply_op3(&grad.detach().contiguous()?, &ab, GroupNormCudaGrad(*self))?;
        let count = x.elem_count();
        let dx = packed.narrow(0, 0, count)?.reshape(x.shape())?;
        let da = packed.narrow(0, count, n * c)?.reshape((n, c))?;
        let db = packed.narrow(0, count + n * c, n * c)?.reshape((n, c))?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The backward kernel: arguments x, dy and `[scale; shift]` (`[2n, c]`); output dx, dscale and
/// dshift flattened one after the other. Holds the forward's settings.
struct GroupNormCudaGrad(GroupNormCuda);

impl CustomOp3 for GroupNormCudaGrad {
    fn name(&self) -> &'static str {
        "group-norm-affine-cuda-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("group-norm-affine-cuda-grad runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        ab: &CudaStorage,
        abl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let GroupNormCuda { groups, eps, silu } = self.0;
        let (n, c, cpg, spatial) = geometry(xl, groups)?;
        if gl.dims() != xl.dims() || !gl.is_contiguous() || abl.dims() != [2 * n, c] || !abl.is_contiguous() {
            bail!("group-norm-affine-cuda-grad: bad operand shapes {:?} {:?} {:?}", xl.dims(), gl.dims(), abl.dims())
        }
        let dev = x.device().clone();
        let count = xl.shape().elem_count();
        let (xs, gs) = (f32_view(x, xl)?, f32_view(g, gl)?);
        let ab = ab.as_cuda_slice::<f32>()?;
        let (a, b) = (ab.slice(abl.start_offset()..abl.start_offset() + n * c), ab.slice(abl.start_offset() + n * c..));
        // SAFETY: every element is written by the kernel (dx everywhere, da and db once per channel).
        let out = unsafe { dev.alloc::<f32>(count + 2 * n * c)? };
        let func = dev.get_or_load_custom_func("group_norm_bwd_f32", MODULE, PTX)?;
        let (n_, c_, cpg_, spatial_, eps, silu) = (n as i32, c as i32, cpg as i32, spatial as i32, eps as f32, silu as i32);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&gs).arg(&a).arg(&b).arg(&out).arg(&n_).arg(&c_).arg(&cpg_).arg(&spatial_).arg(&eps).arg(&silu);
        // SAFETY: the arguments match the kernel's signature and sizes.
        unsafe { builder.launch(launch(n, groups)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(count + 2 * n * c)))
    }
}
