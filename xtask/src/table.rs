//! `cargo xtask guidance-table`: the sampling issue's table. One diffusion model samples the same
//! seeds unguided and guided by a vanilla and by a robust time-dependent classifier at several
//! scales; each row's samples get FID and precision/recall against one reference.
//!
//! Every row is two `bigroc` runs, `sample` then `eval --json`, so the table measures exactly what a
//! user's commands give. A row is finished when its `ROW.eval.json` exists: a rerun skips finished
//! rows, evaluates sampled ones and lets `sample` continue an interrupted row's output, so the table
//! survives a GPU lease ending mid-row. `table.md` is rewritten after every row.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

#[derive(clap::Args)]
pub struct Options {
    /// The bigroc command, split on whitespace (on a GPU machine: `.device/.../run-on-gpu.sh bigroc`).
    #[arg(long, default_value = "target/release/bigroc")]
    pub bigroc: String,
    /// Diffusion model weights (`sample --model`).
    #[arg(long)]
    pub model: String,
    /// The vanilla time-dependent classifier.
    #[arg(long)]
    pub vanilla: String,
    /// The robust time-dependent classifier.
    #[arg(long)]
    pub robust: String,
    /// FID reference: a `bigroc stats` file of the training images (with features, for
    /// precision/recall), or any input `bigroc eval --reference` reads.
    #[arg(long)]
    pub reference: PathBuf,
    /// FID Inception weights (default: $BIGROC_INCEPTION).
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Rows' samples, grids and JSON results, and table.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Samples per row.
    #[arg(long, default_value_t = 5000)]
    pub num: usize,
    /// Guidance scales of each classifier.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,1,2")]
    pub scales: Vec<f64>,
    #[arg(long = "timestep-respacing", default_value = "ddim50")]
    pub respacing: String,
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Inception batch size of `eval`.
    #[arg(long, default_value_t = 250)]
    pub eval_batch_size: usize,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Compute dtype of the sampling networks (f32, f16, bf16).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Finished rows from an earlier machine (a folder with the table's settings.json and its rows'
    /// ROW.eval.json, ROW.sample.json and ROW.png, e.g. committed after a GPU lease ended): copied
    /// into --out when made with this table's settings (the same weights by content), so a table
    /// longer than one lease goes on where the last stopped; a folder of other settings is ignored,
    /// saying why.
    #[arg(long)]
    pub carry_rows: Option<PathBuf>,
}

/// One row: no guidance, or one classifier at one scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub guidance: &'static str,
    pub scale: Option<f64>,
}

impl Row {
    /// File stem of the row's outputs: `none`, `vanilla-0.25`, `robust-1`.
    pub fn name(&self) -> String {
        match self.scale {
            None => self.guidance.to_string(),
            Some(s) => format!("{}-{s}", self.guidance),
        }
    }
}

/// The rows in table order: none, then vanilla at each scale, then robust at each scale.
pub fn rows(scales: &[f64]) -> Vec<Row> {
    let mut rows = vec![Row { guidance: "none", scale: None }];
    for guidance in ["vanilla", "robust"] {
        rows.extend(scales.iter().map(|&s| Row { guidance, scale: Some(s) }));
    }
    rows
}

pub fn guidance_table(o: &Options) -> Result<()> {
    if o.scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
        bail!("--scales {:?}: every scale must be a finite number >= 0", o.scales);
    }
    for (flag, path) in [("--model", &o.model), ("--vanilla", &o.vanilla), ("--robust", &o.robust)] {
        if !path.starts_with("hf://") && !path.starts_with("embedded:") && !Path::new(path).is_file() {
            bail!("{flag} {path}: no such file");
        }
    }
    if !o.reference.exists() {
        bail!("--reference {}: no such file", o.reference.display());
    }
    fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    check_settings(o)?;
    let all = rows(&o.scales);
    if let Some(dir) = &o.carry_rows {
        carry_rows(o, dir, &all)?;
    }
    for (i, row) in all.iter().enumerate() {
        let name = row.name();
        if o.out.join(format!("{name}.eval.json")).is_file() {
            eprintln!("[{}/{}] {name}: done before, skipped", i + 1, all.len());
            continue;
        }
        eprintln!("[{}/{}] {name}", i + 1, all.len());
        let started = Instant::now();
        // `sample` writes its output once complete (and refuses an existing one): a row whose
        // evaluation failed keeps its samples.
        if !o.out.join(format!("{name}.npz")).is_file() {
            run_bigroc(o, &sample_args(o, row))?;
        }
        run_bigroc(o, &eval_args(o, row))?;
        eprintln!("[{}/{}] {name}: {:.1} s", i + 1, all.len(), started.elapsed().as_secs_f64());
        write_table(o, &all)?;
    }
    write_table(o, &all)?;
    eprintln!("{}", o.out.join("table.md").display());
    Ok(())
}

/// What the rows' numbers depend on (the scales are per row, so rows may be added later). Weights
/// are named by content: their paths differ between a lease's own runs and the repository.
fn settings(o: &Options) -> Result<Value> {
    Ok(serde_json::json!({
        "model": identity(&o.model)?, "vanilla": identity(&o.vanilla)?, "robust": identity(&o.robust)?,
        "reference": o.reference.display().to_string(), "num": o.num, "timestep_respacing": o.respacing,
        "seed": o.seed, "dtype": o.dtype,
    }))
}

/// A weights argument as [`settings`] records it: `sha256:HEX` of a local file, else the argument
/// itself (`hf://...`, `embedded:...`).
fn identity(weights: &str) -> Result<String> {
    let path = Path::new(weights);
    Ok(if path.is_file() { format!("sha256:{}", crate::lease::sha256(path)?) } else { weights.to_string() })
}

/// The settings that differ between two `settings.json` values, as `key: BEFORE before, NOW now`.
fn differences(before: &Value, now: &Value) -> Vec<String> {
    now.as_object()
        .expect("an object")
        .iter()
        .filter(|(k, v)| before.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k}: {} before, {v} now", before.get(k.as_str()).unwrap_or(&Value::Null)))
        .collect()
}

/// Refuses to add rows made with other settings to a table's folder; records them on first use.
fn check_settings(o: &Options) -> Result<()> {
    let path = o.out.join("settings.json");
    let now = settings(o)?;
    match read_json(&path)? {
        None => crate::write_atomically(&path, serde_json::to_string_pretty(&now)?.as_bytes()),
        Some(before) => {
            let differing = differences(&before, &now);
            if differing.is_empty() {
                Ok(())
            } else {
                bail!("{} holds rows made with other settings ({}); use another --out", o.out.display(), differing.join("; "))
            }
        }
    }
}

/// Copies the finished rows of `dir` (see `--carry-rows`) that --out lacks, when `dir` was made with
/// this table's settings.
fn carry_rows(o: &Options, dir: &Path, all: &[Row]) -> Result<()> {
    let Some(before) = read_json(&dir.join("settings.json"))? else {
        eprintln!("--carry-rows {}: no settings.json there, nothing carried", dir.display());
        return Ok(());
    };
    let differing = differences(&before, &settings(o)?);
    if !differing.is_empty() {
        eprintln!("--carry-rows {}: rows of other settings ({}), not carried", dir.display(), differing.join("; "));
        return Ok(());
    }
    let mut carried = Vec::new();
    for row in all {
        let name = row.name();
        let finished = |folder: &Path| folder.join(format!("{name}.eval.json")).is_file();
        if !finished(dir) || finished(&o.out) {
            continue;
        }
        // The evaluation last: it is what marks the row finished.
        for ext in ["sample.json", "png", "eval.json"] {
            let from = dir.join(format!("{name}.{ext}"));
            if from.is_file() {
                let to = o.out.join(format!("{name}.{ext}"));
                fs::copy(&from, &to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
            }
        }
        carried.push(name);
    }
    eprintln!("--carry-rows {}: carried {} finished rows{}{}", dir.display(), carried.len(), if carried.is_empty() { "" } else { ": " }, carried.join(", "));
    Ok(())
}

fn sample_args(o: &Options, row: &Row) -> Vec<String> {
    let file = |ext: &str| o.out.join(format!("{}.{ext}", row.name())).display().to_string();
    let mut args: Vec<String> = vec!["sample".into(), "--guidance".into(), row.guidance.into()];
    if let Some(scale) = row.scale {
        let classifier = if row.guidance == "robust" { &o.robust } else { &o.vanilla };
        args.extend(["--scale".into(), scale.to_string(), "--classifier".into(), classifier.clone()]);
    }
    args.extend([
        "--model".into(),
        o.model.clone(),
        "--num".into(),
        o.num.to_string(),
        "--batch-size".into(),
        o.batch_size.to_string(),
        "--timestep-respacing".into(),
        o.respacing.clone(),
        "--seed".into(),
        o.seed.to_string(),
        "--device".into(),
        o.device.clone(),
        "--dtype".into(),
        o.dtype.clone(),
        "--output".into(),
        file("npz"),
        "--grid".into(),
        file("png"),
        "--summary-json".into(),
        file("sample.json"),
    ]);
    args
}

fn eval_args(o: &Options, row: &Row) -> Vec<String> {
    let file = |ext: &str| o.out.join(format!("{}.{ext}", row.name())).display().to_string();
    let mut args: Vec<String> = vec![
        "eval".into(),
        "--samples".into(),
        file("npz"),
        "--reference".into(),
        o.reference.display().to_string(),
        "--metrics".into(),
        "fid,precision,recall".into(),
        "--device".into(),
        o.device.clone(),
        "--batch-size".into(),
        o.eval_batch_size.to_string(),
        "--json".into(),
        file("eval.json"),
    ];
    if let Some(inception) = &o.inception {
        args.extend(["--inception".into(), inception.display().to_string()]);
    }
    args
}

fn run_bigroc(o: &Options, args: &[String]) -> Result<()> {
    let mut words = o.bigroc.split_whitespace();
    let program = words.next().context("--bigroc is empty")?;
    let mut cmd = Command::new(program);
    cmd.args(words).args(args);
    crate::run(&mut cmd)
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// What one row measured, read back from its `bigroc` JSON files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub fid: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// Sampling images/s of the run that finished the samples, and whether earlier runs helped.
    pub images_per_s: Option<f64>,
    pub resumed: bool,
    pub eval_seconds: Option<f64>,
}

fn measured(out: &Path, row: &Row) -> Result<Option<Measured>> {
    let Some(eval) = read_json(&out.join(format!("{}.eval.json", row.name())))? else { return Ok(None) };
    let sample = read_json(&out.join(format!("{}.sample.json", row.name())))?.unwrap_or_default();
    let now = sample["sampled_now"].as_u64().unwrap_or(0);
    Ok(Some(Measured {
        fid: eval["fid"].as_f64(),
        precision: eval["precision"].as_f64(),
        recall: eval["recall"].as_f64(),
        images_per_s: sample["seconds"].as_f64().filter(|_| now > 0).map(|s| now as f64 / s.max(1e-9)),
        resumed: now < sample["images"].as_u64().unwrap_or(0),
        eval_seconds: eval["seconds"].as_f64(),
    }))
}

fn write_table(o: &Options, rows: &[Row]) -> Result<()> {
    let measured = rows.iter().map(|r| measured(&o.out, r)).collect::<Result<Vec<_>>>()?;
    let mut text = String::new();
    writeln!(
        text,
        "{} samples per row (respacing {}, seed {}, {} on {}) of `{}` against `{}` ({}).\n",
        o.num,
        o.respacing,
        o.seed,
        o.dtype,
        o.device,
        o.model,
        o.reference.display(),
        o.inception.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "$BIGROC_INCEPTION".into())
    )?;
    writeln!(text, "Vanilla classifier `{}`, robust classifier `{}`.\n", o.vanilla, o.robust)?;
    text += &render(rows, &measured);
    crate::write_atomically(&o.out.join("table.md"), text.as_bytes())
}

/// The markdown table, then which scale of each classifier gave the lowest FID.
pub fn render(rows: &[Row], measured: &[Option<Measured>]) -> String {
    let num = |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into());
    let mut text = String::from("| guidance | scale | FID | precision | recall | sampling img/s | eval s |\n");
    text += "| --- | --- | --- | --- | --- | --- | --- |\n";
    for (row, m) in rows.iter().zip(measured) {
        let scale = row.scale.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        match m {
            None => writeln!(text, "| {} | {scale} | pending | | | | |", row.guidance).unwrap(),
            Some(m) => writeln!(
                text,
                "| {} | {scale} | {} | {} | {} | {}{} | {} |",
                row.guidance,
                num(m.fid, 2),
                num(m.precision, 3),
                num(m.recall, 3),
                num(m.images_per_s, 1),
                if m.resumed { " (resumed)" } else { "" },
                num(m.eval_seconds, 1)
            )
            .unwrap(),
        }
    }
    let best = |guidance: &str| {
        rows.iter()
            .zip(measured)
            .filter(|(r, _)| r.guidance == guidance)
            .filter_map(|(r, m)| Some((r.scale?, m.as_ref()?.fid?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    text += "\n";
    for guidance in ["vanilla", "robust"] {
        match best(guidance) {
            Some((scale, fid)) => writeln!(text, "Best {guidance}: scale {scale}, FID {fid:.2}.").unwrap(),
            None => writeln!(text, "Best {guidance}: no row finished yet.").unwrap(),
        }
    }
    if let (Some(v), Some(r)) = (best("vanilla"), best("robust")) {
        // Compared as printed: FIDs equal to two decimals are a tie, not a win.
        let (r_fid, v_fid) = ((r.1 * 100.0).round(), (v.1 * 100.0).round());
        let verdict = if r_fid < v_fid {
            "has a lower FID than"
        } else if r_fid == v_fid {
            "ties with"
        } else {
            "does not have a lower FID than"
        };
        writeln!(text, "Robust guidance at its best scale {verdict} vanilla at its best ({:.2} vs {:.2}).", r.1, v.1).unwrap();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_none_then_each_classifier_at_each_scale() {
        let names: Vec<String> = rows(&[0.25, 1.0]).iter().map(Row::name).collect();
        assert_eq!(names, ["none", "vanilla-0.25", "vanilla-1", "robust-0.25", "robust-1"]);
    }

    #[test]
    fn render_marks_pending_rows_and_picks_each_best_scale() {
        let rows = rows(&[0.5, 1.0]);
        let m = |fid: f64| Some(Measured { fid: Some(fid), precision: Some(0.5), recall: Some(0.25), images_per_s: Some(100.0), resumed: false, eval_seconds: Some(3.0) });
        let measured = vec![m(30.0), m(28.0), m(29.5), m(27.0), None];
        let text = render(&rows, &measured);
        assert!(text.contains("| none | - | 30.00 | 0.500 | 0.250 | 100.0 | 3.0 |"), "{text}");
        assert!(text.contains("| robust | 1 | pending |"), "{text}");
        assert!(text.contains("Best vanilla: scale 0.5, FID 28.00."), "{text}");
        assert!(text.contains("Best robust: scale 0.5, FID 27.00."), "{text}");
        assert!(text.contains("has a lower FID than vanilla at its best (27.00 vs 28.00)"), "{text}");
        // Equal as printed: a tie (the CPU rehearsal of lease.sh once called 587.70 "lower" than 587.70).
        let text = render(&rows, &[m(30.0), m(28.001), m(29.5), m(27.999), None]);
        assert!(text.contains("ties with vanilla at its best (28.00 vs 28.00)"), "{text}");
    }

    /// A table of 5,000 samples at scale 1 of the weights `[model, vanilla, robust]` into `out`.
    fn options([model, vanilla, robust]: [String; 3], out: &Path) -> Options {
        Options {
            bigroc: "bigroc".into(),
            model,
            vanilla,
            robust,
            reference: "ref.npz".into(),
            inception: None,
            out: out.to_path_buf(),
            num: 5000,
            scales: vec![1.0],
            respacing: "ddim50".into(),
            batch_size: 500,
            eval_batch_size: 250,
            device: "cuda".into(),
            dtype: "f32".into(),
            seed: 0,
            carry_rows: None,
        }
    }

    #[test]
    fn a_folder_refuses_rows_of_other_settings() {
        let out = std::env::temp_dir().join(format!("bigroc-table-settings-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        let mut o = options(["unet.safetensors".into(), "v.safetensors".into(), "r.safetensors".into()], &out);
        check_settings(&o).unwrap();
        o.scales = vec![0.5, 1.0];
        o.batch_size = 100;
        check_settings(&o).unwrap();
        o.num = 100;
        let err = check_settings(&o).unwrap_err().to_string();
        fs::remove_dir_all(&out).unwrap();
        assert!(err.contains("num: 5000 before, 100 now"), "{err}");
    }

    /// Rows carried from an earlier machine's folder count only when made with the same weights
    /// (by content, whatever their path) and settings; rows already here are kept.
    #[test]
    fn carried_rows_need_the_same_weights_and_settings() {
        let root = std::env::temp_dir().join(format!("bigroc-table-carry-{}", std::process::id()));
        let (earlier, out) = (root.join("earlier"), root.join("out"));
        for dir in [&earlier, &out] {
            fs::create_dir_all(dir).unwrap();
        }
        let weights = |name: &str, bytes: &[u8]| {
            let path = root.join(name);
            fs::write(&path, bytes).unwrap();
            path.display().to_string()
        };
        let mut o = options([weights("unet.safetensors", b"unet"), weights("v.safetensors", b"vanilla"), weights("r.safetensors", b"robust")], &earlier);
        check_settings(&o).unwrap();
        for (file, text) in [("none.eval.json", r#"{"fid": 30.0}"#), ("none.png", "png"), ("vanilla-1.eval.json", r#"{"fid": 20.0}"#)] {
            fs::write(earlier.join(file), text).unwrap();
        }
        // The same weights under another path, and a row already finished here.
        o.model = weights("unet-copy.safetensors", b"unet");
        o.out = out.clone();
        check_settings(&o).unwrap();
        fs::write(out.join("vanilla-1.eval.json"), r#"{"fid": 21.0}"#).unwrap();
        carry_rows(&o, &earlier, &rows(&o.scales)).unwrap();
        let fid = |row: &str| read_json(&out.join(format!("{row}.eval.json"))).unwrap().map(|v| v["fid"].as_f64().unwrap());
        assert_eq!((fid("none"), fid("vanilla-1"), fid("robust-1")), (Some(30.0), Some(21.0), None));
        assert!(out.join("none.png").is_file());
        // Other weights: nothing carried.
        let other = root.join("other");
        fs::create_dir_all(&other).unwrap();
        o.model = weights("unet2.safetensors", b"retrained");
        o.out = other.clone();
        check_settings(&o).unwrap();
        carry_rows(&o, &earlier, &rows(&o.scales)).unwrap();
        let carried = other.join("none.eval.json").is_file();
        fs::remove_dir_all(&root).unwrap();
        assert!(!carried, "rows of other weights were carried");
    }

    #[test]
    fn measured_reads_what_bigroc_wrote_and_notes_a_resumed_row() {
        let dir = std::env::temp_dir().join(format!("bigroc-table-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let row = Row { guidance: "robust", scale: Some(1.0) };
        assert_eq!(measured(&dir, &row).unwrap(), None);
        fs::write(dir.join("robust-1.eval.json"), r#"{"fid": 12.5, "precision": 0.6, "recall": null, "seconds": 4.0}"#).unwrap();
        fs::write(dir.join("robust-1.sample.json"), r#"{"images": 100, "sampled_now": 40, "seconds": 2.0}"#).unwrap();
        let got = measured(&dir, &row).unwrap().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, Measured { fid: Some(12.5), precision: Some(0.6), recall: None, images_per_s: Some(20.0), resumed: true, eval_seconds: Some(4.0) });
    }
}
