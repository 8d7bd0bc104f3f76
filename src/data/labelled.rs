//! Labelled images in the ImageFolder layout (`root/<class>/<image>`, as a directory or a `.tar`
//! of one): classes are the sorted folder names, as torchvision's ImageFolder numbers them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::eval::images::decode_rgb;
use crate::train::batches::ImageSet;

/// Reads every image of an ImageFolder directory or tar, in sorted path order.
pub fn read_image_folder(path: &Path) -> Result<ImageSet> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if path.is_dir() {
        for entry in walkdir::WalkDir::new(path).follow_links(true) {
            let entry = entry.with_context(|| format!("listing {}", path.display()))?;
            if entry.file_type().is_file() && crate::data::folder::is_image(entry.path()) {
                let rel = entry.path().strip_prefix(path)?.to_string_lossy().to_string();
                files.push((rel, std::fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?));
            }
        }
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        for entry in archive.entries().with_context(|| format!("{} is not a tar archive", path.display()))? {
            let mut entry = entry.with_context(|| format!("reading {}", path.display()))?;
            let name = entry.path()?.to_string_lossy().to_string();
            if entry.header().entry_type().is_file() && crate::data::folder::is_image(Path::new(&name)) {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).with_context(|| format!("reading {name} in {}", path.display()))?;
                files.push((name, bytes));
            }
        }
    }
    if files.is_empty() {
        bail!("{}: no images found", path.display())
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let class_of = |name: &str| -> Result<String> {
        Path::new(name)
            .parent()
            .and_then(|p| p.file_name())
            .map(|c| c.to_string_lossy().to_string())
            .with_context(|| format!("{}: image {name} is not inside a class folder", path.display()))
    };
    let mut classes: BTreeMap<String, u32> = BTreeMap::new();
    for (name, _) in &files {
        classes.insert(class_of(name)?, 0);
    }
    for (i, v) in classes.values_mut().enumerate() {
        *v = i as u32;
    }
    let (mut pixels, mut labels, mut size) = (Vec::new(), Vec::new(), None);
    for (name, bytes) in &files {
        let im = decode_rgb(bytes, &format!("{name} in {}", path.display()))?;
        match size {
            None => size = Some((im.height, im.width)),
            Some(s) if s != (im.height, im.width) => {
                bail!("{}: {name} is {}x{}, the first image {}x{}", path.display(), im.width, im.height, s.1, s.0)
            }
            _ => {}
        }
        pixels.extend_from_slice(&im.data);
        labels.push(classes[&class_of(name)?]);
    }
    let (height, width) = size.expect("non-empty");
    Ok(ImageSet { pixels, labels, height, width, classes: classes.into_keys().collect() })
}
