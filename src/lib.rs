//! bigroc: image synthesis driven by adversarially robust classifiers, on candle.
//!
//! - [`refine`]: BIGRoC (Ganz & Elad): post-hoc refinement of generated images by targeted PGD on a
//!   robust classifier.
//! - [`classifier`], [`convert`], [`weights`]: robust ResNets from self-describing safetensors,
//!   imported from the published PyTorch checkpoints.
//! - [`data`], [`output`], [`grid`]: reading image sets, writing results atomically and resumably,
//!   and grids to look at.
//!
//! The native architectures live in the `bigroc-models` crate.

pub mod calibrate;
pub mod classifier;
pub mod convert;
pub mod data;
pub mod defaults;
pub mod device;
pub mod grid;
pub mod merge;
pub mod output;
pub mod progress;
pub mod refine;
pub mod shard;
pub mod weights;

