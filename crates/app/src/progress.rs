//! Terminal progress bars for downloads and other long work.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use tidepool_models::model_source::Progress;

/// A progress bar on stderr, one phase at a time. Hidden when stderr is not a terminal, where a
/// line per phase is logged instead.
pub struct BarProgress {
    bar: Mutex<Option<ProgressBar>>,
    /// Also report the phase here (the server's loading detail).
    on_phase: Box<dyn Fn(&str) + Send + Sync>,
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BarProgress {
    pub fn new() -> Self {
        Self::with_phase_hook(|_| {})
    }

    pub fn with_phase_hook(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        BarProgress {
            bar: Mutex::new(None),
            on_phase: Box::new(f),
        }
    }
}

impl Progress for BarProgress {
    fn start(&self, what: &str, total: Option<u64>) {
        let mut slot = self.bar.lock().unwrap();
        if let Some(old) = slot.take() {
            old.finish_and_clear();
        }
        tracing::info!("{what}");
        (self.on_phase)(what);
        let bar = match total {
            Some(n) => {
                let b = ProgressBar::new(n);
                let template = if what.starts_with("downloading") || what.starts_with("extracting")
                {
                    "{msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
                } else {
                    "{msg} [{bar:30.cyan/blue}] {pos}/{len} eta {eta}"
                };
                b.set_style(
                    ProgressStyle::with_template(template)
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                b
            }
            None => ProgressBar::new_spinner(),
        };
        bar.set_message(what.to_string());
        *slot = Some(bar);
    }

    fn advance(&self, delta: u64) {
        if let Some(b) = self.bar.lock().unwrap().as_ref() {
            b.inc(delta);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap().take() {
            b.finish_and_clear();
        }
    }
}
