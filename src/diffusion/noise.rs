//! Reproducible Gaussian noise per image: image `i` of a run with seed `s` draws its x_T and every
//! step's noise from its own random stream, so an image does not depend on the batch size, the
//! shard it falls in, or whether the run was interrupted and resumed.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// splitmix64: decorrelates nearby (seed, index) pairs before seeding the streams.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One noise stream per image of a batch.
pub struct ImageNoise {
    streams: Vec<StdRng>,
    /// (C, H, W) of one draw.
    shape: (usize, usize, usize),
}

impl ImageNoise {
    /// Streams for the images with the given (whole-run) indices.
    pub fn new(seed: u64, images: &[usize], shape: (usize, usize, usize)) -> Self {
        let streams = images
            .iter()
            .map(|&i| StdRng::seed_from_u64(mix(seed ^ mix(i as u64))))
            .collect();
        Self { streams, shape }
    }

    /// The next standard normal draw of every stream, as an (N, C, H, W) f32 tensor.
    pub fn draw(&mut self, device: &Device) -> Result<Tensor> {
        let (c, h, w) = self.shape;
        let per = c * h * w;
        let mut data = Vec::with_capacity(per * self.streams.len());
        for rng in &mut self.streams {
            data.extend((0..per).map(|_| rng.sample::<f32, _>(StandardNormal)));
        }
        Ok(Tensor::from_vec(data, (self.streams.len(), c, h, w), &Device::Cpu)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_draws_the_same_noise_in_any_batch() -> Result<()> {
        let mut pair = ImageNoise::new(7, &[3, 4], (1, 2, 2));
        let mut single = ImageNoise::new(7, &[4], (1, 2, 2));
        for _ in 0..3 {
            let a = pair.draw(&Device::Cpu)?.get(1)?;
            let b = single.draw(&Device::Cpu)?.get(0)?;
            assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        }
        let other = ImageNoise::new(8, &[4], (1, 2, 2)).draw(&Device::Cpu)?;
        let again = ImageNoise::new(7, &[4], (1, 2, 2)).draw(&Device::Cpu)?;
        assert_ne!(other.flatten_all()?.to_vec1::<f32>()?, again.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
