//! `cargo xtask bench`: the workloads of the performance issue, each run in the PyTorch reference
//! and in bigroc back to back (same thread count, same shapes, same weights), printed as one
//! markdown table with throughputs, their ratio and the achieved GFLOP/s. The two sides alternate
//! (`--rounds`, default 3: PyTorch, bigroc, PyTorch, ...), because this machine's speed drifts by
//! 10-30% over minutes (PyTorch's training step measured 39.4 and 30.0 img/s 25 minutes apart):
//! each side reports its median over the rounds, and the ratio is the median of the rounds' ratios.
//!
//! | row | reference script | bigroc side |
//! | --- | --- | --- |
//! | `refine-cifar50`, `refine-imagenet50` | `bench_refine.py` (robustness' Attacker) | `examples/refine_throughput.rs` |
//! | `guided-step` | `bench_guided_step.py` (guided-diffusion's `p_sample`) | `examples/guided_step_throughput.rs` |
//! | `train-step` | `bench_train_step.py` (robustness' `train._model_loop`) | `examples/train_step_throughput.rs` |
//!
//! Each script prints one JSON line: median seconds per unit of work (a batch, or a step) after a
//! warm-up, and the FLOPs of one unit counted by `torch.utils.flop_counter.FlopCounterMode` during
//! the warm-up (`xtask/reference/bench_common.py`). The reference scripts write their random weights
//! into `target/bench/`, and bigroc's side loads them. Without a reference interpreter, bigroc's
//! side still runs (on weights drawn by itself) and the PyTorch and FLOP columns say why they are
//! empty.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cargo;

/// 2 cores x 2.45 GHz x 32 f32 FLOP per cycle (two AVX2 FMA units, 8 lanes, 2 FLOPs each).
pub const DEFAULT_CPU_PEAK_GFLOPS: f64 = 157.0;

const NO_REFERENCE: &str = "reference not available (run `cargo xtask venv` or set BIGROC_PYTHON)";

pub struct Options {
    pub reps: usize,
    /// Alternating rounds (PyTorch, bigroc) per workload.
    pub rounds: usize,
    pub threads: Option<usize>,
    pub only: Option<String>,
    pub device: String,
    pub peak_gflops: Option<f64>,
    /// Compute dtype of the guided-step row (f32, f16, bf16); the other rows are f32 only.
    pub dtype: String,
}

/// One row of the table.
struct Workload {
    /// What `--only` matches.
    name: &'static str,
    title: &'static str,
    /// Images per unit of work (throughput in img/s), or None (one sampling step, in s/step).
    images: Option<usize>,
    /// bigroc's side runs on the random weights the reference script writes (else on weights
    /// both sides read from the repository).
    weights_from_reference: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "refine-cifar50", title: "refine, cifar ResNet-50, 32x32, batch 32, 7 L2 steps", images: Some(32), weights_from_reference: true },
    Workload { name: "refine-imagenet50", title: "refine, imagenet ResNet-50, 128x128, batch 8, 7 L2 steps", images: Some(8), weights_from_reference: true },
    Workload { name: "guided-step", title: "guided sampling step, CIFAR-10 ADM + time-dependent classifier, batch 16", images: None, weights_from_reference: true },
    Workload {
        name: "train-step",
        title: "adversarial training step, ResNet-18 w0.5 (embedded classifier), batch 128, 3-step L2 PGD + SGD",
        images: Some(128),
        weights_from_reference: false,
    },
];

/// The reference interpreter: $BIGROC_PYTHON, else .venv/bin/python; None when neither is there.
fn reference_python(root: &Path) -> Option<PathBuf> {
    let p = std::env::var_os("BIGROC_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    p.is_file().then_some(p)
}

/// Runs `cmd`, which prints one JSON line last on stdout; the error carries the end of its stderr.
fn json_line(mut cmd: Command) -> Result<Value> {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    eprintln!("+ {} {}", cmd.get_program().to_string_lossy(), args.join(" "));
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        bail!("{} failed ({}):\n{}", cmd.get_program().to_string_lossy(), out.status, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).with_context(|| format!("no JSON line in the output: {stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("bad JSON line: {line}"))
}

/// The example that is bigroc's side of `w`.
fn example(w: &Workload) -> &'static str {
    match w.name {
        "guided-step" => "guided_step_throughput",
        "train-step" => "train_step_throughput",
        _ => "refine_throughput",
    }
}

fn reference_cmd(python: &Path, root: &Path, w: &Workload, out: &Path, threads: usize, o: &Options) -> Command {
    let script = match w.name {
        "guided-step" => "bench_guided_step.py",
        "train-step" => "bench_train_step.py",
        _ => "bench_refine.py",
    };
    let mut cmd = Command::new(python);
    cmd.arg(root.join("xtask/reference").join(script))
        .args(["--threads", &threads.to_string(), "--reps", &o.reps.to_string(), "--device", &o.device])
        .current_dir(root);
    match w.name {
        "guided-step" => cmd.arg("--out").arg(out).args(["--batch", "16", "--dtype", &o.dtype]),
        "train-step" => cmd.args(["--batch", "128"]),
        name => cmd.arg("--out").arg(out).args(["--only", name]),
    };
    cmd
}

/// bigroc's side; `shared` says the reference has just written this workload's weights into `out`.
fn bigroc_cmd(root: &Path, w: &Workload, out: &Path, threads: usize, o: &Options, shared: bool) -> Command {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "bigroc", "--example"])
        .current_dir(root)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string());
    let (reps, dev) = (o.reps.to_string(), o.device.as_str());
    match w.name {
        "guided-step" => {
            cmd.args([example(w), "--", "16", &reps, dev]);
            if shared {
                cmd.arg(out.join("guided_unet.safetensors")).arg(out.join("guided_classifier.safetensors"));
            }
            cmd.args(["--dtype", &o.dtype]);
        }
        "train-step" => {
            cmd.args([example(w), "--", "128", &reps, dev]);
        }
        name => {
            let net = name.trim_start_matches("refine-");
            let (batch, size) = if net == "cifar50" { ("32", "32") } else { ("8", "128") };
            cmd.args([example(w), "--"]);
            if shared {
                cmd.arg(out.join(format!("{net}.safetensors")));
            } else {
                cmd.arg(format!("random:{net}"));
            }
            cmd.args([batch, size, &reps, dev]);
        }
    }
    cmd
}

/// A side's outcome for one row: seconds per unit, or why there is none.
type Outcome = std::result::Result<Value, String>;

/// The median (the upper one of an even count), or None without values.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// One side's rounds as one outcome: the first successful run's report with `seconds` replaced by
/// the median over the successful rounds; the first failure if none succeeded.
fn combine(runs: Vec<Outcome>) -> Outcome {
    let times: Vec<f64> = runs.iter().filter_map(seconds).collect();
    let mut first_ok = None;
    let mut first_err = None;
    for run in runs {
        match run {
            Ok(v) if first_ok.is_none() => first_ok = Some(v),
            Err(e) if first_err.is_none() => first_err = Some(e),
            _ => {}
        }
    }
    match (first_ok, median(times)) {
        (Some(mut v), Some(s)) => {
            v["seconds"] = Value::from(s);
            Ok(v)
        }
        (Some(v), None) => Ok(v),
        (None, _) => Err(first_err.unwrap_or_else(|| "no runs".into())),
    }
}

fn seconds(v: &Outcome) -> Option<f64> {
    v.as_ref().ok()?["seconds"].as_f64().filter(|s| *s > 0.0)
}

fn throughput(w: &Workload, v: &Outcome) -> String {
    match (v, seconds(v)) {
        (_, Some(s)) => match w.images {
            Some(n) => format!("{:.2} img/s", n as f64 / s),
            None => format!("{s:.2} s/step"),
        },
        (Err(why), None) => why.clone(),
        (Ok(_), None) => "no time reported".into(),
    }
}

pub fn bench(root: &Path, o: Options) -> Result<()> {
    let selected: Vec<&Workload> = WORKLOADS.iter().filter(|w| o.only.as_ref().is_none_or(|s| w.name.contains(s.as_str()))).collect();
    if selected.is_empty() {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        bail!("--only {:?} matches no workload (workloads: {})", o.only.as_deref().unwrap_or(""), names.join(", "));
    }
    if o.reps == 0 || o.rounds == 0 {
        bail!("--reps and --rounds must be at least 1");
    }
    if !["f32", "f16", "bf16"].contains(&o.dtype.as_str()) {
        bail!("--dtype {}: expected f32, f16 or bf16", o.dtype);
    }
    if o.dtype != "f32" && selected.iter().any(|w| w.name != "guided-step") {
        bail!("--dtype {}: only the guided-step row computes in another dtype than f32; add --only guided-step", o.dtype);
    }
    let threads = o.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let peak = o.peak_gflops.or((o.device == "cpu").then_some(DEFAULT_CPU_PEAK_GFLOPS));
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let python = reference_python(root);
    if python.is_none() {
        eprintln!("{NO_REFERENCE}: timing bigroc alone, on weights it draws itself");
    }

    // Build bigroc's side once, with its progress on the terminal (the runs below are quiet).
    let mut build = cargo();
    build.args(["build", "--release", "-p", "bigroc"]).current_dir(root);
    let mut examples: Vec<&str> = selected.iter().map(|w| example(w)).collect();
    examples.dedup();
    for e in examples {
        build.args(["--example", e]);
    }
    eprintln!("+ cargo {}", build.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    if !build.status().context("running cargo build")?.success() {
        bail!("building bigroc's benchmark examples failed");
    }

    let mut rows = Vec::new();
    for w in &selected {
        let (mut reference_runs, mut our_runs) = (Vec::new(), Vec::new());
        for round in 0..o.rounds {
            eprintln!("{}: round {}/{}", w.name, round + 1, o.rounds);
            let reference: Outcome = match &python {
                None => Err(NO_REFERENCE.into()),
                Some(_) if o.dtype == "bf16" => Err("guided-diffusion has no bf16 mode".into()),
                Some(py) => json_line(reference_cmd(py, root, w, &out, threads, &o)).map_err(|e| {
                    eprintln!("{}: {e:#}", w.name);
                    "reference failed (see above)".to_string()
                }),
            };
            let ours: Outcome = json_line(bigroc_cmd(root, w, &out, threads, &o, reference.is_ok())).map_err(|e| {
                eprintln!("{}: {e:#}", w.name);
                "bigroc failed (see above)".to_string()
            });
            for (side, v) in [("PyTorch", &reference), ("bigroc", &ours)] {
                if let Some(t) = v.as_ref().ok().and_then(|v| v["threads"].as_u64()) {
                    if o.device == "cpu" && t as usize != threads {
                        eprintln!("warning: {}: {side} ran with {t} threads, not {threads}", w.name);
                    }
                }
            }
            reference_runs.push(reference);
            our_runs.push(ours);
        }
        let ratios: Vec<f64> = reference_runs
            .iter()
            .zip(&our_runs)
            .filter_map(|(r, s)| Some(seconds(r)? / seconds(s)?))
            .collect();
        rows.push((w, combine(reference_runs), combine(our_runs), ratios));
    }

    let torch = rows.iter().find_map(|(_, r, _, _)| r.as_ref().ok()?["torch"].as_str().map(String::from));
    let torch = torch.map(|v| format!("PyTorch {v}")).unwrap_or_else(|| "PyTorch".into());
    let pct = |v: f64| peak.map(|p| format!("{:.1}%", 100.0 * v / p)).unwrap_or_else(|| "-".into());
    println!();
    println!(
        "| workload ({}) | {torch} ({threads} threads) | bigroc ({}, {threads} threads) | ratio bigroc/PyTorch (>1 = bigroc faster) | GFLOP per unit | PyTorch GFLOP/s | bigroc GFLOP/s | bigroc % of peak |",
        o.dtype, o.device
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut failed = Vec::new();
    for (w, reference, ours, ratio) in &rows {
        let (rs, os) = (seconds(reference), seconds(ours));
        // The median, then every round's ratio when there were several.
        let ratio = match median(ratio.clone()) {
            Some(m) if ratio.len() > 1 => {
                format!("{m:.2} ({})", ratio.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "))
            }
            Some(m) => format!("{m:.2}"),
            None => "-".into(),
        };
        let gflop = reference.as_ref().ok().and_then(|v| v["flops"].as_f64()).filter(|f| *f > 0.0).map(|f| f / 1e9);
        let unit = if w.images.is_some() { "batch" } else { "step" };
        let (gflop_cell, ref_rate, our_rate, our_pct) = match gflop {
            Some(g) => (
                format!("{g:.1} / {unit}"),
                rs.map(|s| format!("{:.1}", g / s)).unwrap_or_else(|| "-".into()),
                os.map(|s| format!("{:.1}", g / s)).unwrap_or_else(|| "-".into()),
                os.map(|s| pct(g / s)).unwrap_or_else(|| "-".into()),
            ),
            None => ("- (counted by the reference)".into(), "-".into(), "-".into(), "-".into()),
        };
        let weights = if w.weights_from_reference && reference.is_err() { " (bigroc: its own random weights)" } else { "" };
        println!(
            "| {}{weights} | {} | {} | {ratio} | {gflop_cell} | {ref_rate} | {our_rate} | {our_pct} |",
            w.title,
            throughput(w, reference),
            throughput(w, ours)
        );
        if ours.is_err() || (python.is_some() && reference.is_err()) {
            failed.push(w.name);
        }
    }
    println!();
    println!(
        "Units: img/s (higher is better) for the refine and training rows, s/step (lower is better) for the guided \
         sampling step; the ratio is PyTorch's time over bigroc's for the same unit of work. {} alternating rounds \
         (PyTorch, then bigroc, each a fresh process: one warm-up run, then the median of {} timed runs); each side's \
         figure is its median over the rounds, the ratio the median of the rounds' ratios (each round's in brackets). Both sides ran with {threads} \
         threads on the same shapes and, where the reference ran, the same weights.",
        o.rounds, o.reps
    );
    println!(
        "FLOPs: counted once per workload on the PyTorch side with torch.utils.flop_counter.FlopCounterMode during its \
         warm-up run: convolutions and matrix products only (forward, and the backward actually executed), 2 FLOPs per \
         multiply-add; elementwise ops, normalization, softmax and reductions are not counted. Both sides' GFLOP/s use \
         that count. Refine: robustness' AttackerModel also runs one more forward, of the attacked batch, for the \
         logits it returns (1/16 of its FLOPs); that forward is in its time but not in the count, which is of the \
         work both sides do. On CPU bigroc does the wide 3x3 convolutions with Winograd: F(4x4, 3x3) for 64 or more \
         channels each way on maps of 32x32 and up (36 multiply-adds per 4x4 tile where the count has 144), \
         F(2x2, 3x3) for the others of 128 or more channels, or 64 on maps of 16x16 and up (16 where the count has \
         36), so its GFLOP/s (and share of the peak) are those of the direct convolution it replaces and can pass 100%."
    );
    match (peak, o.peak_gflops) {
        (Some(p), Some(_)) => println!("Peak: {p} GFLOP/s (--peak-gflops)."),
        (Some(p), None) => println!(
            "Peak: {p} GFLOP/s in f32 (2 cores x 2.45 GHz x 32 FLOP/cycle with AVX2 FMA; set --peak-gflops for another machine)."
        ),
        (None, _) => println!("Peak: not known for {} (pass --peak-gflops).", o.device),
    }
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    if !load.is_empty() {
        println!("Load average before the run (1, 5, 15 min): {}.", load.join(" "));
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
