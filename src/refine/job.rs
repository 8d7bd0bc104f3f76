//! Refining a whole input (folder or sample .npz) into an output, resumably, with progress.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::labels::{self, LabelMode};
use super::{refine, RefineSettings};
use crate::classifier::Classifier;
use crate::data::{self, ImageSource};
use crate::output::{Chunk, JobOutput};
use crate::shard::Shard;

/// Everything a refine run needs; the CLI fills it from flags.
#[derive(Debug, Clone, Serialize)]
pub struct RefineJob {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Classifier weights: a path or `hf://...`.
    pub classifier: String,
    /// Without eps, the classifier's recommended eps (or its training eps) is used.
    pub settings: RefineSettings,
    pub labels: LabelMode,
    pub labels_file: Option<PathBuf>,
    pub debias: Option<PathBuf>,
    pub batch_size: usize,
    /// Resize every image to (height, width) first.
    pub resize: Option<(usize, usize)>,
    pub shard: Shard,
    /// Before | after | difference rows for the first `grid_rows` images.
    pub grid: Option<PathBuf>,
    pub grid_rows: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RefineSummary {
    pub output: PathBuf,
    pub images: usize,
    /// Images refined in this run (fewer than `images` when a run resumed).
    pub refined_now: usize,
    pub seconds: f64,
    pub used_ground_truth: bool,
    /// Mean probability of the target class before and after, over the images refined now.
    pub mean_target_prob_before: f64,
    pub mean_target_prob_after: Option<f64>,
}

impl RefineJob {
    pub fn run(&self, device: &Device) -> Result<RefineSummary> {
        let started = Instant::now();
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let classifier = Classifier::load(&self.classifier, device)?;
        let source = ImageSource::open(&self.input)?;
        let (height, width) = match self.resize {
            Some(size) => size,
            None => source.uniform_size()?,
        };
        classifier.check_input_size(height, width)?;
        let targets_known = self.ground_truth(&source, &classifier)?;
        let use_gt = match (self.labels, &targets_known) {
            (LabelMode::Gt, None) => bail!(
                "--labels gt: {} carries no labels (no arr_1, no class folders); pass --labels-file or use --labels pseudo",
                source.describe()
            ),
            (LabelMode::Pseudo, _) | (LabelMode::Auto, None) => false,
            (LabelMode::Gt, Some(_)) | (LabelMode::Auto, Some(_)) => true,
        };
        let debias = match &self.debias {
            Some(path) if !use_gt => Some(labels::read_debias(path, classifier.num_classes(), device)?),
            Some(_) => {
                tracing::warn!("--debias is ignored: ground-truth labels are used");
                None
            }
            None => None,
        };
        let settings = match (classifier.info.default_refine_eps, classifier.info.threat_model) {
            (Some(eps), _) | (None, Some(crate::classifier::ThreatModel { eps, .. })) => self.settings.with_default_eps(eps),
            (None, None) => self.settings,
        };
        let pgd = settings.pgd().with_context(|| format!("classifier {}", classifier.source))?;
        tracing::info!(
            "refining {} with {}: {:?} eps {} ({}; {} in [0,1]), {} steps of {}, {} labels",
            source.describe(),
            classifier.source,
            settings.norm,
            settings.eps.unwrap_or_default(),
            settings.eps_scale.describe(),
            pgd.eps,
            pgd.steps,
            pgd.step_size,
            if use_gt { "ground-truth" } else { "pseudo" }
        );

        // Shards split the run's batches, not its images: every batch then holds the same images as
        // in an unsharded run, so merged shards equal that run bit for bit.
        let everything: Vec<usize> = (0..source.len()).collect();
        let all_batches: Vec<&[usize]> = everything.chunks(self.batch_size).collect();
        let batches = &all_batches[self.shard.range(all_batches.len())];
        let items: Vec<usize> = batches.iter().flat_map(|b| b.iter().copied()).collect();
        let output = JobOutput::open(&self.output, &self.fingerprint(&source, use_gt, &settings)?)?;
        let done_before = (0..batches.len()).filter(|&c| output.is_done(c)).map(|c| batches[c].len()).sum();
        let bar = crate::progress::images(items.len(), done_before, "refine");
        let (mut prob_before, mut prob_after, mut refined_now) = (0.0, 0.0, 0usize);
        for (c, batch) in batches.iter().enumerate() {
            if output.is_done(c) {
                continue;
            }
            let x = source.load_batch(batch, self.resize, device)?;
            let targets: Vec<i64> = match (&targets_known, use_gt) {
                (Some(t), true) => batch.iter().map(|&i| t[i]).collect(),
                _ => {
                    let logits = classifier.logits(&x)?;
                    self.check_finite(&logits, &source, batch, &classifier)?;
                    let l = labels::pseudo_labels(&logits, debias.as_ref())?;
                    l.to_dtype(DType::I64)?.to_vec1()?
                }
            };
            let target_tensor = Tensor::new(targets.as_slice(), device)?;
            let outcome = refine(&classifier, &x, &target_tensor, &settings)?;
            self.check_finite(&outcome.start_loss, &source, batch, &classifier)?;
            prob_before += outcome.start_loss.neg()?.exp()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if let Some(end) = &outcome.end_loss {
                prob_after += end.neg()?.exp()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            }
            refined_now += batch.len();
            output.write_chunk(
                c,
                &Chunk {
                    images: data::to_u8_nhwc(&outcome.images)?,
                    labels: targets,
                    indices: batch.to_vec(),
                    relpaths: batch.iter().map(|&i| source.output_relpath(i)).collect(),
                },
            )?;
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
        let output_path = output.finish(batches.len(), !self.shard.is_whole())?;
        if let Some(grid) = &self.grid {
            let rows: Vec<usize> = items.iter().copied().take(self.grid_rows.max(1)).collect();
            self.write_grid(grid, &source, &output_path, &rows, device)?;
        }
        let summary = RefineSummary {
            output: output_path,
            images: items.len(),
            refined_now,
            seconds: started.elapsed().as_secs_f64(),
            used_ground_truth: use_gt,
            mean_target_prob_before: prob_before / refined_now.max(1) as f64,
            mean_target_prob_after: settings.use_best.then(|| prob_after / refined_now.max(1) as f64),
        };
        Ok(summary)
    }

    /// Ground-truth class indices for every input image, if the input or --labels-file has them.
    fn ground_truth(&self, source: &ImageSource, classifier: &Classifier) -> Result<Option<Vec<i64>>> {
        if let Some(path) = &self.labels_file {
            let l = labels::read_labels_file(path)?;
            if l.len() != source.len() {
                bail!("{}: {} labels for {} images in {}", path.display(), l.len(), source.len(), source.describe());
            }
            labels::check_range(&l, classifier.num_classes(), &path.display().to_string())?;
            return Ok(Some(l));
        }
        if self.labels == LabelMode::Pseudo {
            return Ok(None);
        }
        labels::class_indices(&source.stored_labels(), &classifier.info.classes, classifier.num_classes(), &source.describe())
    }

    fn check_finite(&self, t: &Tensor, source: &ImageSource, batch: &[usize], classifier: &Classifier) -> Result<()> {
        let t = t.to_dtype(DType::F32)?;
        let bad = t.ne(&t)?.to_dtype(DType::F32)?; // NaN != NaN
        let bad = if bad.rank() > 1 { bad.flatten_from(1)?.max(1)? } else { bad };
        if let Some(i) = bad.to_vec1::<f32>()?.iter().position(|&b| b > 0.0) {
            bail!(
                "classifier {} produced NaN logits for {} (image {} of {}); check the weights file",
                classifier.source,
                source.output_relpath(batch[i]).display(),
                batch[i],
                source.describe()
            );
        }
        Ok(())
    }

    /// The arguments that determine the results; a resumed run must match them.
    fn fingerprint(&self, source: &ImageSource, use_gt: bool, settings: &RefineSettings) -> Result<serde_json::Value> {
        let file_id = |p: &Path| -> serde_json::Value {
            let meta = std::fs::metadata(p).ok();
            serde_json::json!({
                "path": std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()),
                "bytes": meta.map(|m| m.len()),
            })
        };
        Ok(serde_json::json!({
            "command": "refine",
            "input": file_id(&self.input),
            "images": source.len(),
            "classifier": if self.classifier.starts_with("hf://") { serde_json::json!(self.classifier) } else { file_id(Path::new(&self.classifier)) },
            "settings": settings,
            "labels": if use_gt { "gt" } else { "pseudo" },
            "labels_file": self.labels_file.as_deref().map(file_id),
            "debias": self.debias.as_deref().map(file_id),
            "batch_size": self.batch_size,
            "resize": self.resize,
            "shard": self.shard,
        }))
    }

    /// Rows of generated | refined | difference for the images `rows`, read back from the output.
    fn write_grid(&self, path: &Path, source: &ImageSource, output: &Path, rows: &[usize], device: &Device) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let before = source.load_batch(rows, self.resize, device)?;
        let after = match crate::output::OutputFormat::of(output) {
            crate::output::OutputFormat::Npz => {
                let images = data::npz::read_samples(output)?.images;
                let x = images.narrow(0, 0, rows.len())?.permute((0, 3, 1, 2))?.to_dtype(DType::F32)?;
                (x / 255.0)?.to_device(device)?
            }
            crate::output::OutputFormat::Folder => {
                let images = rows
                    .iter()
                    .map(|&i| data::folder::load_rgb(&output.join(source.output_relpath(i))))
                    .collect::<Result<Vec<_>>>()?;
                data::rgb_to_tensor(&images, device)?
            }
        };
        let diff = crate::grid::stretched_difference(&before, &after)?;
        crate::grid::save_columns(path, &[before, after, diff]).context("writing the grid")
    }
}
