//! Image sets to evaluate: folders (recursive), OpenAI-format sample `.npz` files (`arr_0`, uint8
//! NHWC) and tar archives of an image folder (e.g. CIFAR-10 `train/<class>/NNNN.jpg`), streamed
//! in batches of same-size uint8 images.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::tar as tar_archive;

const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];

fn is_image_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Where images come from.
pub enum ImageSet {
    /// Image files under a folder, sorted by relative path.
    Folder { root: PathBuf, files: Vec<PathBuf> },
    /// `arr_0` of an .npz, uint8 `(N, H, W, 3)`.
    Npz { path: PathBuf, images: Tensor },
    /// Image members of a tar archive, in archive order.
    Tar { path: PathBuf, count: usize },
}

/// Which images of a set to use, like a Python slice `start:end:step` over the set's order
/// (e.g. `0::2` and `1::2` are two disjoint, class-balanced halves of an ImageFolder tar).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub start: usize,
    pub end: Option<usize>,
    pub step: usize,
}

impl Default for Selection {
    fn default() -> Self {
        Selection {
            start: 0,
            end: None,
            step: 1,
        }
    }
}

impl std::str::FromStr for Selection {
    type Err = String;
    /// Parses `START:END[:STEP]` with empty parts meaning the defaults (`:1000`, `1::2`).
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| -> Result<Option<usize>, String> {
            if p.trim().is_empty() {
                Ok(None)
            } else {
                p.trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("`{s}`: expected START:END[:STEP]"))
            }
        };
        if parts.len() < 2 || parts.len() > 3 {
            return Err(format!(
                "`{s}`: expected START:END[:STEP] (e.g. 0:5000 or 1::2)"
            ));
        }
        let step = if parts.len() == 3 {
            num(parts[2])?.unwrap_or(1)
        } else {
            1
        };
        if step == 0 {
            return Err(format!("`{s}`: step must be at least 1"));
        }
        Ok(Selection {
            start: num(parts[0])?.unwrap_or(0),
            end: num(parts[1])?,
            step,
        })
    }
}

impl Selection {
    pub fn contains(&self, i: usize) -> bool {
        i >= self.start && self.end.is_none_or(|e| i < e) && (i - self.start) % self.step == 0
    }

    /// The selected indices of a set of `n` images.
    pub fn indices(&self, n: usize) -> Vec<usize> {
        let end = self.end.map_or(n, |e| e.min(n));
        (self.start..end).step_by(self.step).collect()
    }
}

/// One decoded image, RGB uint8, row-major HWC.
pub struct Rgb8 {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

/// Decodes an image file's bytes to RGB (alpha dropped, grayscale expanded), like PIL's
/// `convert("RGB")`.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<Rgb8> {
    let rgb = crate::data::folder::decode_rgb(bytes, name)?;
    Ok(Rgb8 {
        height: rgb.height() as usize,
        width: rgb.width() as usize,
        data: rgb.into_raw(),
    })
}

impl ImageSet {
    /// Opens a folder, a `.npz` sample file or a `.tar` archive.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{} does not exist", path.display());
        }
        if path.is_dir() {
            let mut files = vec![];
            for entry in walkdir::WalkDir::new(path).follow_links(true) {
                let entry = entry.with_context(|| format!("listing {}", path.display()))?;
                if entry.file_type().is_file()
                    && is_image_name(&entry.file_name().to_string_lossy())
                {
                    files.push(entry.path().strip_prefix(path)?.to_path_buf());
                }
            }
            files.sort();
            if files.is_empty() {
                bail!(
                    "{}: no image files ({})",
                    path.display(),
                    IMAGE_EXTS.join(", ")
                );
            }
            return Ok(ImageSet::Folder {
                root: path.to_path_buf(),
                files,
            });
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "npz" => {
                let images = Tensor::read_npz_by_name(path, &["arr_0"])
                    .with_context(|| format!("{}: no readable `arr_0` array", path.display()))?
                    .remove(0);
                if images.dtype() != DType::U8 || images.rank() != 4 || images.dim(3)? != 3 {
                    bail!(
                        "{}: `arr_0` is {:?} {:?}; expected uint8 images (N, H, W, 3)",
                        path.display(),
                        images.dtype(),
                        images.dims()
                    );
                }
                Ok(ImageSet::Npz {
                    path: path.to_path_buf(),
                    images,
                })
            }
            "tar" => {
                let mut count = 0;
                tar_archive::for_each_file(path, |name, _| {
                    count += is_image_name(name) as usize;
                    Ok(ControlFlow::Continue(()))
                })?;
                if count == 0 {
                    bail!("{}: no image files in the archive", path.display());
                }
                Ok(ImageSet::Tar {
                    path: path.to_path_buf(),
                    count,
                })
            }
            _ => bail!(
                "{}: expected an image folder, a .npz sample file or a .tar archive",
                path.display()
            ),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ImageSet::Folder { files, .. } => files.len(),
            ImageSet::Npz { images, .. } => images.dim(0).unwrap_or(0),
            ImageSet::Tar { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn describe(&self) -> String {
        match self {
            ImageSet::Folder { root, .. } => root.display().to_string(),
            ImageSet::Npz { path, .. } | ImageSet::Tar { path, .. } => path.display().to_string(),
        }
    }

    /// Calls `f` with batches of at most `batch` same-size images as uint8 `(B, 3, H, W)` tensors
    /// on `device`, in the set's order (a batch ends early where the image size changes), for the
    /// images `selection` picks.
    pub fn for_each_batch(
        &self,
        batch: usize,
        selection: Selection,
        device: &Device,
        mut f: impl FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut pending: Vec<Rgb8> = vec![];
        let mut flush = |pending: &mut Vec<Rgb8>| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let (h, w) = (pending[0].height, pending[0].width);
            let data: Vec<u8> = pending.drain(..).flat_map(|im| im.data).collect();
            let n = data.len() / (h * w * 3);
            let t = Tensor::from_vec(data, (n, h, w, 3), &Device::Cpu)?.permute((0, 3, 1, 2))?;
            f(t.to_device(device)?)
        };
        let mut push = |im: Rgb8, pending: &mut Vec<Rgb8>| -> Result<()> {
            if let Some(first) = pending.first() {
                if (first.height, first.width) != (im.height, im.width) || pending.len() == batch {
                    flush(pending)?;
                }
            }
            pending.push(im);
            Ok(())
        };
        match self {
            ImageSet::Folder { root, files } => {
                for i in selection.indices(files.len()) {
                    let p = root.join(&files[i]);
                    let bytes =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    push(decode_rgb(&bytes, &p.display().to_string())?, &mut pending)?;
                }
            }
            ImageSet::Npz { images, .. } => {
                // Already a uniform uint8 array: slice batches directly.
                let indices = selection.indices(images.dim(0)?);
                for chunk in indices.chunks(batch) {
                    let t = if selection.step == 1 {
                        images.narrow(0, chunk[0], chunk.len())?
                    } else {
                        let ids: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
                        images.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?
                    };
                    f(t.permute((0, 3, 1, 2))?.to_device(device)?)?;
                }
                return Ok(());
            }
            ImageSet::Tar { path, .. } => {
                let mut index = 0;
                tar_archive::for_each_file(path, |name, contents| {
                    if !is_image_name(name) {
                        return Ok(ControlFlow::Continue(()));
                    }
                    if selection.contains(index) {
                        let bytes = tar_archive::read_member(path, name, contents)?;
                        push(
                            decode_rgb(&bytes, &format!("{}:{name}", path.display()))?,
                            &mut pending,
                        )?;
                    }
                    index += 1;
                    Ok(if selection.end.is_some_and(|e| index >= e) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                })?;
            }
        }
        flush(&mut pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_parses_like_a_python_slice() {
        let s: Selection = "1::2".parse().unwrap();
        assert_eq!(s.indices(7), vec![1, 3, 5]);
        assert!(s.contains(3) && !s.contains(4) && !s.contains(0));
        let s: Selection = ":3".parse().unwrap();
        assert_eq!(s.indices(10), vec![0, 1, 2]);
        assert!(!s.contains(3));
        assert_eq!("5:".parse::<Selection>().unwrap().indices(7), vec![5, 6]);
        for bad in ["5", "a:b", "0:10:0", "1:2:3:4"] {
            assert!(bad.parse::<Selection>().unwrap_err().contains(bad), "{bad}");
        }
    }
}
