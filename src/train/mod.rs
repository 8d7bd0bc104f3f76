//! Training this project's own models: robust CIFAR classifiers (robustness' adversarial training),
//! with seeded data order, resumable checkpoints and a metrics log.
//!
//! - [`batches`]: labelled images in memory, shuffles and augmentation.
//! - [`optim`], [`schedule`]: PyTorch's SGD/AdamW and the learning-rate schedules.
//! - [`classifier`]: `bigroc train classifier`.
//! - [`state`]: checkpoints of a run (weights, optimizer buffers, position) and the metrics log.

pub mod batches;
pub mod classifier;
pub mod init;
pub mod optim;
pub mod schedule;
pub mod state;
