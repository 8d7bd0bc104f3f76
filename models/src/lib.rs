//! Native candle implementations of the architectures bigroc uses and the ops candle lacks.
//! Pure functions of tensors: models are built from a `candle_nn::VarBuilder`; no file I/O here.

pub mod adm;
pub mod channel_affine;
pub mod conv;
pub mod conv_bn;
#[cfg(feature = "cuda")]
mod cuda_launch;
pub mod group_norm;
mod im2col;
#[cfg(feature = "cuda")]
mod group_norm_cuda;
pub mod inception;
pub mod ops;
pub mod optimizer_step;
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

/// Whether the crate's own CUDA kernels of one kind (`"group-norm"`, `"channel-affine"`, `"conv"`,
/// `"optimizer"`: `src/cuda/*.cu`; `"softmax"`: candle-nn's forward kernel with this crate's backward) run where
/// they apply. `BIGROC_CUDA_KERNELS=off` makes all of those ops use
/// candle's kernels instead, `BIGROC_CUDA_KERNELS=no-conv` (a comma-separated list of `no-KIND`)
/// only the kinds named: the same arithmetic, for timing one against the other in one build, or to
/// go on with a lease if `examples/cuda_kernels_check` fails on a new GPU. Read once.
pub fn own_cuda_kernel(kind: &str) -> bool {
    static SETTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let setting = SETTING.get_or_init(|| std::env::var("BIGROC_CUDA_KERNELS").unwrap_or_default());
    if matches!(setting.as_str(), "off" | "0" | "false") {
        return false;
    }
    !setting.split(',').any(|item| item.trim().strip_prefix("no-") == Some(kind))
}
