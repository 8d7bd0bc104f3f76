//! Reading image sets (folders, sample .npz files) into batches, labelled training sets
//! ([`labelled::LabelledImages`]: ImageFolder folders and tars, CIFAR-10 batches), and pixel
//! conversions.

pub mod cifar;
pub mod folder;
pub mod labelled;
pub mod npz;
pub mod pickle;
pub mod tar;

pub use labelled::LabelledImages;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// An input set of images, read lazily from a folder or held from an .npz.
pub enum ImageSource {
    Folder { root: PathBuf, files: Vec<PathBuf>, sizes: Vec<(u32, u32)> },
    Npz { path: PathBuf, images: Tensor, labels: Option<Vec<i64>> },
}

impl ImageSource {
    /// Opens a folder (recursively) or a sample `.npz`. Image headers are read up front so corrupt
    /// files and mixed sizes are reported before any work starts.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("input {} does not exist", path.display());
        }
        if path.is_dir() {
            let files = folder::list_images(path)?;
            let sizes = files.iter().map(|f| folder::dimensions(&path.join(f))).collect::<Result<Vec<_>>>()?;
            // Two inputs must not map to the same output name (`a.jpg` and `a.png` both -> `a.png`).
            let mut seen: HashMap<PathBuf, &PathBuf> = HashMap::new();
            for f in &files {
                if let Some(other) = seen.insert(f.with_extension("png"), f) {
                    bail!("{} and {} would both be written as {}", other.display(), f.display(), f.with_extension("png").display());
                }
            }
            Ok(Self::Folder { root: path.to_path_buf(), files, sizes })
        } else if is_npz(path) {
            let set = npz::read_samples(path)?;
            if set.images.dim(0)? == 0 {
                bail!("{} holds no images", path.display());
            }
            Ok(Self::Npz { path: path.to_path_buf(), images: set.images, labels: set.labels })
        } else {
            bail!("input {} is neither a folder nor an .npz file", path.display());
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Folder { files, .. } => files.len(),
            Self::Npz { images, .. } => images.dim(0).unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the images come from, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Folder { root, .. } => root.display().to_string(),
            Self::Npz { path, .. } => path.display().to_string(),
        }
    }

    /// The common (height, width) of all images; an error naming two files of different sizes.
    pub fn uniform_size(&self) -> Result<(usize, usize)> {
        match self {
            Self::Npz { images, .. } => Ok((images.dim(1)?, images.dim(2)?)),
            Self::Folder { files, sizes, root } => {
                let (w, h) = sizes[0];
                if let Some(i) = sizes.iter().position(|&s| s != (w, h)) {
                    bail!(
                        "images in {} have different sizes: {} is {w}x{h}, {} is {}x{} (pass --resize to scale them)",
                        root.display(),
                        files[0].display(),
                        files[i].display(),
                        sizes[i].0,
                        sizes[i].1
                    );
                }
                Ok((h as usize, w as usize))
            }
        }
    }

    /// Labels stored with the images: an .npz's `arr_1`, or class folder names for a folder
    /// (returned as names; matching them to class indices is the caller's business).
    pub fn stored_labels(&self) -> StoredLabels {
        match self {
            Self::Npz { labels: Some(l), .. } => StoredLabels::Indices(l.clone()),
            Self::Npz { labels: None, .. } => StoredLabels::None,
            Self::Folder { files, .. } => {
                let names: Option<Vec<String>> = files.iter().map(|f| folder::class_folder(f)).collect();
                names.map(StoredLabels::Names).unwrap_or(StoredLabels::None)
            }
        }
    }

    /// The output path of image `i` relative to an output folder: the input's relative path as PNG
    /// for folders, `NNNNNN.png` for .npz inputs.
    pub fn output_relpath(&self, i: usize) -> PathBuf {
        match self {
            Self::Folder { files, .. } => files[i].with_extension("png"),
            Self::Npz { .. } => PathBuf::from(format!("{i:06}.png")),
        }
    }

    /// Images `indices` as f32 NCHW in [0, 1] on `device`, optionally resized to (height, width).
    pub fn load_batch(&self, indices: &[usize], resize: Option<(usize, usize)>, device: &Device) -> Result<Tensor> {
        let images: Vec<RgbImage> = match self {
            Self::Folder { root, files, .. } => {
                indices.iter().map(|&i| folder::load_rgb(&root.join(&files[i]))).collect::<Result<_>>()?
            }
            Self::Npz { images, .. } => {
                indices.iter().map(|&i| tensor_to_rgb(&images.get(i)?)).collect::<Result<_>>()?
            }
        };
        let images: Vec<RgbImage> = match resize {
            None => images,
            Some((h, w)) => images
                .into_iter()
                .map(|im| {
                    if im.dimensions() == (w as u32, h as u32) {
                        im
                    } else {
                        image::imageops::resize(&im, w as u32, h as u32, image::imageops::FilterType::CatmullRom)
                    }
                })
                .collect(),
        };
        let first = images[0].dimensions();
        if let Some(i) = images.iter().position(|im| im.dimensions() != first) {
            bail!(
                "images of different sizes in one batch ({} and {}); pass --resize",
                self.output_relpath(indices[0]).display(),
                self.output_relpath(indices[i]).display()
            );
        }
        rgb_to_tensor(&images, device)
    }
}

/// Labels found next to the images.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredLabels {
    None,
    Indices(Vec<i64>),
    Names(Vec<String>),
}

fn is_npz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

/// RGB images of one size as f32 NCHW in [0, 1].
pub fn rgb_to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let (w, h) = images[0].dimensions();
    let mut data = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for im in images {
        data.extend_from_slice(im.as_raw());
    }
    let t = Tensor::from_vec(data, (images.len(), h as usize, w as usize, 3), &Device::Cpu)?;
    Ok((t.permute((0, 3, 1, 2))?.to_dtype(DType::F32)? / 255.0)?.to_device(device)?)
}

/// Pixels in [0, 1] (NCHW, any float dtype) to uint8 NHWC, rounding to the nearest level.
pub fn to_u8_nhwc(x: &Tensor) -> Result<Tensor> {
    let scaled = (x.to_dtype(DType::F32)? * 255.0)?.round()?.clamp(0f32, 255f32)?;
    Ok(scaled.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(DType::U8)?)
}

/// One uint8 HWC tensor (3 channels) as an image.
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let (h, w, c) = t.dims3()?;
    if c != 3 {
        bail!("expected 3 channels, found {c}");
    }
    let data = t.to_device(&Device::Cpu)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    RgbImage::from_raw(w as u32, h as u32, data).context("image buffer of the wrong size")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v])).save(path).unwrap();
    }

    #[test]
    fn folder_batches_labels_and_round_trip() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_png(&dir.path().join("cat/b.png"), 4, 3, 10);
        write_png(&dir.path().join("dog/a.png"), 4, 3, 200);
        let src = ImageSource::open(dir.path())?;
        assert_eq!(src.len(), 2);
        assert_eq!(src.uniform_size()?, (3, 4));
        assert_eq!(src.stored_labels(), StoredLabels::Names(vec!["cat".into(), "dog".into()]));
        let x = src.load_batch(&[0, 1], None, &Device::Cpu)?;
        assert_eq!(x.dims(), &[2, 3, 3, 4]);
        let back = to_u8_nhwc(&x)?;
        assert_eq!(back.get(1)?.get(0)?.get(0)?.to_vec1::<u8>()?, vec![200, 100, 55]);
        Ok(())
    }

    #[test]
    fn bad_folders_are_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let err = ImageSource::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("holds no images"), "{err}");
        write_png(&dir.path().join("a.png"), 4, 4, 1);
        write_png(&dir.path().join("b.png"), 8, 8, 1);
        let err = ImageSource::open(dir.path())?.uniform_size().unwrap_err().to_string();
        assert!(err.contains("a.png is 4x4") && err.contains("b.png is 8x8"), "{err}");
        std::fs::write(dir.path().join("c.jpg"), b"not a jpeg")?;
        let err = ImageSource::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("c.jpg"), "{err}");
        Ok(())
    }

    #[test]
    fn rounding_is_to_nearest() -> Result<()> {
        let x = Tensor::new(&[0.5f32 / 255.0 + 1e-4, 1.49 / 255.0, 1.2, -0.1], &Device::Cpu)?.reshape((1, 1, 2, 2))?;
        let x = x.repeat((1, 3, 1, 1))?;
        let levels: Vec<u8> = to_u8_nhwc(&x)?.flatten_all()?.to_vec1::<u8>()?.into_iter().step_by(3).collect();
        assert_eq!(levels, vec![1, 1, 255, 0]);
        Ok(())
    }
}
