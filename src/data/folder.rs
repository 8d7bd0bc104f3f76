//! Image folders: recursive listings in a stable order, decoding that names the file at fault.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Image files below `root`, as paths relative to it, sorted (so runs are deterministic).
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        bail!("{} is not a folder", root.display());
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(root).follow_links(true) {
        let entry = entry.with_context(|| format!("cannot list {}", root.display()))?;
        if entry.file_type().is_file() && is_image(entry.path()) {
            files.push(entry.path().strip_prefix(root)?.to_path_buf());
        }
    }
    if files.is_empty() {
        bail!("{} holds no images ({})", root.display(), IMAGE_EXTENSIONS.join(", "));
    }
    files.sort();
    Ok(files)
}

/// Decodes an image as 8-bit RGB (grayscale and alpha are converted).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()?
        .decode()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    Ok(img.to_rgb8())
}

/// Decodes an image file's bytes as 8-bit RGB (format from the contents; grayscale and alpha
/// converted, like PIL's `convert("RGB")`); `name` says which file in the error.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    Ok(image::load_from_memory(bytes).with_context(|| format!("cannot decode image {name}"))?.to_rgb8())
}

/// Width and height from the file header, without decoding the pixels.
pub fn dimensions(path: &Path) -> Result<(u32, u32)> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()?
        .into_dimensions()
        .with_context(|| format!("{}: not a readable image", path.display()))
}

/// The class folder of an image in an ImageFolder layout (`<class>/.../<file>`), if any.
pub fn class_folder(relpath: &Path) -> Option<String> {
    let mut parts = relpath.components();
    let first = parts.next()?;
    parts.next()?; // the file itself must lie below it
    Some(first.as_os_str().to_string_lossy().into_owned())
}
