//! The two CIFAR-10 distributions from the dataset's page: the binary version
//! (`cifar-10-batches-bin/`: records of 1 label byte + the R, G and B planes of a 32x32 image) and
//! the python version (`cifar-10-batches-py/`: pickled dicts with `data`, a uint8 numpy array of
//! one 3072-byte row per image in the same plane order, and `labels`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::labelled::LabelledImages;
use super::pickle::{self, Value};

/// CIFAR-10's classes in label order (used when no `batches.meta(.txt)` lies beside the batches).
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
/// One binary record: the label byte, then the image.
pub const RECORD_BYTES: usize = 1 + PIXELS;

/// Which of the two versions a batch file or folder is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Binary,
    Python,
}

impl Format {
    fn batch_name(self, stem: &str) -> String {
        match self {
            Format::Binary => format!("{stem}.bin"),
            Format::Python => stem.to_string(),
        }
    }
}

/// The format of a CIFAR-10 folder, recognised by its training or test batch files.
pub fn folder_format(dir: &Path) -> Option<Format> {
    [Format::Binary, Format::Python]
        .into_iter()
        .find(|&f| ["data_batch_1", "test_batch"].iter().any(|s| dir.join(f.batch_name(s)).is_file()))
}

/// Whether a file looks like a protocol-2 pickle (how the python version's batches begin).
pub fn is_pickle(path: &Path) -> bool {
    let mut head = [0u8; 2];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok() && head == [0x80, 2]
}

/// The training batches of a CIFAR-10 folder (`data_batch_1` .. `data_batch_N`, all of them, in
/// order); the test split is read by passing its `test_batch` file instead.
pub fn training_batches(dir: &Path, format: Format) -> Result<Vec<PathBuf>> {
    let mut numbers = vec![];
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let stem = match format {
            Format::Binary => name.strip_suffix(".bin"),
            Format::Python => Some(name.as_str()),
        };
        if let Some(n) = stem.and_then(|s| s.strip_prefix("data_batch_")).and_then(|n| n.parse::<usize>().ok()) {
            numbers.push(n);
        }
    }
    numbers.sort();
    if numbers.is_empty() {
        bail!(
            "{}: no training batches ({}); pass the {} file for the test split",
            dir.display(),
            format.batch_name("data_batch_N"),
            format.batch_name("test_batch")
        );
    }
    if let Some(missing) = (1..=numbers.len()).zip(&numbers).find(|(want, &have)| *want != have).map(|(w, _)| w) {
        bail!("{}: {} is missing (found batches {numbers:?})", dir.display(), format.batch_name(&format!("data_batch_{missing}")));
    }
    Ok(numbers.iter().map(|n| dir.join(format.batch_name(&format!("data_batch_{n}")))).collect())
}

/// Class names from `batches.meta.txt` (binary) or `batches.meta` (python) beside the batches, or
/// the standard CIFAR-10 names when there is none.
pub fn class_names(dir: &Path, format: Format) -> Result<Vec<String>> {
    let (path, names) = match format {
        Format::Binary => {
            let path = dir.join("batches.meta.txt");
            if !path.is_file() {
                return Ok(CIFAR10_CLASSES.map(String::from).to_vec());
            }
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            (path, names)
        }
        Format::Python => {
            let path = dir.join("batches.meta");
            if !path.is_file() {
                return Ok(CIFAR10_CLASSES.map(String::from).to_vec());
            }
            let meta = read_pickle(&path)?;
            let names = match meta.get("label_names") {
                Some(Value::List(items)) => items
                    .iter()
                    .map(|v| v.as_text().ok_or_else(|| anyhow!("{}: a label name is {}", path.display(), v.kind())))
                    .collect::<Result<Vec<_>>>()?,
                Some(other) => bail!("{}: `label_names` is {}; expected a list of strings", path.display(), other.kind()),
                None => bail!("{}: no `label_names` key", path.display()),
            };
            (path, names)
        }
    };
    if names.is_empty() {
        bail!("{}: no class names", path.display());
    }
    Ok(names)
}

/// Reads batch files of one format (labels checked against `class_names`), concatenated in order.
pub fn read_batches(files: &[PathBuf], format: Format, class_names: Vec<String>, source: &Path) -> Result<LabelledImages> {
    let mut pixels = vec![];
    let mut labels = vec![];
    let mut names = vec![];
    for file in files {
        let (chw, file_labels) = match format {
            Format::Binary => read_binary_batch(file)?,
            Format::Python => read_python_batch(file)?,
        };
        let file_name = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
        for (k, (&label, image)) in file_labels.iter().zip(chw.chunks_exact(PIXELS)).enumerate() {
            if label as usize >= class_names.len() {
                bail!(
                    "{}: image {k} has label {label}, but there are {} classes ({})",
                    file.display(),
                    class_names.len(),
                    class_names.join(", ")
                );
            }
            // Planes (R, G, B) of 32x32 to interleaved HWC.
            let plane = SIDE * SIDE;
            for p in 0..plane {
                pixels.extend_from_slice(&[image[p], image[plane + p], image[2 * plane + p]]);
            }
            labels.push(label);
            names.push(format!("{file_name}[{k}]"));
        }
    }
    LabelledImages::new(source, SIDE, SIDE, pixels, labels, class_names, names)
}

/// One binary batch: the images (CHW planes, concatenated) and their labels.
pub fn read_binary_batch(path: &Path) -> Result<(Vec<u8>, Vec<u32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.is_empty() || bytes.len() % RECORD_BYTES != 0 {
        bail!(
            "{}: {} bytes is not a whole number of CIFAR-10 records ({RECORD_BYTES} bytes: 1 label + 3x32x32 pixels)",
            path.display(),
            bytes.len()
        );
    }
    let n = bytes.len() / RECORD_BYTES;
    let mut chw = Vec::with_capacity(n * PIXELS);
    let mut labels = Vec::with_capacity(n);
    for record in bytes.chunks_exact(RECORD_BYTES) {
        labels.push(record[0] as u32);
        chw.extend_from_slice(&record[1..]);
    }
    Ok((chw, labels))
}

fn read_pickle(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    pickle::parse(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// One python batch: the images (CHW planes, concatenated) and their labels.
pub fn read_python_batch(path: &Path) -> Result<(Vec<u8>, Vec<u32>)> {
    let dict = read_pickle(path)?;
    let fail = |what: String| anyhow!("{}: {what}", path.display());
    if !matches!(dict, Value::Dict(_)) {
        return Err(fail(format!("holds {}; expected a dict with `data` and `labels`", dict.kind())));
    }
    let data = dict.get("data").ok_or_else(|| fail("no `data` key".into()))?;
    let (rows, cols, raw) = uint8_matrix(data).map_err(|e| fail(format!("`data`: {e}")))?;
    if cols != PIXELS {
        return Err(fail(format!("`data` has {cols} columns; expected {PIXELS} (3x32x32)")));
    }
    let labels = match dict.get("labels") {
        Some(Value::List(items)) => items
            .iter()
            .map(|v| match v {
                Value::Int(l) if (0..=u32::MAX as i64).contains(l) => Ok(*l as u32),
                other => Err(fail(format!("a label is {}", other.kind()))),
            })
            .collect::<Result<Vec<u32>>>()?,
        Some(other) => return Err(fail(format!("`labels` is {}; expected a list of ints", other.kind()))),
        None => return Err(fail("no `labels` key".into())),
    };
    if labels.len() != rows {
        return Err(fail(format!("{} labels for {rows} images", labels.len())));
    }
    Ok((raw.to_vec(), labels))
}

/// A pickled 2-D uint8 C-order numpy array: `_reconstruct(ndarray, (0,), 'b')` built with the
/// state `(1, shape, dtype('u1'), is_fortran=False, raw bytes)`.
fn uint8_matrix(v: &Value) -> Result<(usize, usize, &[u8])> {
    let Value::Build { obj, state } = v else {
        bail!("{}; expected a numpy array", v.kind());
    };
    match &**obj {
        Value::Call { callable, .. }
            if matches!(&**callable, Value::Global { module, name }
                if (module == "numpy.core.multiarray" || module == "numpy._core.multiarray") && name == "_reconstruct") => {}
        other => bail!("{}; expected a numpy array", other.kind()),
    }
    let Value::Tuple(state) = &**state else {
        bail!("array state is {}", state.kind());
    };
    let [Value::Int(1), Value::Tuple(shape), dtype, fortran, Value::Bytes(raw)] = &state[..] else {
        bail!("array state of an unexpected layout (not numpy's (1, shape, dtype, is_fortran, bytes))");
    };
    let dims: Vec<usize> = shape
        .iter()
        .map(|d| match d {
            Value::Int(d) if *d >= 0 => Ok(*d as usize),
            other => Err(anyhow!("a dimension is {}", other.kind())),
        })
        .collect::<Result<_>>()?;
    let [rows, cols] = dims[..] else {
        bail!("shape {dims:?}; expected (images, 3072)");
    };
    let dtype_name = match dtype {
        Value::Build { obj, .. } => match &**obj {
            Value::Call { callable, args } if matches!(&**callable, Value::Global { module, name } if module == "numpy" && name == "dtype") => {
                match &**args {
                    Value::Tuple(a) => a.first().and_then(Value::as_text),
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    };
    if dtype_name.as_deref() != Some("u1") {
        bail!("dtype {}; expected uint8 (u1)", dtype_name.unwrap_or_else(|| dtype.kind()));
    }
    if !matches!(fortran, Value::Bool(false) | Value::Int(0)) {
        bail!("a Fortran-order array; expected C order");
    }
    if raw.len() != rows * cols {
        bail!("{} bytes of data for shape ({rows}, {cols})", raw.len());
    }
    Ok((rows, cols, raw))
}
