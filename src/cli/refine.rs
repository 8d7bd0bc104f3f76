//! `bigroc refine`: BIGRoC on a folder of images or a sample .npz.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use bigroc::refine::job::RefineJob;
use bigroc::refine::{EpsScale, LabelMode, Norm, RefineSettings};
use bigroc::shard::Shard;

#[derive(Debug, Args)]
pub struct RefineArgs {
    /// Images to refine: a folder (searched recursively; png, jpeg, webp) or a sample .npz
    /// (`arr_0` uint8 NHWC, optional `arr_1` labels).
    #[arg(long)]
    input: PathBuf,
    /// Where to write: a folder of PNGs mirroring the input, or an .npz (`arr_0`, `arr_1`).
    #[arg(long)]
    output: PathBuf,
    /// Classifier weights (.safetensors path or hf://OWNER/REPO/FILE); default: the embedded one.
    #[arg(long)]
    classifier: Option<String>,
    /// Radius of the perturbation, in the units --eps-scale names; default: the classifier's
    /// recommended eps.
    #[arg(long)]
    eps: Option<f64>,
    /// Whether --eps and --step-size are measured for pixels in [0,1] (unit) or in [-1,1] (signed,
    /// the unit of the BIGRoC paper's "normalization" column; half as large in [0,1]).
    #[arg(long, value_enum, default_value_t = EpsScale::Unit)]
    eps_scale: EpsScale,
    #[arg(long, value_enum, default_value_t = Norm::L2)]
    norm: Norm,
    #[arg(long, default_value_t = 7)]
    steps: usize,
    /// Default: 1.5 * eps / steps.
    #[arg(long)]
    step_size: Option<f64>,
    /// Return the last iterate instead of each image's lowest-loss iterate.
    #[arg(long)]
    last_iterate: bool,
    /// Target classes: gt (stored labels), pseudo (the classifier's debiased argmax), auto (gt if any).
    #[arg(long, value_enum, default_value_t = LabelMode::Auto)]
    labels: LabelMode,
    /// Ground-truth labels in input order: .npy of integers or one integer per line.
    #[arg(long)]
    labels_file: Option<PathBuf>,
    /// Debias vector for pseudo labels (.npy from `bigroc calibrate`).
    #[arg(long)]
    debias: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Resize inputs to N or HxW first (bicubic).
    #[arg(long, value_parser = super::parse_size)]
    resize: Option<(usize, usize)>,
    /// Refine only slice K of N (K from 0), e.g. one task of a Slurm array.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Also save a PNG grid: generated | refined | contrast-stretched difference.
    #[arg(long)]
    grid: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    grid_rows: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write the run's summary as JSON here.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

pub fn run(a: RefineArgs) -> Result<()> {
    let device = bigroc::device::parse_device(&a.device)?;
    let job = RefineJob {
        input: a.input,
        output: a.output,
        classifier: bigroc::defaults::classifier_spec(a.classifier)?,
        settings: RefineSettings {
            norm: a.norm,
            eps: a.eps,
            eps_scale: a.eps_scale,
            steps: a.steps,
            step_size: a.step_size,
            use_best: !a.last_iterate,
        },
        labels: a.labels,
        labels_file: a.labels_file,
        debias: a.debias,
        batch_size: a.batch_size,
        resize: a.resize,
        shard: a.shard,
        grid: a.grid,
        grid_rows: a.grid_rows,
    };
    let s = job.run(&device)?;
    let after = s.mean_target_prob_after.map(|p| format!(" -> {p:.4}")).unwrap_or_default();
    println!(
        "refined {} images ({} in this run) into {} in {:.1} s ({:.2} img/s); {} labels; mean target-class probability {:.4}{after}",
        s.images,
        s.refined_now,
        s.output.display(),
        s.seconds,
        s.refined_now as f64 / s.seconds.max(1e-9),
        if s.used_ground_truth { "ground-truth" } else { "pseudo" },
        s.mean_target_prob_before,
    );
    if let Some(path) = a.summary_json {
        bigroc::output::atomic_write(&path, |tmp| Ok(std::fs::write(tmp, serde_json::to_string_pretty(&s)?)?))?;
    }
    Ok(())
}
