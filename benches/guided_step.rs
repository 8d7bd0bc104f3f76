//! One classifier-guided ancestral sampling step of the robust-guidance paper's CIFAR-10
//! configuration (improved-diffusion UNet, 128 channels, 3 res blocks; time-dependent classifier
//! of width 32; 250 respaced steps) at batch 16, random weights, f32 on the CPU.
//!
//!     cargo bench --bench guided_step
//!
//! Next to its own measurement it runs the PyTorch reference for the same step
//! (`xtask/reference/bench_guided_step.py`, with as many threads as candle uses) and prints both
//! times and their ratio. Set `BIGROC_REF_PYTHON` to the reference interpreter (default
//! `/tmp/refvenv/bin/python`); without it only bigroc is timed. `cargo xtask bench --only guided`
//! runs the same step (examples/guided_step_throughput.rs) in its table, on the very same weights.

#[path = "support/guided_step.rs"]
mod guided_step;

use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use guided_step::{setup, step};

const BATCH: usize = 16;

fn reference_seconds(threads: usize) -> Option<f64> {
    let python = std::env::var("BIGROC_REF_PYTHON").unwrap_or_else(|_| "/tmp/refvenv/bin/python".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/xtask/reference/bench_guided_step.py");
    let out = Command::new(&python)
        .args([script, "--batch", &BATCH.to_string(), "--threads", &threads.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["seconds"].as_f64()),
        Ok(o) => {
            eprintln!("reference benchmark failed: {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("reference benchmark skipped: cannot run {python}: {e}");
            None
        }
    }
}

fn bench(c: &mut Criterion) {
    let s = setup(BATCH, None, candle_core::DType::F32, &Device::Cpu).expect("benchmark setup");
    step(&s).expect("warm-up step");
    let mut group = c.benchmark_group("guided_step");
    group.sample_size(10);
    group.bench_function("cifar10_batch16_f32", |b| b.iter(|| step(&s).unwrap()));
    group.finish();

    // side by side with the reference, same thread count, median of 5 each
    let threads = candle_core::utils::get_num_threads();
    let mut ours = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        step(&s).unwrap();
        ours.push(t0.elapsed().as_secs_f64());
    }
    ours.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ours = ours[2];
    println!("guided step, CIFAR-10 config, batch {BATCH}, {threads} threads: bigroc {ours:.3} s");
    if let Some(theirs) = reference_seconds(threads) {
        println!(
            "guided step, CIFAR-10 config, batch {BATCH}, {threads} threads: PyTorch reference {theirs:.3} s; bigroc/reference = {:.2}",
            ours / theirs
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
