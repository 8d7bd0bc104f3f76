//! Labelled image datasets for training, held decoded in memory (CIFAR-size sets: 50,000 32x32
//! images are 150 MB): an ImageFolder tree (`root/<class>/*.png|jpg`) as a folder or a `.tar`
//! archive, or CIFAR-10's binary or python batches.
//!
//! Images are in a deterministic order: ImageFolder sets like torchvision's `ImageFolder` (classes
//! sorted by name and numbered in that order, images by class and then path), CIFAR-10 in file
//! and record order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use super::{cifar, folder};

/// Labelled RGB images of one size, decoded in memory.
#[derive(Clone, Debug)]
pub struct LabelledImages {
    source: PathBuf,
    height: usize,
    width: usize,
    /// uint8 `(N, H, W, 3)`, row-major.
    pixels: Vec<u8>,
    labels: Vec<u32>,
    class_names: Vec<String>,
    names: Vec<String>,
}

impl LabelledImages {
    /// Opens a dataset, recognising its format:
    /// - a folder holding `data_batch_1.bin` / `test_batch.bin`: CIFAR-10 binary, the training
    ///   batches `data_batch_1..N.bin` (pass `test_batch.bin` itself for the test split);
    /// - a folder holding `data_batch_1` / `test_batch`: CIFAR-10 python, likewise;
    /// - any other folder: ImageFolder, one subfolder per class (files directly in the folder
    ///   and hidden entries are passed over; every other file must be an image);
    /// - a `.tar` file: an ImageFolder archive, each image's class being its parent folder's
    ///   name (`train/<class>/NNNN.jpg`);
    /// - a `.bin` file: one CIFAR-10 binary batch; another file starting like a protocol-2
    ///   pickle: one CIFAR-10 python batch (class names from `batches.meta(.txt)` beside it,
    ///   else CIFAR-10's).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{} does not exist", path.display());
        }
        if path.is_dir() {
            return match cifar::folder_format(path) {
                Some(format) => {
                    let files = cifar::training_batches(path, format)?;
                    cifar::read_batches(&files, format, cifar::class_names(path, format)?, path)
                }
                None => read_image_folder(path),
            };
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if ext == "tar" {
            read_image_tar(path)
        } else if ext == "bin" {
            let format = cifar::Format::Binary;
            cifar::read_batches(&[path.to_path_buf()], format, cifar::class_names(dir, format)?, path)
        } else if cifar::is_pickle(path) {
            let format = cifar::Format::Python;
            cifar::read_batches(&[path.to_path_buf()], format, cifar::class_names(dir, format)?, path)
        } else {
            bail!(
                "{}: expected an ImageFolder (a folder or a .tar of <class>/<image> files) or CIFAR-10 \
                 batches (a cifar-10-batches-bin or -py folder, or one of their batch files)",
                path.display()
            )
        }
    }

    /// A dataset from its parts: `pixels` uint8 `(N, height, width, 3)`, one label (below the
    /// number of classes) and one name (for messages) per image. `source` names it in errors.
    pub fn new(
        source: &Path,
        height: usize,
        width: usize,
        pixels: Vec<u8>,
        labels: Vec<u32>,
        class_names: Vec<String>,
        names: Vec<String>,
    ) -> Result<Self> {
        let n = labels.len();
        if n == 0 {
            bail!("{}: no images", source.display());
        }
        if pixels.len() != n * height * width * 3 || names.len() != n {
            bail!(
                "{}: {} pixel values and {} names for {n} images of {height}x{width}x3",
                source.display(),
                pixels.len(),
                names.len()
            );
        }
        if let Some(i) = labels.iter().position(|&l| l as usize >= class_names.len()) {
            bail!("{}: {} has label {}, but there are {} classes", source.display(), names[i], labels[i], class_names.len());
        }
        Ok(Self { source: source.to_path_buf(), height, width, pixels, labels, class_names, names })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The path the set was opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Image `i` as uint8 HWC (`height * width * 3` values, RGB interleaved).
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.height * self.width * 3;
        &self.pixels[i * size..(i + 1) * size]
    }

    /// All images, uint8 `(N, H, W, 3)` row-major.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Class indices, one per image.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Class names in index order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Where image `i` came from: its path (folder, tar member) or `batch_file[record]`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Images per class, in class order.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// Images `indices` as f32 NCHW in [0, 1] and their labels as u32 `(B,)`, on `device`.
    /// Pixels are `v / 255` rounded once, as torchvision's `ToTensor` makes them (candle's
    /// `x / 255.` multiplies by a rounded 1/255 and can land one ulp away).
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let plane = self.height * self.width;
        let mut data = Vec::with_capacity(indices.len() * plane * 3);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                bail!("{}: image index {i} out of range ({} images)", self.source.display(), self.len());
            }
            let im = self.image(i);
            for c in 0..3 {
                data.extend((0..plane).map(|p| im[p * 3 + c] as f32 / 255.0));
            }
            labels.push(self.labels[i]);
        }
        let x = Tensor::from_vec(data, (indices.len(), 3, self.height, self.width), device)?;
        Ok((x, Tensor::from_vec(labels, indices.len(), device)?))
    }
}

/// Decoded ImageFolder images in (class, path) order into one uniform-size set.
fn assemble(source: &Path, classes: Vec<String>, items: Vec<(String, u32)>, images: Vec<RgbImage>) -> Result<LabelledImages> {
    let (w, h) = images[0].dimensions();
    let mut pixels = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for (k, im) in images.iter().enumerate() {
        if im.dimensions() != (w, h) {
            bail!(
                "{}: images of different sizes: {} is {w}x{h}, {} is {}x{}",
                source.display(),
                items[0].0,
                items[k].0,
                im.width(),
                im.height()
            );
        }
        pixels.extend_from_slice(im.as_raw());
    }
    let (names, labels) = items.into_iter().unzip();
    LabelledImages::new(source, h as usize, w as usize, pixels, labels, classes, names)
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

fn not_an_image(what: String) -> anyhow::Error {
    anyhow::anyhow!("{what} is not an image (expected {}); ImageFolder classes hold only images", folder::IMAGE_EXTENSIONS.join(", "))
}

/// `root/<class>/**/<image>`, classes numbered in sorted name order like torchvision.
fn read_image_folder(root: &Path) -> Result<LabelledImages> {
    let mut classes = BTreeSet::new();
    let mut files: Vec<(PathBuf, String)> = vec![];
    let walk = walkdir::WalkDir::new(root)
        .follow_links(true)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !is_hidden(&e.file_name().to_string_lossy()));
    for entry in walk {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        let rel = entry.path().strip_prefix(root)?.to_path_buf();
        if entry.depth() == 1 {
            if entry.file_type().is_dir() {
                classes.insert(entry.file_name().to_string_lossy().into_owned());
            }
            continue; // files beside the class folders are not part of the set
        }
        if !entry.file_type().is_file() {
            continue;
        }
        if !folder::is_image(&rel) {
            return Err(not_an_image(entry.path().display().to_string()));
        }
        let class = folder::class_folder(&rel).context("a file below a class folder has a class")?;
        files.push((rel, class));
    }
    let classes: Vec<String> = classes.into_iter().collect();
    if classes.is_empty() {
        bail!("{}: no class folders (expected an ImageFolder: <class>/<image> files)", root.display());
    }
    let mut items: Vec<(PathBuf, u32)> =
        files.into_iter().map(|(rel, class)| (rel, classes.binary_search(&class).unwrap() as u32)).collect();
    items.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let counts = items.iter().fold(vec![0usize; classes.len()], |mut c, (_, l)| {
        c[*l as usize] += 1;
        c
    });
    if let Some(empty) = counts.iter().position(|&c| c == 0) {
        bail!("{}: class folder {} holds no images", root.display(), classes[empty]);
    }
    let images = items.par_iter().map(|(rel, _)| folder::load_rgb(&root.join(rel))).collect::<Result<Vec<_>>>()?;
    let items = items.into_iter().map(|(rel, l)| (rel.display().to_string(), l)).collect();
    assemble(root, classes, items, images)
}

/// An ImageFolder tar: every (non-hidden) regular member is an image whose parent folder names
/// its class.
fn read_image_tar(path: &Path) -> Result<LabelledImages> {
    let mut members: Vec<(String, String, Vec<u8>)> = vec![];
    super::tar::for_each_file(path, |name, contents| {
        let member = Path::new(name);
        if member.file_name().is_none_or(|f| is_hidden(&f.to_string_lossy())) {
            return Ok(std::ops::ControlFlow::Continue(()));
        }
        if !folder::is_image(member) {
            return Err(not_an_image(format!("{}: member {name}", path.display())));
        }
        let Some(class) = member.parent().and_then(Path::file_name) else {
            bail!("{}: member {name} is not in a class folder (expected <class>/<image>)", path.display());
        };
        let class = class.to_string_lossy().into_owned();
        members.push((name.to_string(), class, super::tar::read_member(path, name, contents)?));
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    if members.is_empty() {
        bail!("{}: no images in the archive", path.display());
    }
    let classes: Vec<String> = members.iter().map(|m| m.1.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let label = |class: &str| classes.binary_search_by(|c| c.as_str().cmp(class)).unwrap() as u32;
    members.sort_by(|a, b| (label(&a.1), Path::new(&a.0)).cmp(&(label(&b.1), Path::new(&b.0))));
    let images = members
        .par_iter()
        .map(|(name, _, bytes)| folder::decode_rgb(bytes, &format!("{}: member {name}", path.display())))
        .collect::<Result<Vec<_>>>()?;
    let items = members.into_iter().map(|(name, class, _)| (name, label(&class))).collect();
    assemble(path, classes, items, images)
}
