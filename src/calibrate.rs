//! Mean classifier logits over a generated set: the statistic behind BIGRoC's debiasing vector.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::classifier::Classifier;
use crate::data::ImageSource;

/// Mean logit of every class over all images of `source`.
pub fn mean_logits(
    classifier: &Classifier,
    source: &ImageSource,
    batch_size: usize,
    resize: Option<(usize, usize)>,
    device: &Device,
) -> Result<Tensor> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (h, w) = match resize {
        Some(s) => s,
        None => source.uniform_size()?,
    };
    classifier.check_input_size(h, w)?;
    let items: Vec<usize> = (0..source.len()).collect();
    let bar = crate::progress::images(items.len(), 0, "calibrate");
    let mut sum = Tensor::zeros(classifier.num_classes(), DType::F64, device)?;
    for batch in items.chunks(batch_size) {
        let logits = classifier.logits(&source.load_batch(batch, resize, device)?)?;
        sum = (sum + logits.to_dtype(DType::F64)?.sum(0)?)?;
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok((sum / items.len() as f64)?.to_dtype(DType::F32)?)
}
