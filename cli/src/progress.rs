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

/// The bar of `generate` and `import`: bytes read of the whole tree, the file count as its
/// message; nothing at all when `quiet` or when stderr is not a terminal.
pub fn tree_progress(label: &str, quiet: bool) -> Box<dyn horcrux::generate::Progress> {
    struct Tree(ProgressBar);
    impl horcrux::generate::Progress for Tree {
        fn start(&self, total_bytes: u64, total_files: u64) {
            self.0.set_length(total_bytes);
            self.0.set_message(format!("{total_files} files"));
        }
        fn advance(&self, bytes: u64) {
            self.0.inc(bytes);
        }
        fn finish(&self) {
            self.0.finish_and_clear();
        }
    }
    if quiet || !std::io::stderr().is_terminal() {
        return Box::new(horcrux::generate::NoProgress);
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_prefix(label.to_string());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} ({msg})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    Box::new(Tree(bar))
}
