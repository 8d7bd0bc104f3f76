//! bigroc: image synthesis driven by adversarially robust classifiers, on candle.
//!
//! - [`refine`]: BIGRoC (Ganz & Elad): post-hoc refinement of generated images by targeted PGD on a
//!   robust classifier.
//! - [`classifier`], [`convert`], [`weights`]: robust ResNets from self-describing safetensors,
//!   imported from the published PyTorch checkpoints.
//! - [`data`], [`output`], [`grid`]: reading image sets, writing results atomically and resumably,
//!   and grids to look at.
//!
//! - [`diffusion`], [`adm`]: OpenAI's guided-diffusion sampler (schedules, respacing, guided
//!   p_sample and DDIM) and the ADM model configurations.
//!
//! - [`eval`]: FID, precision/recall and Inception Score on the FID Inception-v3, with the numbers
//!   of pytorch-fid / torch-fidelity / OpenAI's evaluator.
//!
//! - [`train`], [`accuracy`]: training this project's models (robust ResNets as robustness trains
//!   them, time-dependent ADM classifiers with the robust-guidance paper's attack, ADM diffusion
//!   UNets with the hybrid loss) and clean/adversarial accuracy.
//!
//! The native architectures live in the `bigroc-models` crate.

pub mod accuracy;
pub mod adm;
pub mod calibrate;
pub mod classifier;
pub mod convert;
pub mod data;
pub mod defaults;
pub mod device;
pub mod diffusion;
pub mod eval;
pub mod grid;
pub mod merge;
pub mod output;
pub mod progress;
pub mod refine;
pub mod shard;
pub mod train;
pub mod weights;

#[cfg(feature = "mimalloc")]
mod alloc;
