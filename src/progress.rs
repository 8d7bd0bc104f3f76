//! Progress bars for long jobs, with throughput in images per second. Hidden when stderr is not a
//! terminal (CI logs), where jobs log a summary line instead.

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// A bar over `total` images, labelled `what`; `done` of them are already finished (resumed run).
pub fn images(total: usize, done: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images, {rate} img/s, {elapsed} elapsed, ETA {eta}")
            .expect("valid template")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.2}", s.per_sec());
            })
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.set_position(done as u64);
    bar.reset_eta();
    bar
}

/// A bar over `total` steps of something other than images (diffusion steps, training iterations).
pub fn steps(total: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec}, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
