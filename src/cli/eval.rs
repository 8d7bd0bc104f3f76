//! `bigroc eval`: FID, precision/recall and Inception Score of samples against a reference.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use bigroc::eval::pipeline::{
    compute_metrics, load_side, EvalReport, Metric, Needs,
};
use bigroc::eval::Selection;
use clap::Args;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Samples: image folder, sample .npz (`arr_0`), .tar of an image folder, or a stats .npz.
    #[arg(long)]
    samples: PathBuf,
    /// Reference: the same kinds of input (typically a `bigroc stats` file, or OpenAI's
    /// reference batch .npz).
    #[arg(long)]
    reference: PathBuf,
    /// Comma-separated: fid, precision, recall, is.
    #[arg(long, value_delimiter = ',', default_value = "fid,precision,recall,is")]
    metrics: Vec<Metric>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these samples, as START:END[:STEP] (e.g. 0:5000, 0::2).
    #[arg(long)]
    samples_subset: Option<Selection>,
    /// Only these reference images, as START:END[:STEP].
    #[arg(long)]
    reference_subset: Option<Selection>,
    #[command(flatten)]
    network: super::InceptionArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let start = Instant::now();
    let net = a.network.network()?;
    let needs = Needs {
        features: a
            .metrics
            .iter()
            .any(|m| matches!(m, Metric::Precision | Metric::Recall)),
    };
    let mut sides = vec![];
    for (what, path, subset) in [
        ("samples", &a.samples, a.samples_subset),
        ("reference", &a.reference, a.reference_subset),
    ] {
        // IS needs the samples' logits, which only a network pass gives.
        let needs = Needs {
            features: needs.features || (what == "samples" && a.metrics.contains(&Metric::Is)),
        };
        let mut bar = bigroc::progress::ImageProgress::new(what);
        let side = load_side(
            path,
            subset.unwrap_or_default(),
            needs,
            &net,
            a.network.batch(),
            &mut |done, total| {
                bar.update(done, total);
            },
        )?;
        bar.finish();
        tracing::info!("{what}: {} ({} images)", path.display(), side.count);
        sides.push(side);
    }
    let (samples, reference) = (&sides[0], &sides[1]);
    let has_logits = net.loaded().map(|n| n.has_logits());
    let mut report = EvalReport {
        samples: a.samples.display().to_string(),
        samples_count: samples.count,
        reference: a.reference.display().to_string(),
        reference_count: reference.count,
        inception: net
            .loaded()
            .map(|n| n.path.display().to_string())
            .unwrap_or_else(|| "not needed".into()),
        ..Default::default()
    };
    compute_metrics(samples, reference, &a.metrics, has_logits, &mut report)?;
    report.seconds = start.elapsed().as_secs_f64();
    print_table(&report);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        bigroc::output::atomic_write(path, |tmp| Ok(std::fs::write(tmp, &text)?))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(r: &EvalReport) {
    let count = |n: usize| {
        if n == 0 {
            "stats file".to_string()
        } else {
            n.to_string()
        }
    };
    println!("samples    {} ({})", r.samples, count(r.samples_count));
    println!("reference  {} ({})", r.reference, count(r.reference_count));
    println!("{:<10} {:>12}", "metric", "value");
    if let Some(v) = r.fid {
        println!("{:<10} {:>12.4}", "FID", v);
    }
    if let Some(v) = r.precision {
        println!("{:<10} {:>12.4}", "precision", v);
    }
    if let Some(v) = r.recall {
        println!("{:<10} {:>12.4}", "recall", v);
    }
    if let (Some(m), Some(s)) = (r.inception_score, r.inception_score_std) {
        println!("{:<10} {:>12.4} ± {:.4}", "IS", m, s);
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    println!("time       {:.1} s", r.seconds);
}
