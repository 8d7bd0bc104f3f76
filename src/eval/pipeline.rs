//! What `bigroc stats` and `bigroc eval` do, independent of flag parsing: resolve an input (image
//! folder, sample `.npz`, `.tar`, or statistics `.npz`) to FID statistics and features, running the
//! network only when the input has no cached features, then compute the requested metrics.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;

use super::features::{extract_features, FeatureSet};
use super::fid::{frechet_distance, FidStats};
use super::images::{ImageSet, Selection};
use super::inception_score::{inception_score, DEFAULT_SPLITS};
use super::network::{FidInception, INCEPTION_ENV};
use super::precision_recall::{precision_recall_cached, DEFAULT_BLOCK, DEFAULT_K};
use super::stats_file::read_stats;

/// Where this workplace keeps the network; used only when it exists and nothing else is given.
pub const WORKPLACE_INCEPTION: &str = "../shared/models/inception-2015-12-05.pt";

/// `--inception`, else `$BIGROC_INCEPTION`, else the workplace copy when present.
pub fn resolve_inception_path(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(INCEPTION_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let local = PathBuf::from(WORKPLACE_INCEPTION);
    if local.is_file() {
        return Ok(local);
    }
    bail!(
        "no Inception weights: pass --inception PATH or set {INCEPTION_ENV} to \
         inception-2015-12-05.pt (TorchScript) or pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
    )
}

/// The network, found and loaded on first use (inputs with cached features never need it).
pub struct LazyInception {
    /// `--inception`, if given.
    pub flag: Option<PathBuf>,
    pub device: Device,
    net: OnceCell<FidInception>,
}

impl LazyInception {
    pub fn new(flag: Option<PathBuf>, device: Device) -> Self {
        LazyInception {
            flag,
            device,
            net: OnceCell::new(),
        }
    }

    /// The loaded network, if it was needed.
    pub fn loaded(&self) -> Option<&FidInception> {
        self.net.get()
    }

    pub fn get(&self) -> Result<&FidInception> {
        if let Some(n) = self.net.get() {
            return Ok(n);
        }
        let path = resolve_inception_path(self.flag.as_deref())?;
        let net = FidInception::load(&path, &self.device)?;
        tracing::info!(
            "Inception: {} ({:?} weights, input scaling {:?}{})",
            path.display(),
            net.format,
            net.scaling,
            if net.has_logits() {
                ", with logits"
            } else {
                ", no logits"
            }
        );
        Ok(self.net.get_or_init(|| net))
    }
}

/// One side of a comparison, as far as it could be resolved.
pub struct Side {
    pub path: PathBuf,
    pub stats: Option<FidStats>,
    pub features: Option<FeatureSet>,
    /// Number of images behind the statistics (0 when only `mu`/`sigma` were read).
    pub count: usize,
}

/// What must be available for a side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// Pool features are needed (precision/recall), not only `mu`/`sigma`.
    pub features: bool,
}

fn is_npz(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

/// Resolves `path` to statistics and (if needed or cheap) features.
/// `progress(done, total)` is called while the network runs.
pub fn load_side(
    path: &Path,
    selection: Selection,
    needs: Needs,
    net: &LazyInception,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Side> {
    let subset = selection != Selection::default();
    // `mu`/`sigma` stored in the file (OpenAI's reference batches) are used for FID even when the
    // features for precision/recall have to be computed from its images.
    let mut stored_stats = None;
    if is_npz(path) {
        let file = read_stats(path)?;
        if let Some(f) = file.features {
            let f = if subset { f.select(selection) } else { f };
            let stats = if subset || file.stats.is_none() {
                f.stats()?
            } else {
                file.stats.unwrap()
            };
            return Ok(Side {
                path: path.into(),
                count: f.count,
                stats: Some(stats),
                features: Some(f),
            });
        }
        let must_run = needs.features || subset || file.stats.is_none();
        if !must_run {
            return Ok(Side {
                path: path.into(),
                stats: file.stats,
                features: None,
                count: 0,
            });
        }
        stored_stats = if subset { None } else { file.stats };
        if !file.has_images {
            bail!(
                "{}: holds neither images (`arr_0`) nor `features`, which {} needs",
                path.display(),
                if subset {
                    "a subset"
                } else {
                    "precision/recall (or IS)"
                }
            );
        }
    }
    let set = ImageSet::open(path)?;
    let total = selection.indices(set.len()).len();
    if total < 2 {
        bail!(
            "{}: {total} image(s) selected; need at least 2",
            path.display()
        );
    }
    let net = net.get()?;
    let features = extract_features(net, &set, selection, batch, |done| progress(done, total))
        .with_context(|| format!("computing features of {}", path.display()))?;
    let stats = match stored_stats {
        Some(s) => s,
        None => features.stats()?,
    };
    Ok(Side {
        path: path.into(),
        count: features.count,
        stats: Some(stats),
        features: Some(features),
    })
}

/// Metrics `bigroc eval` can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Fid,
    Precision,
    Recall,
    Is,
}

impl std::str::FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fid" => Ok(Metric::Fid),
            "precision" => Ok(Metric::Precision),
            "recall" => Ok(Metric::Recall),
            "is" | "inception_score" => Ok(Metric::Is),
            other => Err(format!(
                "unknown metric `{other}` (expected fid, precision, recall, is)"
            )),
        }
    }
}

/// Results, as printed and as written to `--json`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    pub samples: String,
    pub samples_count: usize,
    pub reference: String,
    pub reference_count: usize,
    pub inception: String,
    pub fid: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub inception_score: Option<f64>,
    pub inception_score_std: Option<f64>,
    /// Why a requested metric has no value (e.g. IS with a network without logits).
    pub notes: Vec<String>,
    pub seconds: f64,
}

/// Computes `metrics` for the two resolved sides. `net_has_logits` is `None` when the network
/// was not needed.
pub fn compute_metrics(
    samples: &Side,
    reference: &Side,
    metrics: &[Metric],
    net_has_logits: Option<bool>,
    report: &mut EvalReport,
) -> Result<()> {
    if metrics.contains(&Metric::Fid) {
        let (a, b) = (samples.stats.as_ref(), reference.stats.as_ref());
        let r = frechet_distance(
            a.context("samples have no statistics")?,
            b.context("reference has no statistics")?,
        )?;
        report.fid = Some(r.fid);
    }
    if metrics.contains(&Metric::Precision) || metrics.contains(&Metric::Recall) {
        let dev = Device::Cpu;
        let real_set = reference.features.as_ref().context("reference has no features")?;
        let real = real_set.pool_tensor(&dev)?;
        let fake = samples
            .features
            .as_ref()
            .context("samples have no features")?
            .pool_tensor(&dev)?;
        let pr = precision_recall_cached(&real, real_set.knn_sq_radii.as_deref(), &fake, DEFAULT_K, DEFAULT_BLOCK)?;
        if metrics.contains(&Metric::Precision) {
            report.precision = Some(pr.precision);
        }
        if metrics.contains(&Metric::Recall) {
            report.recall = Some(pr.recall);
        }
    }
    if metrics.contains(&Metric::Is) {
        match samples.features.as_ref().and_then(|f| f.logits.as_ref().map(|l| (l, f.classes))) {
            Some((logits, classes)) => {
                let is = inception_score(logits, classes, DEFAULT_SPLITS)?;
                report.inception_score = Some(is.mean);
                report.inception_score_std = Some(is.std);
            }
            None => report.notes.push(if net_has_logits != Some(false) {
                "IS: not computed: the samples' cached features have no logits".to_string()
            } else {
                "IS: not computed: this Inception file has no classifier (the TorchScript archive); \
                 pass pytorch-fid's .pth weights with --inception"
                    .to_string()
            }),
        }
    }
    Ok(())
}
