//! Inception features of whole image sets, in batches, with a progress callback.

use anyhow::{ensure, Result};
use bigroc_models::inception::FEATURE_DIM;
use candle_core::{Device, Tensor};

use super::fid::FidStats;
use super::images::{ImageSet, Selection};
use super::network::FidInception;

/// Pool features (and logits when available) of an image set, row-major.
#[derive(Clone, Debug, Default)]
pub struct FeatureSet {
    /// `count x 2048` pool features.
    pub pool: Vec<f32>,
    /// `count x classes` logits, when the network has a classifier.
    pub logits: Option<Vec<f32>>,
    pub classes: usize,
    pub count: usize,
    /// Squared k-NN radii of the pool features (k = `precision_recall::DEFAULT_K`), when a stats
    /// file cached them: precision against a 50,000-image reference needs them, and computing
    /// them is a 50,000 x 50,000 distance matrix, the same for every set of samples.
    pub knn_sq_radii: Option<Vec<f32>>,
}

impl FeatureSet {
    /// Appends one batch of network outputs.
    pub fn push(&mut self, pool: &Tensor, logits: Option<&Tensor>) -> Result<()> {
        let (n, d) = pool.dims2()?;
        ensure!(
            d == FEATURE_DIM,
            "pool features are {d}-d, expected {FEATURE_DIM}"
        );
        self.pool.extend(pool.flatten_all()?.to_vec1::<f32>()?);
        if let Some(l) = logits {
            self.classes = l.dim(1)?;
            self.logits
                .get_or_insert_with(Vec::new)
                .extend(l.flatten_all()?.to_vec1::<f32>()?);
        }
        self.count += n;
        self.knn_sq_radii = None;
        Ok(())
    }

    /// The pool features as a `(count, 2048)` tensor.
    pub fn pool_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.pool,
            (self.count, FEATURE_DIM),
            device,
        )?)
    }

    /// Mean and covariance for FID.
    pub fn stats(&self) -> Result<FidStats> {
        FidStats::from_features(&self.pool, FEATURE_DIM)
    }
}

/// Runs the network over the images of `set` that `selection` picks, in batches of `batch`;
/// `progress` is called with the number of images done after each batch.
pub fn extract_features(
    net: &FidInception,
    set: &ImageSet,
    selection: Selection,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<FeatureSet> {
    let mut out = FeatureSet::default();
    set.for_each_batch(batch, selection, &net.device, |images| {
        let f = net.forward_images(&images)?;
        out.push(&f.pool, f.logits.as_ref())?;
        progress(out.count);
        Ok(())
    })?;
    Ok(out)
}

impl FeatureSet {
    /// The rows `selection` picks (for subsets of cached features).
    pub fn select(&self, selection: super::images::Selection) -> FeatureSet {
        let idx = selection.indices(self.count);
        let pick = |v: &[f32], w: usize| {
            idx.iter()
                .flat_map(|&i| v[i * w..(i + 1) * w].iter().copied())
                .collect()
        };
        FeatureSet {
            pool: pick(&self.pool, FEATURE_DIM),
            logits: self.logits.as_ref().map(|l| pick(l, self.classes)),
            classes: self.classes,
            count: idx.len(),
            // A subset has other neighbours.
            knn_sq_radii: None,
        }
    }
}
