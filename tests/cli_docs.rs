//! Shell completions and manual pages are generated from the command line itself: every
//! subcommand is in them, and bash accepts the completion script.

mod common;

use std::process::Command;

use common::*;

#[test]
fn completions_and_manual_pages_cover_every_subcommand() {
    let help = Command::new(horcrux_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    // "Commands:" lists one subcommand per line, indented by two spaces.
    let subcommands: Vec<String> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|s| s != "help")
        .collect();
    assert!(subcommands.len() > 20, "{help}");

    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(horcrux_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for s in &subcommands {
            assert!(script.contains(s.as_str()), "{shell} completions lack {s}");
        }
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <({} completions bash) && complete -p horcrux",
            horcrux_bin().display()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("-F _horcrux horcrux"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempdir();
    let out = Command::new(horcrux_bin())
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for s in subcommands
        .iter()
        .map(|s| format!("horcrux-{s}"))
        .chain(["horcrux".into()])
    {
        let page = std::fs::read_to_string(dir.path().join(format!("{s}.1")))
            .unwrap_or_else(|e| panic!("{s}.1: {e}"));
        assert!(page.contains(&format!(".TH {s} 1")), "{s}.1: {page}");
    }
}
