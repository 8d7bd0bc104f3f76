//! Which class each image is pushed toward: ground-truth labels stored with the input, or pseudo
//! labels from the classifier's argmax over debiased logits (BIGRoC's PL mode).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::data::StoredLabels;

/// Where the target labels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LabelMode {
    /// Ground truth when the input carries labels, pseudo labels otherwise.
    Auto,
    /// Labels stored with the input (or given by --labels-file); an error when there are none.
    Gt,
    /// argmax(f(x) + d) from the classifier itself.
    Pseudo,
}

/// Turns stored labels into class indices in `0..num_classes`: integers as they are, class folder
/// names by the classifier's class names or, failing that, as integers.
pub fn class_indices(stored: &StoredLabels, class_names: &[String], num_classes: usize, source: &str) -> Result<Option<Vec<i64>>> {
    let indices = match stored {
        StoredLabels::None => return Ok(None),
        StoredLabels::Indices(v) => v.clone(),
        StoredLabels::Names(names) => names
            .iter()
            .map(|name| {
                if let Some(i) = class_names.iter().position(|c| c == name) {
                    return Ok(i as i64);
                }
                name.parse::<i64>().map_err(|_| {
                    anyhow::anyhow!(
                        "{source}: class folder `{name}` is neither one of the classifier's class names nor an index"
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    check_range(&indices, num_classes, source)?;
    Ok(Some(indices))
}

/// Fails, naming the first offender, if a label is outside `0..num_classes`.
pub fn check_range(labels: &[i64], num_classes: usize, source: &str) -> Result<()> {
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l >= num_classes as i64) {
        bail!("{source}: label {l} of image {i} is out of range for a classifier with {num_classes} classes");
    }
    Ok(())
}

/// Reads `--labels-file`: an .npy of integers, or text with one integer per line.
pub fn read_labels_file(path: &Path) -> Result<Vec<i64>> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) {
        let t = Tensor::read_npy(path).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
        if t.dtype().is_float() || t.rank() != 1 {
            bail!("{}: expected a 1-D array of integers, found {:?} {:?}", path.display(), t.dtype(), t.dims());
        }
        return Ok(t.to_dtype(DType::I64)?.to_vec1()?);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            l.trim().parse::<i64>().with_context(|| format!("{} line {}: `{}` is not an integer label", path.display(), n + 1, l.trim()))
        })
        .collect()
}

/// Pseudo labels: argmax over `logits + debias` (the debias vector is BIGRoC's d, added per class).
pub fn pseudo_labels(logits: &Tensor, debias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let scores = match debias {
        Some(d) => logits.broadcast_add(&d.to_dtype(DType::F32)?.to_device(logits.device())?)?,
        None => logits,
    };
    scores.argmax(D::Minus1)
}

/// BIGRoC's debiasing vector from the mean logit of each class over a generated set:
/// d_c = 1 - mean_c.
pub fn debias_from_mean_logits(mean_logits: &Tensor) -> candle_core::Result<Tensor> {
    mean_logits.affine(-1.0, 1.0)
}

/// Reads a debias vector (.npy, one value per class).
pub fn read_debias(path: &Path, num_classes: usize, device: &Device) -> Result<Tensor> {
    let d = Tensor::read_npy(path).with_context(|| format!("{}: not a readable .npy file", path.display()))?;
    if d.dims() != [num_classes] {
        bail!("{}: debias vector has shape {:?}; the classifier has {num_classes} classes", path.display(), d.dims());
    }
    Ok(d.to_dtype(DType::F32)?.to_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_indices_and_bad_labels_are_named() {
        let classes: Vec<String> = ["cat", "dog"].iter().map(|s| s.to_string()).collect();
        let got = class_indices(&StoredLabels::Names(vec!["dog".into(), "cat".into(), "1".into()]), &classes, 2, "in").unwrap();
        assert_eq!(got, Some(vec![1, 0, 1]));
        let err = class_indices(&StoredLabels::Names(vec!["cow".into()]), &classes, 2, "in").unwrap_err().to_string();
        assert!(err.contains("`cow`"), "{err}");
        let err = class_indices(&StoredLabels::Indices(vec![0, 2]), &classes, 2, "x.npz").unwrap_err().to_string();
        assert!(err.contains("x.npz: label 2 of image 1 is out of range"), "{err}");
    }

    #[test]
    fn debiasing_changes_the_argmax() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 1.9], [0.0, 1.0]], &dev)?;
        assert_eq!(pseudo_labels(&logits, None)?.to_vec1::<u32>()?, vec![0, 1]);
        let d = debias_from_mean_logits(&Tensor::new(&[1.0f32, 0.8], &dev)?)?;
        let d_values = d.to_vec1::<f32>()?;
        assert!(d_values[0].abs() < 1e-7 && (d_values[1] - 0.2).abs() < 1e-6, "{d_values:?}");
        assert_eq!(pseudo_labels(&logits, Some(&d))?.to_vec1::<u32>()?, vec![1, 1]);
        Ok(())
    }

    #[test]
    fn label_files_in_text_and_npy() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let txt = dir.path().join("l.txt");
        std::fs::write(&txt, "3\n 4\n\nx\n")?;
        let err = read_labels_file(&txt).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("`x`"), "{err}");
        std::fs::write(&txt, "3\n4\n")?;
        assert_eq!(read_labels_file(&txt)?, vec![3, 4]);
        let npy = dir.path().join("l.npy");
        Tensor::new(&[5i64, 6], &Device::Cpu)?.write_npy(&npy)?;
        assert_eq!(read_labels_file(&npy)?, vec![5, 6]);
        Ok(())
    }
}
