//! Writing results so that nothing is ever half-written and an interrupted job resumes.
//!
//! A batch job (refine, sample) writes its result `OUT` (a `.npz` file or a folder of PNGs) by
//! first filling a work folder `OUT.partial/` chunk by chunk; every chunk lands atomically, and the
//! folder remembers the job's fingerprint (the arguments that determine the results). Run again
//! with the same arguments, the job skips the chunks already there; with other arguments it stops
//! with an error instead of mixing results. When every chunk is done the work folder becomes `OUT`
//! in one step (an .npz is assembled and renamed into place).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::data::npz;

/// Writes `path` through a temporary file in the same folder that is renamed into place only after
/// `write` succeeded, so readers never see a partial file.
pub fn atomic_write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write into {} (missing or not writable?)", dir.display()))?;
    write(tmp.path()).with_context(|| format!("writing {}", path.display()))?;
    // Temporary files are created private (0600); a result should get the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting permissions of {}", path.display()))?;
    }
    tmp.persist(path).with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}

/// Where a job's result goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// One `.npz` in OpenAI's sample format: `arr_0` uint8 NHWC, `arr_1` int64 labels.
    Npz,
    /// A folder of PNG files.
    Folder,
}

impl OutputFormat {
    pub fn of(path: &Path) -> Self {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz")) {
            Self::Npz
        } else {
            Self::Folder
        }
    }
}

/// One finished chunk of results.
pub struct Chunk {
    /// uint8 images, NHWC, on any device.
    pub images: Tensor,
    /// The class label used for each image.
    pub labels: Vec<i64>,
    /// Each image's position in the whole (unsharded) input, so shards can be merged in order.
    pub indices: Vec<usize>,
    /// For folder output: each image's path relative to the output folder.
    pub relpaths: Vec<PathBuf>,
}

const FINGERPRINT: &str = "job.json";

/// A job's result under construction; see the module docs.
pub struct JobOutput {
    target: PathBuf,
    work: PathBuf,
    format: OutputFormat,
}

impl JobOutput {
    /// Opens the work folder for `target`, resuming one left by an interrupted run with the same
    /// `fingerprint`.
    pub fn open(target: &Path, fingerprint: &serde_json::Value) -> Result<Self> {
        let format = OutputFormat::of(target);
        if target.exists() && !(format == OutputFormat::Folder && is_empty_dir(target)) {
            bail!("output {} already exists; remove it or choose another --output", target.display());
        }
        let mut work = target.as_os_str().to_owned();
        work.push(".partial");
        let work = PathBuf::from(work);
        let stamp = work.join(FINGERPRINT);
        let wanted = serde_json::to_string_pretty(fingerprint)?;
        if work.exists() {
            let found = std::fs::read_to_string(&stamp).unwrap_or_default();
            if found != wanted {
                bail!(
                    "{} holds an interrupted run with other arguments ({}); rerun with those arguments to \
                     resume it, or delete the folder to start over",
                    work.display(),
                    diff_summary(&found, fingerprint)
                );
            }
            tracing::info!("resuming the interrupted run in {}", work.display());
        } else {
            std::fs::create_dir_all(&work)
                .with_context(|| format!("cannot create {} (is the output location writable?)", work.display()))?;
            atomic_write(&stamp, |tmp| Ok(std::fs::write(tmp, &wanted)?))?;
        }
        Ok(Self { target: target.to_path_buf(), work, format })
    }

    pub fn format(&self) -> OutputFormat {
        self.format
    }

    fn chunk_path(&self, chunk: usize) -> PathBuf {
        self.work.join(format!("chunk-{chunk:06}.npz"))
    }

    /// Whether a previous run already finished this chunk.
    pub fn is_done(&self, chunk: usize) -> bool {
        self.chunk_path(chunk).is_file()
    }

    /// Stores a finished chunk; PNG files for folder output, plus the chunk's record (which for
    /// .npz output holds the pixels).
    pub fn write_chunk(&self, chunk: usize, data: &Chunk) -> Result<()> {
        let images = data.images.to_device(&Device::Cpu)?.to_dtype(DType::U8)?;
        let n = images.dim(0)?;
        if data.labels.len() != n || data.indices.len() != n {
            bail!("internal error: chunk {chunk} has {n} images but {} labels", data.labels.len());
        }
        let indices = Tensor::from_vec(data.indices.iter().map(|&i| i as i64).collect::<Vec<_>>(), n, &Device::Cpu)?;
        let labels = Tensor::from_vec(data.labels.clone(), n, &Device::Cpu)?;
        match self.format {
            OutputFormat::Npz => {
                npz::write(&self.chunk_path(chunk), &[("arr_0", &images), ("arr_1", &labels), ("index", &indices)])
            }
            OutputFormat::Folder => {
                for (i, rel) in data.relpaths.iter().enumerate() {
                    let path = self.work.join(rel);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)
                            .with_context(|| format!("cannot create {}", parent.display()))?;
                    }
                    let img = crate::data::tensor_to_rgb(&images.get(i)?)?;
                    atomic_write(&path, |tmp| {
                        img.save_with_format(tmp, image::ImageFormat::Png)?;
                        Ok(())
                    })?;
                }
                // The record comes last: a chunk counts as done only once all its files exist.
                npz::write(&self.chunk_path(chunk), &[("arr_1", &labels), ("index", &indices)])
            }
        }
    }

    /// Turns the work folder into the final output once all `num_chunks` chunks are done.
    /// `keep_index` keeps the `index` array in an .npz (wanted for shards, which `merge` joins).
    pub fn finish(self, num_chunks: usize, keep_index: bool) -> Result<PathBuf> {
        if let Some(missing) = (0..num_chunks).find(|&c| !self.is_done(c)) {
            bail!("internal error: chunk {missing} of {} is not done", self.work.display());
        }
        match self.format {
            OutputFormat::Npz => {
                let mut images = Vec::with_capacity(num_chunks);
                let mut labels = Vec::with_capacity(num_chunks);
                let mut indices = Vec::with_capacity(num_chunks);
                for c in 0..num_chunks {
                    let mut arrays = npz::read_all(&self.chunk_path(c))?;
                    images.push(arrays.remove("arr_0").context("chunk without arr_0")?);
                    labels.push(arrays.remove("arr_1").context("chunk without arr_1")?);
                    indices.push(arrays.remove("index").context("chunk without index")?);
                }
                let images = Tensor::cat(&images, 0)?;
                let labels = Tensor::cat(&labels, 0)?;
                let indices = Tensor::cat(&indices, 0)?;
                let mut arrays = vec![("arr_0", &images), ("arr_1", &labels)];
                if keep_index {
                    arrays.push(("index", &indices));
                }
                npz::write(&self.target, &arrays)?;
                std::fs::remove_dir_all(&self.work)
                    .with_context(|| format!("cannot remove {}", self.work.display()))?;
            }
            OutputFormat::Folder => {
                for c in 0..num_chunks {
                    std::fs::remove_file(self.chunk_path(c))?;
                }
                std::fs::remove_file(self.work.join(FINGERPRINT))?;
                if self.target.exists() {
                    std::fs::remove_dir(&self.target)
                        .with_context(|| format!("cannot replace the empty folder {}", self.target.display()))?;
                }
                std::fs::rename(&self.work, &self.target).with_context(|| {
                    format!("cannot rename {} to {}", self.work.display(), self.target.display())
                })?;
            }
        }
        Ok(self.target)
    }
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false)
}

/// Names the fingerprint fields that differ, for the error message.
fn diff_summary(found: &str, wanted: &serde_json::Value) -> String {
    let Ok(serde_json::Value::Object(found)) = serde_json::from_str::<serde_json::Value>(found) else {
        return "unreadable job.json".to_string();
    };
    let serde_json::Value::Object(wanted) = wanted else { return "different job".to_string() };
    let mut keys: Vec<&String> = found.keys().chain(wanted.keys()).collect();
    keys.sort();
    keys.dedup();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| found.get(*k) != wanted.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "unset".into());
            format!("{k}: {} there, {} now", show(found.get(k)), show(wanted.get(k)))
        })
        .collect();
    diffs.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chunk(first: usize, n: usize) -> Chunk {
        let images = Tensor::full(first as u8, (n, 2, 2, 3), &Device::Cpu).unwrap();
        Chunk {
            images,
            labels: (0..n as i64).collect(),
            indices: (first..first + n).collect(),
            relpaths: (first..first + n).map(|i| PathBuf::from(format!("c/{i}.png"))).collect(),
        }
    }

    #[test]
    fn npz_job_resumes_and_refuses_other_arguments() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("out.npz");
        let job = JobOutput::open(&out, &json!({"eps": 0.5}))?;
        job.write_chunk(0, &chunk(0, 2))?;
        drop(job); // "interrupted"
        let err = JobOutput::open(&out, &json!({"eps": 1.0})).err().unwrap().to_string();
        assert!(err.contains("eps: 0.5 there, 1.0 now"), "{err}");
        let job = JobOutput::open(&out, &json!({"eps": 0.5}))?;
        assert!(job.is_done(0) && !job.is_done(1));
        job.write_chunk(1, &chunk(2, 1))?;
        job.finish(2, false)?;
        let arrays = npz::read_all(&out)?;
        assert_eq!(arrays["arr_0"].dims(), &[3, 2, 2, 3]);
        assert_eq!(arrays["arr_1"].to_vec1::<i64>()?, vec![0, 1, 0]);
        assert!(!arrays.contains_key("index"));
        assert!(!dir.path().join("out.npz.partial").exists());
        let err = JobOutput::open(&out, &json!({"eps": 0.5})).err().unwrap().to_string();
        assert!(err.contains("already exists"), "{err}");
        Ok(())
    }

    #[test]
    fn folder_job_appears_in_one_step() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("refined");
        let job = JobOutput::open(&out, &json!({}))?;
        job.write_chunk(0, &chunk(0, 2))?;
        assert!(!out.exists());
        job.finish(1, false)?;
        let mut names: Vec<_> = walkdir::WalkDir::new(&out)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .map(|e| e.path().strip_prefix(&out).unwrap().to_path_buf())
            .collect();
        names.sort();
        assert_eq!(names, vec![PathBuf::from("c/0.png"), PathBuf::from("c/1.png")]);
        Ok(())
    }

    #[test]
    fn unwritable_location_is_named() {
        let err = JobOutput::open(Path::new("/proc/no/such/out.npz"), &json!({})).err().unwrap().to_string();
        assert!(err.contains("/proc/no/such/out.npz.partial"), "{err}");
    }
}
