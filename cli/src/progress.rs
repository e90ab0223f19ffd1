//! Progress bars on a terminal; hidden otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte- or item-counting bar drawn on stderr only when stderr is a terminal.
pub fn bar(label: &str) -> ProgressBar {
    let b = ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        b.set_draw_target(ProgressDrawTarget::stderr());
    } else {
        b.set_draw_target(ProgressDrawTarget::hidden());
    }
    b.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_prefix(label.to_string());
    b
}

/// A byte-counting bar with rate and time left, drawn on stderr only when it is a terminal.
pub fn bytes_bar(label: &str) -> ProgressBar {
    let b = bar(label);
    b.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}
