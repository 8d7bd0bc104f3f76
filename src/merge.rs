//! Joining the .npz outputs of `--shard K/N` runs back into input order.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::data::npz;

/// Merges shard files (each with `arr_0`, `arr_1` and `index`) into one sample .npz ordered by
/// `index`; duplicate or missing indices are errors naming the files.
pub fn merge_shards(shards: &[PathBuf], output: &Path) -> Result<usize> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut owner: Vec<(i64, usize)> = Vec::new(); // (global index, shard number)
    for (s, path) in shards.iter().enumerate() {
        let mut arrays = npz::read_all(path)?;
        let index = arrays
            .remove("index")
            .with_context(|| format!("{}: no `index` array; was it written with --shard?", path.display()))?;
        let img = arrays.remove("arr_0").with_context(|| format!("{}: no `arr_0`", path.display()))?;
        let lab = arrays.remove("arr_1").with_context(|| format!("{}: no `arr_1`", path.display()))?;
        owner.extend(index.to_dtype(DType::I64)?.to_vec1::<i64>()?.into_iter().map(|i| (i, s)));
        images.push(img);
        labels.push(lab.to_dtype(DType::I64)?);
    }
    let images = Tensor::cat(&images, 0)?;
    let labels = Tensor::cat(&labels, 0)?;
    let mut order: Vec<usize> = (0..owner.len()).collect();
    order.sort_by_key(|&i| owner[i].0);
    for w in order.windows(2) {
        let (a, b) = (owner[w[0]], owner[w[1]]);
        if a.0 == b.0 {
            bail!("image {} appears in both {} and {}", a.0, shards[a.1].display(), shards[b.1].display());
        }
    }
    let first = owner[order[0]].0;
    let last = owner[order[order.len() - 1]].0;
    if first != 0 || last as usize != order.len() - 1 {
        bail!(
            "the shards cover {} images with indices {first}..={last}; some shards are missing",
            order.len()
        );
    }
    let order = Tensor::new(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), images.device())?;
    let images = images.index_select(&order, 0)?;
    let labels = labels.index_select(&order, 0)?;
    npz::write(output, &[("arr_0", &images), ("arr_1", &labels)])?;
    Ok(order.dim(0)?)
}
