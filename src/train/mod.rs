//! Training this project's own models: robust CIFAR classifiers (robustness' adversarial training)
//! time-dependent ADM classifiers (vanilla or robust) and ADM diffusion models, with seeded data order, resumable
//! checkpoints and a metrics log.
//!
//! - [`batches`]: labelled images in memory, shuffles and augmentation.
//! - [`optim`], [`schedule`]: PyTorch's SGD/AdamW and the learning-rate schedules.
//! - [`classifier`]: `bigroc train classifier`.
//! - [`timed_classifier`], [`early_stop_pgd`]: `bigroc train timed-classifier` and the robust
//!   guidance paper's early-stopping attack on noisy images.
//! - [`diffusion`]: `bigroc train diffusion`, ADM's UNet with the hybrid loss and an EMA.
//! - [`state`]: checkpoints of a run (weights, optimizer buffers, position) and the metrics log.

pub mod batches;
pub mod classifier;
pub mod diffusion;
pub mod early_stop_pgd;
pub mod init;
pub mod optim;
pub mod schedule;
pub mod state;
pub mod timed_classifier;
