//! `horcrux completions SHELL` and `horcrux man`: shell completions and manual pages generated
//! from the command-line definition itself, so they never drift from `--help`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Debug, Args)]
#[command(after_long_help = "\
Examples:
  horcrux completions bash > /etc/bash_completion.d/horcrux
  horcrux completions zsh > \"${fpath[1]}/_horcrux\"
  horcrux completions fish > ~/.config/fish/completions/horcrux.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Without --dir, prints horcrux(1) on stdout (`horcrux man | man -l -`). With --dir, writes
horcrux.1 and one page per subcommand (horcrux-mount.1, ...) there, e.g. /usr/local/share/man/man1.")]
pub struct ManArgs {
    /// Write every page into this directory
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

pub fn run_completions<C: CommandFactory>(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = C::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "horcrux", &mut out);
    write_stdout(&out)
}

/// Write to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

pub fn run_man<C: CommandFactory>(a: ManArgs) -> anyhow::Result<()> {
    let cmd = C::command();
    let Some(dir) = a.dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return write_stdout(&out);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = 0;
    let mut pages = vec![(String::from("horcrux"), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("horcrux-{}", sub.get_name());
        pages.push((
            name.clone(),
            sub.clone().display_name(name.clone()).bin_name(name),
        ));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        written += 1;
    }
    println!("wrote {written} manual pages to {}", dir.display());
    Ok(())
}
