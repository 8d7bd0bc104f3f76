//! `cargo xtask lease-pack`: what a GPU lease needs beyond the repository, packed for the device
//! tool's limits.
//!
//! A device call carries the working tree plus named ignored paths, 64 MiB in all, and a fresh
//! machine has none of this project's data. The payload (the CUDA build of bigroc, this xtask's own
//! binary for `guidance-table`, the CIFAR-10 tars xz-compressed, the 87 MB FID Inception in parts)
//! is about 100 MB, so it is split into `.device/lease/call1`, `call2`, ...: each a folder to name in
//! one call's `carry`, each under the limit with the tracked files beside it. On the GPU machine,
//! `xtask/device/lease.sh install` moves whatever arrived into a folder outside the repository
//! copy, which lasts as long as the machine stays warm, and joins the Inception once all its parts
//! are there.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cuda, xz_into};

/// What one call may carry in all (the device tool's limit).
const CALL_LIMIT: u64 = 64 << 20;
/// Left free under the limit for files that change between packing and the call.
const MARGIN: u64 = 2 << 20;
/// Size of one part of a file too large for a call.
const PART: u64 = 20 << 20;
/// The tracked folder that must be moved aside during calls (parity fixtures, unused on the GPU).
pub const ASIDE: &str = "tests/fixtures";

/// One file of the payload, and its name in the call folder.
struct Item {
    source: PathBuf,
    name: String,
    bytes: u64,
}

pub fn pack(root: &Path, shared: &Path, toolkit: Option<PathBuf>, build: bool) -> Result<()> {
    let lease = root.join(".device/lease");
    let staged = lease.join("staged");
    fs::create_dir_all(&staged)?;
    if build {
        cuda::cuda_build(
            root,
            cuda::Options {
                compute_cap: "90".into(),
                out: staged.clone(),
                toolkit,
                // `lease.sh check` runs the first before training (the crate's own kernels on this
                // GPU), `lease.sh bench` the second with and without them.
                examples: vec!["cuda_kernels_check".into(), "diffusion_train_step".into()],
                benches: vec![],
                cudnn: false,
            },
        )?;
    }
    for needed in ["bigroc-cuda.xz", "cuda_kernels_check-cuda.xz", "diffusion_train_step-cuda.xz", "run-on-gpu.sh"] {
        if !staged.join(needed).is_file() {
            bail!("{} is missing: run `cargo xtask lease-pack` without --no-build", staged.join(needed).display());
        }
    }
    let xtask = std::env::current_exe().context("cannot find this xtask's executable")?;
    xz_into(&xtask, &staged.join("xtask.xz"), "-9e")?;
    for split in ["train", "test"] {
        let tar = shared.join(format!("data/cifar10/{split}.tar"));
        xz_into(&tar, &staged.join(format!("{split}.tar.xz")), "-9")?;
    }
    let inception = shared.join("models/inception-2015-12-05.pt");
    let parts = split_into_parts(&inception, &staged, "inception.pt")?;

    let mut items = Vec::new();
    let payload = ["run-on-gpu.sh", "bigroc-cuda.xz", "cuda_kernels_check-cuda.xz", "diffusion_train_step-cuda.xz", "xtask.xz", "train.tar.xz", "test.tar.xz"];
    for name in payload {
        items.push(item(&staged.join(name), name.into())?);
    }
    for part in &parts {
        items.push(item(part, part.file_name().unwrap().to_string_lossy().into())?);
    }
    let tree = travelling_tree_bytes(root)?;
    let budget = CALL_LIMIT.saturating_sub(tree + MARGIN);
    let calls = assign_to_calls(&items.iter().map(|i| i.bytes).collect::<Vec<_>>(), budget).with_context(|| {
        format!("the tracked files without {ASIDE} take {:.1} MiB of a call's 64 MiB", mib(tree))
    })?;

    for old in fs::read_dir(&lease)?.filter_map(|e| e.ok()) {
        if old.file_name().to_string_lossy().starts_with("call") {
            fs::remove_dir_all(old.path())?;
        }
    }
    let mut plan = String::new();
    for (n, members) in calls.iter().enumerate() {
        let dir = lease.join(format!("call{}", n + 1));
        fs::create_dir_all(&dir)?;
        let mut bytes = 0;
        for &i in members {
            let it = &items[i];
            // A hard link costs no disk; a copy where the two folders are on different file systems.
            if fs::hard_link(&it.source, dir.join(&it.name)).is_err() {
                fs::copy(&it.source, dir.join(&it.name))?;
            }
            bytes += it.bytes;
        }
        let names: Vec<&str> = members.iter().map(|&i| items[i].name.as_str()).collect();
        plan += &format!("call {}: carry .device/lease/call{} ({:.1} MiB): {}\n", n + 1, n + 1, mib(bytes), names.join(", "));
    }
    fs::write(lease.join("inception.sha256"), sha256(&inception)?)?;
    let last = lease.join(format!("call{}", calls.len()));
    fs::copy(lease.join("inception.sha256"), last.join("inception.sha256"))?;
    eprint!("{plan}");
    eprintln!(
        "each call: move {ASIDE} aside first (the tracked files then take {:.1} MiB), begin the command with \
         `bash xtask/device/lease.sh install`, and restore {ASIDE} after the call",
        mib(tree)
    );
    fs::write(lease.join("plan.txt"), plan)?;
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn item(path: &Path, name: String) -> Result<Item> {
    let bytes = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    Ok(Item { source: path.to_path_buf(), name, bytes })
}

/// Splits `source` into `NAME.part01`, `NAME.part02`, ... of [`PART`] bytes in `dir`.
fn split_into_parts(source: &Path, dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let mut input = fs::File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let mut parts = Vec::new();
    let mut buf = vec![0u8; PART as usize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = input.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let part = dir.join(format!("{name}.part{:02}", parts.len() + 1));
        fs::File::create(&part)?.write_all(&buf[..filled])?;
        parts.push(part);
        if filled < buf.len() {
            break;
        }
    }
    Ok(parts)
}

/// Bytes of what a call sends besides the carried folders: the tracked files (without [`ASIDE`],
/// which is moved aside) and the untracked ones git does not ignore.
fn travelling_tree_bytes(root: &Path) -> Result<u64> {
    let out = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(root)
        .output()
        .context("git is needed to size the working tree")?;
    if !out.status.success() {
        bail!("git ls-files failed in {}", root.display());
    }
    let mut total = 0;
    for path in out.stdout.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        let path = String::from_utf8_lossy(path);
        if path.starts_with(&format!("{ASIDE}/")) {
            continue;
        }
        total += fs::metadata(root.join(path.as_ref())).map(|m| m.len()).unwrap_or(0);
    }
    Ok(total)
}

/// Assigns items, in order, to as few calls as first-fit gives under `budget` bytes each (the order
/// is kept so that the binaries and data come in the first call, the Inception's parts after).
fn assign_to_calls(sizes: &[u64], budget: u64) -> Result<Vec<Vec<usize>>> {
    let mut calls: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        if size > budget {
            bail!("an item of {:.1} MiB does not fit in one call's {:.1} MiB", mib(size), mib(budget));
        }
        match calls.iter_mut().find(|(used, _)| used + size <= budget) {
            Some((used, members)) => {
                *used += size;
                members.push(i);
            }
            None => calls.push((size, vec![i])),
        }
    }
    Ok(calls.into_iter().map(|(_, m)| m).collect())
}

pub(crate) fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("sha256sum is needed")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_fill_first_fit_and_refuse_an_item_too_large() {
        let calls = assign_to_calls(&[30, 20, 15, 20, 20, 10], 50).unwrap();
        assert_eq!(calls, vec![vec![0, 1], vec![2, 3, 5], vec![4]]);
        assert!(assign_to_calls(&[10, 60], 50).is_err());
    }

    #[test]
    fn parts_join_back_into_the_file() {
        let dir = std::env::temp_dir().join(format!("bigroc-lease-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let source = dir.join("big.bin");
        let bytes: Vec<u8> = (0..(PART as usize + 1000)).map(|i| (i % 251) as u8).collect();
        fs::write(&source, &bytes).unwrap();
        let parts = split_into_parts(&source, &dir, "big.bin").unwrap();
        let joined: Vec<u8> = parts.iter().flat_map(|p| fs::read(p).unwrap()).collect();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(joined, bytes);
    }
}
