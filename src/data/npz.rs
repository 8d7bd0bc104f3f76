//! `.npz` archives, including the sample format OpenAI publishes (`arr_0` uint8 NHWC images,
//! optional `arr_1` integer labels) that generators' sample sets and evaluators use.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::output::atomic_write;

/// Every array in an .npz (plain or compressed), by name.
pub fn read_all(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        bail!("{} does not exist", path.display());
    }
    let arrays = Tensor::read_npz(path).with_context(|| format!("{}: not a readable .npz file", path.display()))?;
    Ok(arrays.into_iter().collect())
}

/// Writes arrays as an uncompressed .npz, atomically.
pub fn write(path: &Path, arrays: &[(&str, &Tensor)]) -> Result<()> {
    atomic_write(path, |tmp| {
        // numpy's loader wants the `.npz`-less names; candle appends `.npy` itself.
        Tensor::write_npz(arrays, tmp)?;
        Ok(())
    })
}

/// A set of images in OpenAI's sample format.
pub struct SampleSet {
    /// uint8 NHWC with 3 channels (grayscale is repeated, alpha dropped).
    pub images: Tensor,
    pub labels: Option<Vec<i64>>,
}

/// Reads `arr_0` (and `arr_1` when present) of a sample .npz.
pub fn read_samples(path: &Path) -> Result<SampleSet> {
    let mut arrays = read_all(path)?;
    let images = arrays
        .remove("arr_0")
        .with_context(|| format!("{}: no `arr_0` array (expected uint8 images, NHWC)", path.display()))?;
    if images.dtype() != DType::U8 || images.rank() != 4 {
        bail!(
            "{}: `arr_0` is {:?} with shape {:?}; expected uint8 images shaped (N, H, W, C)",
            path.display(),
            images.dtype(),
            images.dims()
        );
    }
    let images = match images.dim(3)? {
        3 => images,
        1 => images.repeat((1, 1, 1, 3))?,
        4 => images.narrow(3, 0, 3)?,
        c => bail!("{}: `arr_0` has {c} channels; expected 1, 3 or 4", path.display()),
    };
    let labels = match arrays.remove("arr_1") {
        None => None,
        Some(l) => {
            let n = images.dim(0)?;
            if l.dims() != [n] {
                bail!("{}: `arr_1` has shape {:?}; expected one label per image ({n})", path.display(), l.dims());
            }
            if l.dtype().is_float() {
                bail!("{}: `arr_1` holds {:?} values; expected integer labels", path.display(), l.dtype());
            }
            Some(l.to_dtype(DType::I64)?.to_vec1::<i64>()?)
        }
    };
    Ok(SampleSet { images, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sample_sets_round_trip_and_bad_ones_are_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.npz");
        let images = Tensor::zeros((2, 4, 4, 1), DType::U8, &Device::Cpu)?;
        let labels = Tensor::new(&[3i32, 7], &Device::Cpu)?;
        write(&path, &[("arr_0", &images), ("arr_1", &labels)])?;
        let set = read_samples(&path)?;
        assert_eq!(set.images.dims(), &[2, 4, 4, 3]);
        assert_eq!(set.labels, Some(vec![3, 7]));

        let bad = dir.path().join("bad.npz");
        write(&bad, &[("arr_0", &Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?)])?;
        let err = read_samples(&bad).err().unwrap().to_string();
        assert!(err.contains("bad.npz") && err.contains("arr_0"), "{err}");
        Ok(())
    }
}
