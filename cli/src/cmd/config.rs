//! `horcrux config [show]`: the effective configuration and where each value comes from.

use clap::{Args, Subcommand};

use crate::StoreArgs;
use crate::config::{self, Origin};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: Option<ConfigCommand>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (the default)
    Show,
}

pub fn run(a: ConfigArgs, store: &StoreArgs) -> anyhow::Result<()> {
    match a.command {
        Some(ConfigCommand::Show) | None => {}
    }
    let c = config::get();
    println!("# configuration files, later ones override earlier ones");
    for (path, found) in &c.files {
        println!(
            "#   {} ({})",
            path.display(),
            if *found { "read" } else { "absent" }
        );
    }
    let env = |name: &'static str| std::env::var(name).ok().map(|v| (v, Origin::Env(name)));
    let from = |s: &Option<config::Sourced<String>>| s.clone().map(|s| (s.value, s.origin));
    let path_from = |s: &Option<config::Sourced<std::path::PathBuf>>| {
        s.clone().map(|s| (s.value.display().to_string(), s.origin))
    };
    let applied = |key: &str, value: Option<String>| -> Option<(String, Origin)> {
        let v = value?;
        let o = c.applied.get(key).cloned().unwrap_or(Origin::Default);
        Some((v, o))
    };
    let line = |key: &str, v: Option<(String, Origin)>, default: &str| match v {
        Some((value, origin)) => println!("{key:<16} = {value:<40} # {origin}"),
        None => println!("{key:<16} = {default:<40} # default"),
    };

    line(
        "log_level",
        env("RUST_LOG").or_else(|| from(&c.log_level)),
        "info",
    );
    let default_cache = crate::paths::state_dir().join("cache");
    line(
        "cache.dir",
        env("HORCRUX_CACHE_DIR").or_else(|| path_from(&c.cache_dir)),
        &default_cache.display().to_string(),
    );
    line(
        "cache.size",
        c.cache_size
            .as_ref()
            .map(|s| (horcrux::util::human_size(s.value), s.origin.clone())),
        "unbounded",
    );
    line(
        "ssh.identity",
        applied(
            "ssh.identity",
            store.identity.as_ref().map(|p| p.display().to_string()),
        ),
        "ssh-agent, then ~/.ssh/id_*",
    );
    line(
        "ssh.known_hosts",
        applied(
            "ssh.known_hosts",
            store.known_hosts.as_ref().map(|p| p.display().to_string()),
        ),
        "~/.ssh/known_hosts",
    );
    line(
        "s3.endpoint",
        applied("s3.endpoint", store.s3_endpoint.clone())
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL")),
        "AWS",
    );
    line(
        "s3.region",
        applied("s3.region", store.s3_region.clone())
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION")),
        "the profile's, else us-east-1",
    );
    line(
        "s3.profile",
        applied("s3.profile", store.s3_profile.clone()).or_else(|| env("AWS_PROFILE")),
        "default",
    );
    line("tls_dir", path_from(&c.tls_dir), "(none)");
    if c.sources.is_empty() {
        println!("{:<16} = {:<40} # default", "sources", "(none)");
    }
    for (name, s) in &c.sources {
        line(
            &format!("sources.{name}"),
            Some((s.value.clone(), s.origin.clone())),
            "",
        );
    }
    Ok(())
}
