//! Evaluation of image sets as the papers report it: FID, precision/recall (k = 3) and Inception
//! Score on the FID Inception-v3 (`bigroc_models::inception`), with the numbers of the standard
//! Python evaluators (pytorch-fid, torch-fidelity, OpenAI's guided-diffusion evaluator).

pub mod features;
pub mod fid;
pub mod images;
pub mod inception_score;
pub mod network;
pub mod pipeline;
pub mod precision_recall;
pub mod stats_file;
pub mod torch_archive;

pub use features::{extract_features, FeatureSet};
pub use fid::{frechet_distance, FidResult, FidStats};
pub use images::{ImageSet, Selection};
pub use inception_score::{inception_score, InceptionScore};
pub use network::{FidInception, WeightsFormat, INCEPTION_ENV};
pub use precision_recall::{precision_recall, PrecisionRecall};
