//! Reference statistics files (`.npz`), in the layout of OpenAI's reference batches.
//!
//! OpenAI's guided-diffusion evaluator reads `mu` and `sigma` (pool_3 mean and covariance, float64)
//! when a batch file has them, `mu_s`/`sigma_s` (spatial features, for sFID), and always the
//! images `arr_0` (uint8 NHWC) from which it recomputes activations for precision/recall. bigroc
//! writes `mu` (f64, 2048), `sigma` (f64, 2048 x 2048) under the same names, plus `features`
//! (f32, N x 2048 pool features) so precision/recall need no images, and `logits` (f32) when the
//! network has a classifier. It reads OpenAI's files too: `mu`/`sigma` for FID, and the images in
//! `arr_0` when features are needed (mind that OpenAI's statistics come from TensorFlow's own
//! resize, so they are close to, not identical with, bigroc's). bigroc's files also cache the
//! features' squared k-NN radii (`knn_sq_radii_k3`, f32, N), which precision needs of the
//! reference on every evaluation.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use bigroc_models::inception::FEATURE_DIM;
use candle_core::{DType, Device, Tensor};

use super::features::FeatureSet;
use super::fid::FidStats;
use super::precision_recall::{knn_sq_radii, DEFAULT_BLOCK, DEFAULT_K};

/// The array of the cached radii (k = [`DEFAULT_K`]).
const RADII: &str = "knn_sq_radii_k3";

/// What a statistics / sample `.npz` holds.
pub struct StatsFile {
    pub stats: Option<FidStats>,
    pub features: Option<FeatureSet>,
    /// Whether `arr_0` images are present (features can be recomputed from them).
    pub has_images: bool,
}

/// Writes `mu`, `sigma`, `features` (and `logits`) to `path`, and the features' k-NN radii
/// (computed here unless the set has them; none for sets of k or fewer images).
pub fn write_stats(path: &Path, stats: &FidStats, features: &FeatureSet) -> Result<()> {
    let dev = Device::Cpu;
    let d = stats.dim;
    let mu = Tensor::from_slice(&stats.mu, d, &dev)?;
    let sigma = Tensor::from_slice(&stats.sigma, (d, d), &dev)?;
    let feats = features.pool_tensor(&dev)?;
    let mut arrays: Vec<(&str, &Tensor)> =
        vec![("mu", &mu), ("sigma", &sigma), ("features", &feats)];
    let radii = match &features.knn_sq_radii {
        Some(r) => Some(Tensor::from_slice(r, features.count, &dev)?),
        None if features.count > DEFAULT_K => {
            Some(Tensor::from_vec(knn_sq_radii(&feats, DEFAULT_K, DEFAULT_BLOCK)?, features.count, &dev)?)
        }
        None => None,
    };
    if let Some(r) = &radii {
        arrays.push((RADII, r));
    }
    let logits;
    if let Some(l) = &features.logits {
        logits = Tensor::from_slice(l, (features.count, features.classes), &dev)?;
        arrays.push(("logits", &logits));
    }
    let tmp = path.with_extension("npz.partial");
    Tensor::write_npz(&arrays, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads whatever of `mu`/`sigma`, `features`/`logits` and `arr_0` a `.npz` has (without loading
/// the images).
pub fn read_stats(path: &Path) -> Result<StatsFile> {
    let names = npz_names(path)?;
    let has = |n: &str| names.iter().any(|x| x == n);
    let load = |n: &str| -> Result<Tensor> {
        Ok(Tensor::read_npz_by_name(path, &[n])
            .with_context(|| format!("{}: cannot read array `{n}`", path.display()))?
            .remove(0))
    };
    let stats = if has("mu") && has("sigma") {
        let mu = load("mu")?.to_dtype(DType::F64)?;
        let sigma = load("sigma")?.to_dtype(DType::F64)?;
        let d = mu.dim(0)?;
        ensure!(
            sigma.dims() == [d, d],
            "{}: `sigma` is {:?}, expected {d} x {d} to match `mu`",
            path.display(),
            sigma.dims()
        );
        Some(FidStats {
            mu: mu.to_vec1()?,
            sigma: sigma.flatten_all()?.to_vec1()?,
            dim: d,
            count: 0,
        })
    } else if has("mu") || has("sigma") {
        bail!("{}: has only one of `mu` and `sigma`", path.display());
    } else {
        None
    };
    let features = if has("features") {
        let f = load("features")?.to_dtype(DType::F32)?;
        let (n, d) = f
            .dims2()
            .with_context(|| format!("{}: `features` is not 2-d", path.display()))?;
        ensure!(
            d == FEATURE_DIM,
            "{}: `features` are {d}-d, expected {FEATURE_DIM}",
            path.display()
        );
        let mut set = FeatureSet {
            pool: f.flatten_all()?.to_vec1()?,
            count: n,
            ..Default::default()
        };
        if has("logits") {
            let l = load("logits")?.to_dtype(DType::F32)?;
            ensure!(
                l.dim(0)? == n,
                "{}: `logits` and `features` differ in length",
                path.display()
            );
            set.classes = l.dim(1)?;
            set.logits = Some(l.flatten_all()?.to_vec1()?);
        }
        if has(RADII) {
            let r = load(RADII)?.to_dtype(DType::F32)?;
            ensure!(
                r.dims() == [n],
                "{}: `{RADII}` is {:?}, expected {n} values to match `features`",
                path.display(),
                r.dims()
            );
            set.knn_sq_radii = Some(r.to_vec1()?);
        }
        Some(set)
    } else {
        None
    };
    Ok(StatsFile {
        stats,
        features,
        has_images: has("arr_0"),
    })
}

/// Array names in an `.npz` (zip members without `.npy`).
fn npz_names(path: &Path) -> Result<Vec<String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.strip_suffix(".npy").unwrap_or(&n).to_string()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .with_context(|| format!("{}: unreadable .npz member names", path.display()))?;
    Ok(names)
}
