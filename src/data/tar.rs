//! Tar archives of image trees (e.g. CIFAR-10 as `train/<class>/NNNN.jpg`), read as a stream of
//! regular-file members so a 50,000-image archive is never unpacked to disk.

use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{Context, Result};

/// Calls `f(name, contents)` for every regular-file member of the archive at `path`, in archive
/// order (directories, links and other entries are passed over), until `f` breaks. `name` is the
/// member's path inside the archive, `contents` reads its bytes (what `f` leaves unread is
/// skipped). Errors name the archive.
pub fn for_each_file(path: &Path, mut f: impl FnMut(&str, &mut dyn Read) -> Result<ControlFlow<()>>) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = ::tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let entries = archive.entries().with_context(|| format!("{}: not a readable tar archive", path.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("{}: not a readable tar archive", path.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .with_context(|| format!("{}: a member with an unreadable name", path.display()))?
            .to_string_lossy()
            .into_owned();
        if f(&name, &mut entry)?.is_break() {
            break;
        }
    }
    Ok(())
}

/// Reads all of a member's bytes, naming the archive and member on failure.
pub fn read_member(archive: &Path, name: &str, contents: &mut dyn Read) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    contents
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read member {name}", archive.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_in_archive_order_without_directories() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.tar");
        let mut builder = ::tar::Builder::new(File::create(&path)?);
        let mut dir_header = ::tar::Header::new_ustar();
        dir_header.set_entry_type(::tar::EntryType::Directory);
        dir_header.set_size(0);
        builder.append_data(&mut dir_header, "x/", std::io::empty())?;
        for (name, data) in [("x/b.txt", &b"bee"[..]), ("x/a.txt", b"a"), ("y.txt", b"why")] {
            let mut h = ::tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            builder.append_data(&mut h, name, data)?;
        }
        builder.into_inner()?;
        let mut seen = vec![];
        for_each_file(&path, |name, contents| {
            let bytes = if name == "y.txt" { vec![] } else { read_member(&path, name, contents)? };
            seen.push((name.to_string(), bytes));
            Ok(if seen.len() == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
        })?;
        let expected = [("x/b.txt", &b"bee"[..]), ("x/a.txt", b"a"), ("y.txt", b"")];
        assert_eq!(seen, expected.map(|(n, d)| (n.to_string(), d.to_vec())));
        // The unread member was skipped, not mixed into the next one; a bad file is named.
        std::fs::write(dir.path().join("bad.tar"), vec![7u8; 700])?;
        let err = for_each_file(&dir.path().join("bad.tar"), |_, _| Ok(ControlFlow::Continue(()))).unwrap_err();
        assert!(format!("{err:#}").contains("bad.tar"), "{err:#}");
        Ok(())
    }
}
