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

/// Progress over images for jobs whose total is learned as they go: the image bar on a terminal,
/// else (CI, logs, nohup) a log line every 10% with the rate.
pub struct ImageProgress {
    bar: ProgressBar,
    what: String,
    start: std::time::Instant,
    next_log: usize,
}

impl ImageProgress {
    pub fn new(what: &str) -> Self {
        ImageProgress { bar: images(0, 0, what), what: what.to_string(), start: std::time::Instant::now(), next_log: 0 }
    }

    pub fn update(&mut self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        if self.bar.is_hidden() && (done >= self.next_log || done == total) {
            let secs = self.start.elapsed().as_secs_f64();
            tracing::info!("{}: {done}/{total} images, {:.2} img/s", self.what, done as f64 / secs.max(1e-9));
            self.next_log = done + total.div_ceil(10).max(1);
        }
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
