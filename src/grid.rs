//! Image grids people can look at: rows of before | after | difference (BIGRoC's Figure 5 view),
//! or plain tiles of samples.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use image::RgbImage;

use crate::output::atomic_write;

const GAP: u32 = 2;

/// Saves a grid where row `i` shows `columns[0][i] | columns[1][i] | ...`. Each column is f32 NCHW
/// in [0, 1] with the same shape.
pub fn save_columns(path: &Path, columns: &[Tensor]) -> Result<()> {
    let (n, _, h, w) = columns[0].dims4()?;
    let tiles: Vec<Vec<RgbImage>> = columns.iter().map(to_images).collect::<Result<_>>()?;
    let mut canvas = RgbImage::from_pixel(
        columns.len() as u32 * (w as u32 + GAP) - GAP,
        n as u32 * (h as u32 + GAP) - GAP,
        image::Rgb([255, 255, 255]),
    );
    for (c, col) in tiles.iter().enumerate() {
        for (r, tile) in col.iter().enumerate() {
            image::imageops::replace(&mut canvas, tile, (c as u32 * (w as u32 + GAP)) as i64, (r as u32 * (h as u32 + GAP)) as i64);
        }
    }
    save_png(path, &canvas)
}

/// Saves `images` (f32 NCHW in [0, 1]) as tiles, `per_row` to a row.
pub fn save_tiles(path: &Path, images: &Tensor, per_row: usize) -> Result<()> {
    let (n, _, h, w) = images.dims4()?;
    if n == 0 || per_row == 0 {
        bail!("nothing to put in the grid {}", path.display());
    }
    let rows = n.div_ceil(per_row) as u32;
    let cols = per_row.min(n) as u32;
    let (w, h) = (w as u32, h as u32);
    let mut canvas = RgbImage::from_pixel(cols * (w + GAP) - GAP, rows * (h + GAP) - GAP, image::Rgb([255, 255, 255]));
    for (i, tile) in to_images(images)?.iter().enumerate() {
        let (r, c) = (i as u32 / cols, i as u32 % cols);
        image::imageops::replace(&mut canvas, tile, (c * (w + GAP)) as i64, (r * (h + GAP)) as i64);
    }
    save_png(path, &canvas)
}

/// `after - before`, contrast-stretched per image so its largest absolute change maps to full
/// range around mid-gray: the small PGD changes become visible.
pub fn stretched_difference(before: &Tensor, after: &Tensor) -> Result<Tensor> {
    let diff = (after.to_dtype(DType::F32)? - before.to_dtype(DType::F32)?)?;
    let n = diff.dim(0)?;
    let peak = diff.abs()?.reshape((n, ()))?.max(D::Minus1)?.clamp(1e-8f32, f32::MAX)?;
    let scaled = diff.broadcast_div(&peak.reshape((n, 1, 1, 1))?)?;
    Ok(((scaled * 0.5)? + 0.5)?)
}

fn to_images(x: &Tensor) -> Result<Vec<RgbImage>> {
    let u8s = crate::data::to_u8_nhwc(x)?;
    (0..u8s.dim(0)?).map(|i| crate::data::tensor_to_rgb(&u8s.get(i)?)).collect()
}

fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    atomic_write(path, |tmp| Ok(img.save_with_format(tmp, image::ImageFormat::Png)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn difference_is_stretched_around_gray() -> Result<()> {
        let before = Tensor::full(0.5f32, (1, 3, 2, 2), &Device::Cpu)?;
        let after = (before.clone() + Tensor::new(&[0.01f32, -0.02, 0.0, 0.0], &Device::Cpu)?.reshape((1, 1, 2, 2))?.repeat((1, 3, 1, 1))?)?;
        let d = stretched_difference(&before, &after)?.flatten_all()?.to_vec1::<f32>()?;
        assert!((d[0] - 0.75).abs() < 1e-5 && d[1].abs() < 1e-5 && (d[2] - 0.5).abs() < 1e-6, "{d:?}");
        let dir = tempfile::tempdir()?;
        save_columns(&dir.path().join("g.png"), &[before.clone(), after, stretched_difference(&before, &before)?])?;
        let g = image::open(dir.path().join("g.png"))?;
        assert_eq!((g.width(), g.height()), (3 * 2 + 2 * GAP, 2));
        Ok(())
    }
}
