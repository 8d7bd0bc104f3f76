//! What the crate's CUDA ops share: the f32 elements of a contiguous operand, and the launch shape
//! of their grid-stride kernels.

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::{bail, CudaStorage, Layout, Result};

/// Threads per block of the grid-stride kernels.
const THREADS: u32 = 256;

/// The f32 elements of a contiguous operand of the op `op` (`what` names it in the error).
pub(crate) fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &str, what: &str) -> Result<CudaView<'a, f32>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<f32>()?.slice(start..end)),
        None => bail!("{op}: {what} is not contiguous"),
    }
}

/// One thread per element: enough blocks to cover `numel` once, at most 65,536 (the kernels' loops
/// stride over the rest).
pub(crate) fn grid_stride(numel: usize) -> LaunchConfig {
    let blocks = numel.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}
