//! `horcrux plugin`: the Docker volume driver, serving the engine on a Unix socket.
//!
//! Start-up binds the socket before anything slow (the engine gives up on a plugin whose
//! socket does not answer), opens the registry, and then restores in the background the
//! mounts that the registry says are in use but are gone (after a reboot; a plugin restart
//! finds them alive, since every mount is its own `horcrux mount` daemon).
//!
//! Volumes are mounted by running this executable's `horcrux mount` (detached: it returns once
//! the FUSE mount is live) and unmounted with `horcrux umount`.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Args;
use horcrux_fuse::mountinfo;
use horcrux_plugin::driver::{self, Driver, MountSpec, MountState, Mounter};
use horcrux_plugin::{Registry, VolumeOptions};

const PLUGIN_HELP: &str = "\
Docker finds the driver by its socket: the driver's name is the socket's file name without
`.sock` (`horcrux` for the default). Then:

    docker volume create -d horcrux -o access=file:///opt/repo -o name=AMCC v1
    docker run -v v1:/data IMAGE ...
    horcrux status v1; horcrux commit -m MESSAGE v1; horcrux discard --force v1
    docker volume rm v1          # refused while v1 has uncommitted changes

Volume options (-o KEY=VALUE, or the original's -o --KEY=VALUE): access (URLs, mirrors
separated by commas; required), name (the volume in the repository), ref (branch, tag or
commit; default main), read-only, cache-size. Credentials are never accepted in options: SSH
uses the keys and agent of the plugin's user, S3 the AWS credential chain of its environment.

State (the registry plugin.db, and per volume its mountpoint and its local changes) lives in
--state-dir; it survives restarts: volumes in use are mounted again if their mount is gone.";

#[derive(Debug, Args)]
#[command(after_long_help = PLUGIN_HELP)]
pub struct PluginArgs {
    /// Unix socket the Docker engine connects to
    #[arg(long, default_value = "/run/docker/plugins/horcrux.sock")]
    pub socket: PathBuf,
    /// Registry, mountpoints and local changes of the volumes [default: /var/lib/horcrux for
    /// root, else the user's horcrux state directory]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Chunk cache of the volumes [default: STATE_DIR/cache]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Serve Prometheus metrics of every mounted volume on http://ADDR/metrics (each volume's
    /// mount daemon is asked over its control socket at each scrape; samples are labelled
    /// `volume`). No authentication: keep it on loopback or a private network
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

/// The plugin's state directory when none is given (also where the CLI looks volumes up).
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("HORCRUX_PLUGIN_STATE_DIR")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(crate::paths::state_dir)
}

pub fn run(a: PluginArgs) -> anyhow::Result<()> {
    crate::init_logging(None)?;
    // First, before anything that may be slow.
    let listener = horcrux_plugin::server::bind(&a.socket)
        .with_context(|| format!("binding the plugin socket {}", a.socket.display()))?;
    let metrics_listener = a.metrics.as_deref().map(crate::metrics::bind).transpose()?;
    let state_dir = a.state_dir.unwrap_or_else(default_state_dir);
    let mounter = CliMounter {
        exe: std::env::current_exe().context("locating the horcrux executable")?,
    };
    let driver = Driver::open(&state_dir, a.cache_dir, mounter).map_err(|e| anyhow!(e))?;
    let driver = Arc::new(driver);
    tracing::info!(
        socket = %a.socket.display(),
        state = %driver.state_dir().display(),
        pid = std::process::id(),
        "horcrux volume plugin listening"
    );
    // The plugin's server is threads, not tokio: a small runtime of its own for the endpoint.
    let _metrics_runtime = match metrics_listener {
        Some(l) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .thread_name("horcrux-metrics")
                .build()
                .context("starting the metrics runtime")?;
            let state = driver.state_dir().to_path_buf();
            crate::metrics::start(
                l,
                rt.handle(),
                Arc::new(move || {
                    let mut e = crate::metrics::Exposition::default();
                    crate::metrics::render_plugin(&mut e, &plugin_volumes(&state));
                    e.finish()
                }),
            )?;
            Some(rt)
        }
        None => None,
    };
    let restore = driver.clone();
    std::thread::Builder::new()
        .name("restore-mounts".into())
        .spawn(move || {
            let failed = restore.restore_mounts();
            if failed.is_empty() {
                tracing::info!("mounts in use are all live");
            }
        })?;
    horcrux_plugin::server::serve(listener, driver).context("serving the plugin socket")
}

/// The Docker volumes mounted now (by their mount daemons) under `state`, with their daemons'
/// control sockets: every horcrux mount on `<state>/volumes/NAME/mnt`.
fn plugin_volumes(state: &Path) -> Vec<(String, PathBuf)> {
    let table = match mountinfo::mounts() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: reading /proc/self/mountinfo failed");
            return Vec::new();
        }
    };
    let mut out: Vec<(String, PathBuf)> = table
        .into_iter()
        .filter(|m| m.is_horcrux())
        .filter_map(|m| {
            let rel = m.mount_point.strip_prefix(state.join("volumes")).ok()?;
            let mut c = rel.components();
            let (Some(Component::Normal(name)), Some(Component::Normal(mnt)), None) =
                (c.next(), c.next(), c.next())
            else {
                return None;
            };
            (mnt == "mnt").then(|| {
                (
                    name.to_string_lossy().into_owned(),
                    crate::mounts::runtime_file(&m.mount_point, "sock"),
                )
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Mounts through this executable's `mount` and `umount` subcommands.
#[derive(Debug)]
pub struct CliMounter {
    pub exe: PathBuf,
}

/// `mount ACCESS MOUNTPOINT --name N --ref R --cache-dir C --overlay-dir O [--read-only]
/// [--cache-size S]`.
pub fn mount_args(spec: &MountSpec) -> Vec<OsString> {
    let o: &VolumeOptions = &spec.options;
    let mut args: Vec<OsString> = vec![
        "mount".into(),
        o.access_spec.clone().into(),
        spec.mountpoint.clone().into(),
    ];
    if let Some(n) = &o.name {
        args.extend(["--name".into(), n.into()]);
    }
    args.extend([
        "--ref".into(),
        o.reference.clone().into(),
        "--cache-dir".into(),
        spec.cache_dir.clone().into(),
        "--overlay-dir".into(),
        spec.overlay_dir.clone().into(),
    ]);
    if o.read_only {
        args.push("--read-only".into());
    }
    if let Some(s) = o.cache_size {
        args.extend(["--cache-size".into(), s.to_string().into()]);
    }
    args
}

/// Run this executable with `args`; its error message (the last lines of stderr) on failure.
fn run_self(exe: &Path, args: &[OsString]) -> Result<String, String> {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", exe.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(stderr
            .trim()
            .trim_start_matches("horcrux: error: ")
            .to_string())
    }
}

/// Live, dead (daemon gone) or absent, from the kernel's mount table.
pub fn mount_state(mountpoint: &Path) -> MountState {
    match mountinfo::find(mountpoint) {
        Ok(Some(_)) => match std::fs::metadata(mountpoint) {
            Ok(_) => MountState::Live,
            Err(_) => MountState::Dead,
        },
        _ => MountState::Absent,
    }
}

impl Mounter for CliMounter {
    fn mount(&self, spec: &MountSpec) -> Result<(), String> {
        // The plugin's own SSH/S3 flags reach the volumes' sources the same way.
        let mut args = crate::store_flags();
        args.extend(mount_args(spec));
        run_self(&self.exe, &args).map(|out| {
            tracing::debug!(volume = %spec.volume, "{}", out.trim());
        })
    }

    fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<(), String> {
        let mut args: Vec<OsString> = vec!["umount".into()];
        if lazy {
            args.push("--lazy".into());
        }
        args.push(mountpoint.into());
        run_self(&self.exe, &args).map(|_| ())
    }

    fn state(&self, mountpoint: &Path) -> MountState {
        mount_state(mountpoint)
    }

    fn has_changes(&self, overlay_dir: &Path) -> Result<bool, String> {
        overlay_has_changes(overlay_dir)
    }
}

/// Does an overlay directory that no daemon has open hold changes? An overlay in use by a
/// daemon is an error (it cannot be judged from outside).
pub fn overlay_has_changes(dir: &Path) -> Result<bool, String> {
    if !dir.join("overlay.db").exists() {
        return Ok(false);
    }
    match horcrux::overlay::Overlay::open(dir) {
        Ok(ov) => Ok(!ov.state.read().is_clean()),
        Err(horcrux::overlay::OverlayError::Locked { .. }) => Err(format!(
            "the local changes in {} are in use by a horcrux daemon (a `horcrux` command on the \
             volume?); try again when it is done",
            dir.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Docker volume names on the command line (`horcrux status v1`).

/// Mounts made for one command on a volume no container uses; unmounted when it ends.
static TEMPORARY: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Where Docker volume `name` of the plugin's registry is mounted: its live mount, or else a
/// mount made for this command (undone by [`release_temporary_mounts`]). `None` when the
/// registry does not know the name.
/// Is `name` a volume in the plugin's registry? (Nothing is mounted to find out.)
pub fn is_docker_volume(name: &str) -> bool {
    matches!(
        Registry::open_read_only(&default_state_dir()),
        Ok(Some(reg)) if matches!(reg.get(name), Ok(Some(_)))
    )
}

pub fn volume_mountpoint(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let state = default_state_dir();
    let Some(reg) = Registry::open_read_only(&state)? else {
        return Ok(None);
    };
    let Some(rec) = reg.get(name)? else {
        return Ok(None);
    };
    let state = state.canonicalize().unwrap_or(state);
    let mp = driver::mountpoint(&state, name);
    match mount_state(&mp) {
        MountState::Live => return Ok(Some(mp)),
        MountState::Dead => {
            return Err(anyhow!(
                "Docker volume `{name}` is mounted on {} but its daemon is gone; restart the \
                 plugin or run `horcrux umount --lazy {}`",
                mp.display(),
                mp.display()
            ));
        }
        MountState::Absent => {}
    }
    // Nobody uses it: mount it beside the plugin's mountpoint, on its own overlay lock, so a
    // container starting meanwhile is refused cleanly instead of sharing the changes.
    let options = VolumeOptions::parse(Some(&rec.options)).map_err(|e| anyhow!(e))?;
    let tmp = driver::volume_dir(&state, name).join(format!("cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let spec = MountSpec {
        volume: name.to_string(),
        options,
        mountpoint: tmp.clone(),
        overlay_dir: driver::overlay_dir(&state, name),
        cache_dir: state.join("cache"),
    };
    let exe = std::env::current_exe().context("locating the horcrux executable")?;
    if let Err(e) = run_self(&exe, &mount_args(&spec)) {
        let _ = std::fs::remove_dir(&tmp);
        return Err(anyhow!("mounting Docker volume `{name}`: {e}"));
    }
    eprintln!(
        "horcrux: Docker volume `{name}` is not in use: mounted it on {} for this command",
        tmp.display()
    );
    TEMPORARY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(tmp.clone());
    Ok(Some(tmp))
}

/// Unmount what [`volume_mountpoint`] mounted for this command.
pub fn release_temporary_mounts() {
    let list = std::mem::take(&mut *TEMPORARY.lock().unwrap_or_else(|e| e.into_inner()));
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for mp in list {
        match run_self(&exe, &["umount".into(), mp.clone().into()]) {
            Ok(_) => {
                let _ = std::fs::remove_dir(&mp);
            }
            Err(e) => eprintln!(
                "horcrux: warning: could not unmount {} (mounted for this command): {e}",
                mp.display()
            ),
        }
    }
}

/// The Docker volume of the plugin's registry that `target` names: a volume name (one plain
/// component that is not a path here), or the plugin's mountpoint of a volume
/// (`<state>/volumes/<name>/mnt`) or a path inside it. `None` for anything else.
pub fn docker_volume_of(target: &Path) -> anyhow::Result<Option<String>> {
    let state = default_state_dir();
    // The registry is opened only for a candidate: a plain path must not depend on it.
    let candidate = match crate::mounts::docker_volume_name(target) {
        Some(n) => n.to_string(),
        None => {
            let canonical = state.canonicalize().unwrap_or_else(|_| state.clone());
            let abs = crate::mounts::resolve_path(target)?;
            let Ok(rest) = abs.strip_prefix(canonical.join("volumes")) else {
                return Ok(None);
            };
            let mut c = rest.components();
            match (c.next(), c.next()) {
                (Some(Component::Normal(n)), Some(Component::Normal(m))) if m == "mnt" => {
                    match n.to_str() {
                        Some(n) => n.to_string(),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            }
        }
    };
    let Some(reg) = Registry::open_read_only(&state)? else {
        return Ok(None);
    };
    Ok(reg.get(&candidate)?.map(|r| r.name))
}

/// The plugin's own mountpoint of volume `name` (canonical state directory).
pub fn plugin_mountpoint(name: &str) -> PathBuf {
    let state = default_state_dir();
    let state = state.canonicalize().unwrap_or(state);
    driver::mountpoint(&state, name)
}

/// Record in the registry that volume `name` now shows `rev` (a branch, or a commit id), so
/// that its next mount (the plugin's, when a container starts) shows it too.
pub fn set_volume_ref(name: &str, rev: &str) -> anyhow::Result<()> {
    let reg = Registry::open(&default_state_dir())?;
    if !reg.set_option(name, "ref", rev)? {
        return Err(anyhow!(
            "Docker volume `{name}` is no longer in the registry"
        ));
    }
    Ok(())
}
