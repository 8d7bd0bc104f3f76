//! Sampling a whole set of images with (robust) classifier guidance into an output, resumably, with
//! progress: the `bigroc sample` job.
//!
//! Output is OpenAI's sample format (`arr_0` uint8 NHWC, `arr_1` labels; pixels converted from
//! [-1, 1] as guided-diffusion does, `((x + 1) * 127.5).clamp(0, 255)` truncated to uint8) or a
//! folder of PNGs `CLASS/NNNNNN.png`. Every image draws its noise from its own seeded stream
//! ([`super::noise`]), so results do not depend on batch size, sharding or resumption.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::noise::ImageNoise;
use super::{ClassifierGuidance, CondFn, DiffusionConfig, GaussianDiffusion, Guided, Sampler};
use crate::adm::{DiffusionModel, TimeClassifier};
use crate::data::{self, npz};
use crate::output::{Chunk, JobOutput, OutputFormat};
use crate::shard::Shard;

/// Which time-dependent classifier guides the sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GuidanceKind {
    /// No classifier: plain (class-conditional) sampling.
    None,
    /// A plainly trained time-dependent classifier (OpenAI's; paper scale 0.5).
    Vanilla,
    /// An adversarially trained one (the robust-guidance paper; paper scale 1.0).
    Robust,
}

impl GuidanceKind {
    /// The robust-guidance paper's guidance scale for this kind of classifier.
    pub fn paper_scale(self) -> f64 {
        match self {
            Self::None => 0.0,
            Self::Vanilla => 0.5,
            Self::Robust => 1.0,
        }
    }
}

/// The reverse process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Ancestral sampling (guided-diffusion's `p_sample_loop`), guidance shifting the mean.
    Ancestral,
    /// DDIM (`ddim_sample_loop`), guidance through the score; `eta` sets the stochasticity.
    Ddim,
}

/// Which class each image is sampled for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ClassChoice {
    /// Image i gets class i mod the number of classes (balanced sets).
    All,
    /// Image i gets a uniformly random class, from its own seeded stream.
    Random,
    /// Image i gets entry i mod the list's length (class indices or names).
    List(Vec<String>),
}

impl FromStr for ClassChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "all" => Self::All,
            "random" => Self::Random,
            "" => bail!("--classes: empty; expected all, random or a comma-separated list"),
            list => Self::List(list.split(',').map(|c| c.trim().to_string()).collect()),
        })
    }
}

impl std::fmt::Display for ClassChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Random => f.write_str("random"),
            Self::List(l) => f.write_str(&l.join(",")),
        }
    }
}

/// Everything a sampling run needs; the CLI fills it from flags.
#[derive(Debug, Clone)]
pub struct SampleJob {
    /// Diffusion model weights (path or `hf://...`).
    pub model: String,
    /// Time-dependent classifier weights; required unless `guidance` is `None`.
    pub classifier: Option<String>,
    pub guidance: GuidanceKind,
    /// Guidance scale s (the classifier gradient is multiplied by it).
    pub scale: f64,
    /// Number of images in the whole (unsharded) run.
    pub num: usize,
    pub batch_size: usize,
    pub classes: ClassChoice,
    /// guided-diffusion's `timestep_respacing` ("250", "ddim25", "50,50,50,50").
    pub timestep_respacing: String,
    pub sampler: SamplerKind,
    /// DDIM stochasticity.
    pub eta: f64,
    pub seed: u64,
    /// x_T for every image from an .npz (`arr_0` float32 NCHW), instead of the seeded noise.
    pub init_noise: Option<PathBuf>,
    pub output: PathBuf,
    /// Tiles of (up to) the first 64 samples.
    pub grid: Option<PathBuf>,
    /// The predicted x_0 of the run's first images at evenly spaced steps (.png grid or .npz).
    pub trajectory: Option<PathBuf>,
    pub trajectory_steps: usize,
    pub trajectory_images: usize,
    pub shard: Shard,
    /// Compute dtype of the networks' torsos (f32, or f16/bf16 on CUDA).
    pub dtype: DType,
    pub clip_denoised: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct SampleSummary {
    pub output: PathBuf,
    pub images: usize,
    /// Images sampled in this run (fewer than `images` when a run resumed).
    pub sampled_now: usize,
    pub steps: usize,
    pub seconds: f64,
}

/// Samples in [-1, 1] (NCHW) to uint8 NHWC exactly as guided-diffusion's sample scripts do.
pub fn to_u8_nhwc_signed(x: &Tensor) -> Result<Tensor> {
    let scaled = ((x.to_dtype(DType::F32)? + 1.0)? * 127.5)?.clamp(0f32, 255f32)?.floor()?;
    Ok(scaled.permute((0, 2, 3, 1))?.contiguous()?.to_dtype(DType::U8)?)
}

/// Samples in [-1, 1] to [0, 1] for grids.
fn to_unit(x: &Tensor) -> Result<Tensor> {
    Ok(((x.to_dtype(DType::F32)? + 1.0)? / 2.0)?.clamp(0f32, 1f32)?)
}

struct Nets {
    model: DiffusionModel,
    classifier: Option<TimeClassifier>,
    num_classes: Option<usize>,
    class_names: Vec<String>,
}

impl SampleJob {
    fn load(&self, device: &Device) -> Result<Nets> {
        let model = DiffusionModel::load(&self.model, device, self.dtype)?;
        let classifier = match (self.guidance, &self.classifier) {
            (GuidanceKind::None, Some(c)) => bail!("--classifier {c} given with --guidance none"),
            (GuidanceKind::None, None) => None,
            (_, None) => bail!("guidance needs a time-dependent classifier (--classifier)"),
            (_, Some(spec)) => Some(TimeClassifier::load(spec, device, self.dtype)?),
        };
        let mut num_classes = model.num_classes();
        if let Some(c) = &classifier {
            let (cs, ms) = (c.model.config().image_size, model.config().image_size);
            ensure!(
                cs == ms,
                "classifier {} takes {cs}x{cs} images but model {} makes {ms}x{ms}",
                c.source,
                model.source
            );
            match num_classes {
                Some(n) if n != c.num_classes() => bail!(
                    "model {} has {n} classes but classifier {} has {}",
                    model.source,
                    c.source,
                    c.num_classes()
                ),
                _ => num_classes = Some(c.num_classes()),
            }
        }
        let class_names = [&model.info.classes, classifier.as_ref().map_or(&Vec::new(), |c| &c.info.classes)]
            .into_iter()
            .find(|c| !c.is_empty() && Some(c.len()) == num_classes)
            .cloned()
            .unwrap_or_default();
        Ok(Nets {
            model,
            classifier,
            num_classes,
            class_names,
        })
    }

    /// The class of every image of the whole run (-1 when nothing is class-conditional).
    pub fn labels(&self, num_classes: Option<usize>, class_names: &[String]) -> Result<Vec<i64>> {
        let Some(n) = num_classes else {
            ensure!(
                self.classes == ClassChoice::All,
                "--classes {}: the model is unconditional and no classifier guides it",
                self.classes
            );
            return Ok(vec![-1; self.num]);
        };
        Ok(match &self.classes {
            ClassChoice::All => (0..self.num).map(|i| (i % n) as i64).collect(),
            ClassChoice::Random => (0..self.num)
                .map(|i| {
                    let mut rng = StdRng::seed_from_u64(self.seed ^ 0x0063_6c61_7373_6573 ^ (i as u64).rotate_left(17));
                    rng.random_range(0..n) as i64
                })
                .collect(),
            ClassChoice::List(list) => {
                let parsed = list
                    .iter()
                    .map(|c| {
                        if let Ok(i) = c.parse::<usize>() {
                            ensure!(i < n, "--classes: class {i} is out of range (the model has {n} classes)");
                            Ok(i as i64)
                        } else if let Some(i) = class_names.iter().position(|name| name == c) {
                            Ok(i as i64)
                        } else {
                            bail!("--classes: `{c}` is neither a class index below {n} nor a class name of the model")
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                (0..self.num).map(|i| parsed[i % parsed.len()]).collect()
            }
        })
    }

    fn read_init_noise(&self, path: &Path, shape: (usize, usize, usize)) -> Result<Tensor> {
        let mut arrays = npz::read_all(path)?;
        let x = arrays
            .remove("arr_0")
            .with_context(|| format!("{}: no `arr_0` array (expected x_T as float32 NCHW)", path.display()))?;
        let (c, h, w) = shape;
        let dims = x.dims().to_vec();
        ensure!(
            dims.len() == 4 && dims[1..] == [c, h, w] && dims[0] >= self.num && x.dtype().is_float(),
            "{}: `arr_0` is {:?} {dims:?}; expected float x_T of shape (N >= {}, {c}, {h}, {w})",
            path.display(),
            x.dtype(),
            self.num
        );
        Ok(x.to_dtype(DType::F32)?)
    }

    /// The arguments that determine the results; a resumed run must match them.
    fn fingerprint(&self) -> serde_json::Value {
        let file_id = |p: &str| -> serde_json::Value {
            if p.starts_with("hf://") {
                return serde_json::json!(p);
            }
            let meta = std::fs::metadata(p).ok();
            serde_json::json!({
                "path": std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p)),
                "bytes": meta.map(|m| m.len()),
            })
        };
        serde_json::json!({
            "command": "sample",
            "model": file_id(&self.model),
            "classifier": self.classifier.as_deref().map(file_id),
            "guidance": self.guidance,
            "scale": self.scale,
            "num": self.num,
            "batch_size": self.batch_size,
            "classes": self.classes.to_string(),
            "timestep_respacing": self.timestep_respacing,
            "sampler": self.sampler,
            "eta": self.eta,
            "seed": self.seed,
            "init_noise": self.init_noise.as_deref().map(|p| file_id(&p.to_string_lossy())),
            "dtype": format!("{:?}", self.dtype),
            "clip_denoised": self.clip_denoised,
            "shard": self.shard,
        })
    }

    fn relpath(&self, index: usize, label: i64, class_names: &[String]) -> PathBuf {
        match label {
            l if l < 0 => PathBuf::from(format!("{index:06}.png")),
            l => {
                let class = class_names.get(l as usize).cloned().unwrap_or_else(|| l.to_string());
                PathBuf::from(class).join(format!("{index:06}.png"))
            }
        }
    }

    pub fn run(&self, device: &Device) -> Result<SampleSummary> {
        let started = Instant::now();
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.num > 0, "--num must be at least 1");
        ensure!(self.eta >= 0.0, "--eta must not be negative");
        if self.sampler == SamplerKind::Ancestral && self.eta != 0.0 {
            bail!("--eta applies to the ddim sampler only");
        }
        let nets = self.load(device)?;
        let diffusion = GaussianDiffusion::new(&DiffusionConfig {
            timestep_respacing: self.timestep_respacing.clone(),
            ..nets.model.diffusion.clone()
        })
        .with_context(|| format!("model {}", nets.model.source))?;
        let labels = self.labels(nets.num_classes, &nets.class_names)?;
        let size = nets.model.config().image_size;
        let shape = (nets.model.config().in_channels, size, size);
        let init = match &self.init_noise {
            Some(p) => Some(self.read_init_noise(p, shape)?),
            None => None,
        };
        let sampler = match self.sampler {
            SamplerKind::Ancestral => Sampler::Ancestral,
            SamplerKind::Ddim => Sampler::Ddim { eta: self.eta },
        };
        let steps = diffusion.num_timesteps();
        tracing::info!(
            "sampling {} images of {size}x{size} from {} with {:?} guidance{} (scale {}), {steps} {:?} steps",
            self.num,
            nets.model.source,
            self.guidance,
            nets.classifier.as_ref().map(|c| format!(" by {}", c.source)).unwrap_or_default(),
            self.scale,
            self.sampler,
        );

        // Shards split the run's batches (as in refine), so merged shards equal the whole run.
        let everything: Vec<usize> = (0..self.num).collect();
        let all_batches: Vec<&[usize]> = everything.chunks(self.batch_size).collect();
        let batches = &all_batches[self.shard.range(all_batches.len())];
        let items: usize = batches.iter().map(|b| b.len()).sum();
        let output = JobOutput::open(&self.output, &self.fingerprint())?;
        let done_before: usize = (0..batches.len()).filter(|&c| output.is_done(c)).map(|c| batches[c].len()).sum();
        let bars = indicatif::MultiProgress::new();
        let image_bar = bars.add(crate::progress::images(items, done_before, "sample"));
        let guidance = nets.classifier.as_ref().map(|c| ClassifierGuidance {
            classifier: &c.model,
            scale: self.scale,
        });
        let mut sampled_now = 0;
        for (c, batch) in batches.iter().enumerate() {
            if output.is_done(c) {
                if c == 0 && self.trajectory.as_ref().is_some_and(|t| !t.exists()) {
                    tracing::warn!("no trajectory written: the first batch was finished by an earlier run");
                }
                continue;
            }
            let batch_labels: Vec<i64> = batch.iter().map(|&i| labels[i]).collect();
            let y = if batch_labels.iter().all(|&l| l >= 0) {
                let l: Vec<u32> = batch_labels.iter().map(|&l| l as u32).collect();
                Some(Tensor::from_vec(l, batch.len(), device)?)
            } else {
                None
            };
            let mut noise = ImageNoise::new(self.seed, batch, shape);
            let mut x_t = noise.draw(device)?;
            if let Some(init) = &init {
                let idx = Tensor::from_vec(batch.iter().map(|&i| i as u32).collect::<Vec<_>>(), batch.len(), &Device::Cpu)?;
                x_t = init.index_select(&idx, 0)?.to_device(device)?;
            }
            let g = Guided {
                model: &nets.model.unet,
                cond: guidance.as_ref().map(|g| g as &dyn CondFn),
                labels: y.as_ref(),
                clip_denoised: self.clip_denoised,
            };
            let capture = if c == 0 && self.trajectory.is_some() {
                trajectory_steps(steps, self.trajectory_steps)
            } else {
                Vec::new()
            };
            let n_traj = self.trajectory_images.min(batch.len()).max(1);
            let mut snapshots: Vec<(usize, Tensor)> = Vec::new();
            let step_bar = bars.add(crate::progress::steps(steps, &format!("batch {}/{}", c + 1, batches.len())));
            let x0 = diffusion.sample_loop(
                sampler,
                &g,
                &x_t,
                &mut |_, _| noise.draw(device),
                &mut |k, t, out| {
                    if capture.contains(&k) {
                        snapshots.push((diffusion.timestep_map[t], out.pred_xstart.narrow(0, 0, n_traj)?));
                    }
                    step_bar.inc(1);
                    Ok(())
                },
            )?;
            step_bar.finish_and_clear();
            bars.remove(&step_bar);
            if let (Some(path), false) = (&self.trajectory, snapshots.is_empty()) {
                write_trajectory(path, &snapshots, &x0.narrow(0, 0, n_traj)?, &batch_labels[..n_traj])?;
            }
            output.write_chunk(
                c,
                &Chunk {
                    images: to_u8_nhwc_signed(&x0)?,
                    labels: batch_labels.clone(),
                    indices: batch.to_vec(),
                    relpaths: batch
                        .iter()
                        .zip(&batch_labels)
                        .map(|(&i, &l)| self.relpath(i, l, &nets.class_names))
                        .collect(),
                },
            )?;
            sampled_now += batch.len();
            image_bar.inc(batch.len() as u64);
        }
        image_bar.finish_and_clear();
        let output_path = output.finish(batches.len(), !self.shard.is_whole())?;
        if let Some(grid) = &self.grid {
            self.write_grid(grid, &output_path, batches, &labels, &nets.class_names)?;
        }
        Ok(SampleSummary {
            output: output_path,
            images: items,
            sampled_now,
            steps,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Tiles of up to 64 of this run's samples, read back from the output.
    fn write_grid(
        &self,
        path: &Path,
        output: &Path,
        batches: &[&[usize]],
        labels: &[i64],
        class_names: &[String],
    ) -> Result<()> {
        let shown: Vec<usize> = batches.iter().flat_map(|b| b.iter().copied()).take(64).collect();
        let images = match OutputFormat::of(output) {
            OutputFormat::Npz => {
                let images = npz::read_samples(output)?.images;
                let x = images.narrow(0, 0, shown.len())?.permute((0, 3, 1, 2))?.to_dtype(DType::F32)?;
                (x / 255.0)?
            }
            OutputFormat::Folder => {
                let images = shown
                    .iter()
                    .map(|&i| data::folder::load_rgb(&output.join(self.relpath(i, labels[i], class_names))))
                    .collect::<Result<Vec<_>>>()?;
                data::rgb_to_tensor(&images, &Device::Cpu)?
            }
        };
        let per_row = (shown.len() as f64).sqrt().ceil() as usize;
        crate::grid::save_tiles(path, &images, per_row.max(1)).context("writing the grid")
    }
}

/// `count` evenly spaced step numbers (0 = first step, at the largest t) out of `steps`,
/// always including the first and the last.
pub fn trajectory_steps(steps: usize, count: usize) -> Vec<usize> {
    if steps == 0 || count == 0 {
        return Vec::new();
    }
    if count == 1 || steps == 1 {
        return vec![steps - 1];
    }
    let mut v: Vec<usize> = (0..count)
        .map(|j| ((j * (steps - 1)) as f64 / (count - 1) as f64).round() as usize)
        .collect();
    v.dedup();
    v
}

/// The predicted x_0 at the captured steps and the final sample: a PNG grid (one row per image,
/// one column per step, the final sample last) or an .npz (`arr_0` uint8 (K, N, H, W, C) of the
/// predictions, `t` their original timesteps, `sample` the final images, `arr_1` the labels).
fn write_trajectory(path: &Path, snapshots: &[(usize, Tensor)], last: &Tensor, labels: &[i64]) -> Result<()> {
    if OutputFormat::of(path) == OutputFormat::Npz {
        let frames = snapshots.iter().map(|(_, x)| to_u8_nhwc_signed(x)).collect::<Result<Vec<_>>>()?;
        let frames = Tensor::stack(&frames, 0)?;
        let t = Tensor::from_vec(snapshots.iter().map(|(t, _)| *t as i64).collect::<Vec<_>>(), snapshots.len(), &Device::Cpu)?;
        let sample = to_u8_nhwc_signed(last)?;
        let labels = Tensor::from_vec(labels.to_vec(), labels.len(), &Device::Cpu)?;
        npz::write(path, &[("arr_0", &frames), ("t", &t), ("sample", &sample), ("arr_1", &labels)])
    } else {
        let mut columns = snapshots.iter().map(|(_, x)| to_unit(x)).collect::<Result<Vec<_>>>()?;
        columns.push(to_unit(last)?);
        let columns = columns.into_iter().map(|c| c.to_device(&Device::Cpu)).collect::<candle_core::Result<Vec<_>>>()?;
        crate::grid::save_columns(path, &columns).context("writing the trajectory grid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trajectory_steps_are_evenly_spaced_with_both_ends() {
        assert_eq!(trajectory_steps(250, 5), vec![0, 62, 125, 187, 249]);
        assert_eq!(trajectory_steps(3, 10), vec![0, 1, 2]);
        assert_eq!(trajectory_steps(10, 1), vec![9]);
    }

    #[test]
    fn pixels_convert_like_guided_diffusion() -> Result<()> {
        let x = Tensor::new(&[-1.5f32, -1.0, 0.0, 0.999, 1.0, 2.0], &Device::Cpu)?.reshape((1, 1, 2, 3))?;
        let x = x.repeat((1, 3, 1, 1))?;
        let u: Vec<u8> = to_u8_nhwc_signed(&x)?.flatten_all()?.to_vec1::<u8>()?.into_iter().step_by(3).collect();
        // (x + 1) * 127.5 truncated: 0 -> 127 (not 128), 0.999 -> 254
        assert_eq!(u, vec![0, 0, 127, 254, 255, 255]);
        Ok(())
    }

    #[test]
    fn class_choices() -> Result<()> {
        let job = |classes: &str, num: usize| SampleJob {
            model: String::new(),
            classifier: None,
            guidance: GuidanceKind::None,
            scale: 0.0,
            num,
            batch_size: 1,
            classes: classes.parse().unwrap(),
            timestep_respacing: "10".into(),
            sampler: SamplerKind::Ancestral,
            eta: 0.0,
            seed: 3,
            init_noise: None,
            output: PathBuf::new(),
            grid: None,
            trajectory: None,
            trajectory_steps: 10,
            trajectory_images: 8,
            shard: Shard::WHOLE,
            dtype: DType::F32,
            clip_denoised: true,
        };
        let names: Vec<String> = ["cat", "dog", "fox"].iter().map(|s| s.to_string()).collect();
        assert_eq!(job("all", 5).labels(Some(3), &names)?, vec![0, 1, 2, 0, 1]);
        assert_eq!(job("fox,0", 3).labels(Some(3), &names)?, vec![2, 0, 2]);
        let r = job("random", 50).labels(Some(3), &names)?;
        assert!(r.iter().all(|&l| (0..3).contains(&l)) && r.iter().any(|&l| l != r[0]));
        assert_eq!(r, job("random", 50).labels(Some(3), &names)?);
        assert!(job("7", 1).labels(Some(3), &names).unwrap_err().to_string().contains("out of range"));
        assert!(job("wolf", 1).labels(Some(3), &names).unwrap_err().to_string().contains("`wolf`"));
        assert_eq!(job("all", 2).labels(None, &names)?, vec![-1, -1]);
        assert!(job("1", 2).labels(None, &names).is_err());
        Ok(())
    }
}
