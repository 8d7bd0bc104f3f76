//! The timing of the `examples/*_throughput.rs` programs (the bigroc side of `cargo xtask bench`):
//! one warm-up run, then the median of `reps` timed runs, in seconds.

use std::time::Instant;

use anyhow::Result;

/// Runs `run` once untimed (first-use costs: page faults, kernel compilation on a GPU), then `reps`
/// times (at least once), and returns the median duration in seconds (the upper median for an even
/// count). `run` must wait for the device before it returns.
pub fn median_seconds(reps: usize, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
