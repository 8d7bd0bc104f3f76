//! Native candle implementations of the architectures bigroc uses and the ops candle lacks.
//! Pure functions of tensors: models are built from a `candle_nn::VarBuilder`; no file I/O here.

pub mod adm;
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
