//! Training batches: a seeded shuffle per epoch and the standard CIFAR augmentation (random crop
//! with 4 pixels of zero padding, horizontal flip), on u8 images held in memory.
//!
//! Every random choice is a function of (seed, epoch, batch), so a resumed run draws exactly the
//! batches the interrupted one would have.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Labelled images, u8 RGB, `[n, h, w, 3]` row-major.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub height: usize,
    pub width: usize,
    pub classes: Vec<String>,
}

impl ImageSet {
    /// Reads labelled images into memory: an ImageFolder directory or `.tar`, or CIFAR-10 binary
    /// or python batches (see [`crate::data::LabelledImages`]).
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let set = crate::data::LabelledImages::open(path)?;
        let this = Self {
            height: set.height(),
            width: set.width(),
            pixels: set.pixels().to_vec(),
            labels: set.labels().to_vec(),
            classes: set.class_names().to_vec(),
        };
        this.validate(&path.display().to_string())?;
        Ok(this)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width * 3;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Checks sizes and labels; `what` names the data in messages.
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.is_empty() {
            bail!("{what}: no images")
        }
        if self.pixels.len() != self.len() * self.height * self.width * 3 {
            bail!("{what}: {} pixel bytes for {} images of {}x{}", self.pixels.len(), self.len(), self.width, self.height)
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l as usize >= self.classes.len()) {
            bail!("{what}: label {bad} but only {} classes", self.classes.len())
        }
        Ok(())
    }

    /// Images `indices` as f32 NCHW in [0, 1] on `device`, without augmentation, and their labels.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let mut out = Vec::with_capacity(indices.len() * self.height * self.width * 3);
        for &i in indices {
            out.extend_from_slice(self.image(i));
        }
        self.to_tensors(out, indices, device)
    }

    fn to_tensors(&self, hwc: Vec<u8>, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let (h, w) = (self.height, self.width);
        let x = Tensor::from_vec(hwc, (indices.len(), h, w, 3), &Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .to_dtype(candle_core::DType::F32)?
            .affine(1.0 / 255.0, 0.0)?
            .to_device(device)?;
        let y: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        Ok((x, Tensor::new(y, device)?))
    }
}

/// The order of an epoch: a permutation of `0..n` from (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix(seed, epoch as u64, u64::MAX)));
    order
}

/// Batch `batch` of epoch `epoch` with random crop (padding `pad`, zeros outside the image) and a
/// horizontal flip with probability 1/2, as torchvision's RandomCrop(size, padding=pad) and
/// RandomHorizontalFlip.
pub fn augmented_batch(
    data: &ImageSet,
    indices: &[usize],
    pad: usize,
    seed: u64,
    epoch: usize,
    batch: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (h, w) = (data.height, data.width);
    let mut rng = StdRng::seed_from_u64(mix(seed, epoch as u64, batch as u64));
    let mut out = vec![0u8; indices.len() * h * w * 3];
    for (k, &i) in indices.iter().enumerate() {
        let src = data.image(i);
        let dst = &mut out[k * h * w * 3..(k + 1) * h * w * 3];
        // Top-left corner of the crop in padded coordinates, then the flip.
        let top = rng.random_range(0..=2 * pad) as isize - pad as isize;
        let left = rng.random_range(0..=2 * pad) as isize - pad as isize;
        let flip = rng.random_bool(0.5);
        for r in 0..h {
            let sr = r as isize + top;
            if sr < 0 || sr >= h as isize {
                continue;
            }
            for c in 0..w {
                let c_out = if flip { w - 1 - c } else { c };
                let sc = c as isize + left;
                if sc < 0 || sc >= w as isize {
                    continue;
                }
                let s = (sr as usize * w + sc as usize) * 3;
                let d = (r * w + c_out) * 3;
                dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
            }
        }
    }
    data.to_tensors(out, indices, device)
}

/// A seed for one (seed, a, b) triple (splitmix64 of their combination).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ImageSet {
        let (n, h, w) = (3, 4, 5);
        ImageSet {
            pixels: (0..n * h * w * 3).map(|v| (v % 251) as u8).collect(),
            labels: vec![0, 1, 0],
            height: h,
            width: w,
            classes: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn orders_are_permutations_and_reproducible() {
        let a = epoch_order(100, 7, 3);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 7, 3));
        assert_ne!(a, epoch_order(100, 7, 4));
    }

    #[test]
    fn crops_are_shifted_copies_with_zero_borders() -> Result<()> {
        let data = tiny();
        let (x, y) = augmented_batch(&data, &[0, 1, 2], 2, 1, 0, 0, &Device::Cpu)?;
        assert_eq!(x.dims(), &[3, 3, 4, 5]);
        assert_eq!(y.to_vec1::<u32>()?, vec![0, 1, 0]);
        let (again, _) = augmented_batch(&data, &[0, 1, 2], 2, 1, 0, 0, &Device::Cpu)?;
        assert_eq!(x.flatten_all()?.to_vec1::<f32>()?, again.flatten_all()?.to_vec1::<f32>()?);
        // Without padding a crop is the image itself, possibly mirrored.
        let (plain, _) = data.batch(&[1], &Device::Cpu)?;
        let (aug, _) = augmented_batch(&data, &[1], 0, 5, 0, 0, &Device::Cpu)?;
        let same = plain.flatten_all()?.to_vec1::<f32>()? == aug.flatten_all()?.to_vec1::<f32>()?;
        let mirrored = plain.flip(&[3])?.flatten_all()?.to_vec1::<f32>()? == aug.flatten_all()?.to_vec1::<f32>()?;
        assert!(same || mirrored);
        // Every pixel of a padded crop is either 0 or a value present in the source image.
        let src: std::collections::HashSet<u32> =
            plain.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| (v * 255.0).round() as u32).collect();
        let (aug, _) = augmented_batch(&data, &[1], 2, 9, 1, 3, &Device::Cpu)?;
        for v in aug.flatten_all()?.to_vec1::<f32>()? {
            let v = (v * 255.0).round() as u32;
            assert!(v == 0 || src.contains(&v));
        }
        Ok(())
    }
}
