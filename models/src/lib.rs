//! Native candle implementations of the architectures bigroc uses and the ops candle lacks.
//! Pure functions of tensors: models are built from a `candle_nn::VarBuilder`; no file I/O here.

pub mod adm;
pub mod channel_affine;
pub mod conv;
pub mod conv_bn;
pub mod group_norm;
#[cfg(feature = "cuda")]
mod group_norm_cuda;
pub mod inception;
pub mod ops;
mod conv3x3;
mod direct_conv;
mod winograd;
mod winograd4;
mod matmul;
mod parallel;
mod vector;
pub mod resnet;
pub mod softmax;
mod train_ops;

/// Whether the crate's own CUDA kernels (`src/cuda/*.cu`: the fused group norm, the channel affine
/// epilogue) run where they apply. `BIGROC_CUDA_KERNELS=off` makes those ops compose candle's
/// kernels instead: the same arithmetic, for timing one against the other in one build, or to go
/// on with a lease if `examples/cuda_kernels_check` fails on a new GPU. Read once.
pub fn own_cuda_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("BIGROC_CUDA_KERNELS").as_deref(), Ok("off" | "0" | "false")))
}
