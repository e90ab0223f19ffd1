//! The horcrux volume driver: the registry, ref-counted mounts, and the checks that keep a
//! user's changes from being lost. Mounting itself is injected ([`Mounter`]): the CLI runs
//! `horcrux mount` as a detached daemon per volume, so mounts outlive the plugin process.
//!
//! Layout under the state directory:
//! - `plugin.db`: the registry ([`crate::registry`]);
//! - `volumes/<name>/mnt`: where the volume is mounted (the path Docker bind-mounts);
//! - `volumes/<name>/overlay`: its local changes (kept across unmounts until `Remove`);
//! - `cache/`: the chunk cache shared by every volume (unless `--cache-dir` says otherwise).
//!
//! Concurrency: one lock per volume serializes Mount/Unmount/Remove of that volume (a mount
//! may take seconds and must not be raced by a second one); `Get`/`List`/`Path` only read the
//! registry and never wait for a mount in progress.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::options::VolumeOptions;
use crate::protocol::{CreateRequest, MountRequest, NameRequest, Volume, VolumeDriver};
use crate::registry::{Registry, VolumeRecord};

/// What a mountpoint is, as the mounter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// A horcrux mount whose daemon answers.
    Live,
    /// A horcrux mount whose daemon is gone (the kernel answers ENOTCONN).
    Dead,
    /// Not mounted.
    Absent,
}

/// Everything needed to mount one volume.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// The Docker volume name.
    pub volume: String,
    pub options: VolumeOptions,
    pub mountpoint: PathBuf,
    pub overlay_dir: PathBuf,
    pub cache_dir: PathBuf,
}

/// How volumes are mounted and inspected (the CLI runs `horcrux mount`/`umount`).
pub trait Mounter: Send + Sync {
    /// Mount; return only once the mount is live.
    fn mount(&self, spec: &MountSpec) -> Result<(), String>;
    /// Unmount (`lazy` for a dead mount: detach it whatever holds it).
    fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<(), String>;
    fn state(&self, mountpoint: &Path) -> MountState;
    /// Does the (unmounted) overlay directory hold uncommitted changes?
    fn has_changes(&self, overlay_dir: &Path) -> Result<bool, String>;
}

/// Where a volume's files live under the state directory.
pub fn volume_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("volumes").join(name)
}

/// The mountpoint of volume `name`.
pub fn mountpoint(state_dir: &Path, name: &str) -> PathBuf {
    volume_dir(state_dir, name).join("mnt")
}

/// The overlay (local changes) of volume `name`.
pub fn overlay_dir(state_dir: &Path, name: &str) -> PathBuf {
    volume_dir(state_dir, name).join("overlay")
}

/// Docker's own rule for volume names (`[a-zA-Z0-9][a-zA-Z0-9_.-]+`); the name becomes a
/// directory, so nothing else may pass.
pub fn check_docker_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = name.len() >= 2
        && name.len() <= 255
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid volume name: use at least two of letters, digits, `_`, `.`, `-`, starting with a letter or digit"
        ))
    }
}

/// Refuse an access URL that carries a credential: it would end up in the registry, in
/// `docker volume inspect` and in process lists.
pub fn check_no_credentials(access: &str) -> Result<(), String> {
    for url in access.split(',') {
        let url = url.trim();
        let lower = url.to_ascii_lowercase();
        let userinfo = url
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(""))
            .and_then(|authority| authority.rsplit_once('@').map(|(u, _)| u));
        let secret_word = ["password", "secret", "token", "credential", "access_key"]
            .iter()
            .any(|w| lower.contains(&format!("{w}=")) || lower.contains(&format!("_{w}=")));
        if userinfo.is_some_and(|u| u.contains(':')) || secret_word {
            return Err(format!(
                "the access URL `{}` seems to carry a credential; horcrux never stores credentials \
                 in its registry: use SSH keys or an agent for scp://, and the AWS credential \
                 chain (environment of the plugin, ~/.aws profiles with `?profile=NAME`) for s3://",
                redact(url)
            ));
        }
    }
    Ok(())
}

fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://…"),
        None => "…".into(),
    }
}

/// The driver.
pub struct Driver<M: Mounter> {
    state_dir: PathBuf,
    cache_dir: PathBuf,
    registry: Mutex<Registry>,
    mounter: M,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl<M: Mounter> std::fmt::Debug for Driver<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("state_dir", &self.state_dir)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl<M: Mounter> Driver<M> {
    /// A driver over the registry in `state_dir` (created if needed).
    pub fn open(state_dir: &Path, cache_dir: Option<PathBuf>, mounter: M) -> Result<Self, String> {
        std::fs::create_dir_all(state_dir.join("volumes"))
            .map_err(|e| format!("creating {}: {e}", state_dir.display()))?;
        let state_dir = state_dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", state_dir.display()))?;
        // The registry and the overlays hold what users wrote: private to root.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                state_dir.join("volumes"),
                std::fs::Permissions::from_mode(0o700),
            );
        }
        let registry = Registry::open(&state_dir).map_err(|e| e.to_string())?;
        Ok(Self {
            cache_dir: cache_dir.unwrap_or_else(|| state_dir.join("cache")),
            state_dir,
            registry: Mutex::new(registry),
            mounter,
            locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn lock(&self, name: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, name: &str) -> Result<VolumeRecord, String> {
        self.registry()
            .get(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no such volume: `{name}` (not created with this driver)"))
    }

    fn spec(&self, rec: &VolumeRecord) -> Result<MountSpec, String> {
        let options = VolumeOptions::parse(Some(&rec.options)).map_err(|e| e.to_string())?;
        Ok(MountSpec {
            volume: rec.name.clone(),
            options,
            mountpoint: mountpoint(&self.state_dir, &rec.name),
            overlay_dir: overlay_dir(&self.state_dir, &rec.name),
            cache_dir: self.cache_dir.clone(),
        })
    }

    /// Make sure the volume is mounted and live (mounting it, or re-mounting a dead mount).
    /// The caller holds the volume's lock.
    fn ensure_mounted(&self, rec: &VolumeRecord) -> Result<PathBuf, String> {
        let spec = self.spec(rec)?;
        match self.mounter.state(&spec.mountpoint) {
            MountState::Live => return Ok(spec.mountpoint),
            MountState::Dead => {
                tracing::warn!(volume = %rec.name, "the mount's daemon is gone: mounting again");
                self.mounter.unmount(&spec.mountpoint, true)?;
            }
            MountState::Absent => {}
        }
        std::fs::create_dir_all(&spec.mountpoint)
            .map_err(|e| format!("creating {}: {e}", spec.mountpoint.display()))?;
        self.mounter
            .mount(&spec)
            .map_err(|e| format!("mounting volume `{}`: {e}", rec.name))?;
        tracing::info!(volume = %rec.name, mountpoint = %spec.mountpoint.display(), "mounted");
        Ok(spec.mountpoint)
    }

    /// After a restart: every volume someone has mounted is mounted again if its mount is
    /// gone (a live one is kept: the daemons are separate processes). Returns the failures.
    pub fn restore_mounts(&self) -> Vec<(String, String)> {
        let list = match self.registry().list() {
            Ok(l) => l,
            Err(e) => return vec![(String::new(), e.to_string())],
        };
        let mut failed = Vec::new();
        for rec in list.into_iter().filter(|r| r.mount_count() > 0) {
            let lock = self.lock(&rec.name);
            let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
            // Re-read: a request may have changed it meanwhile.
            let rec = match self.record(&rec.name) {
                Ok(r) if r.mount_count() > 0 => r,
                _ => continue,
            };
            if let Err(e) = self.ensure_mounted(&rec) {
                tracing::error!(volume = %rec.name, error = %e, "could not restore the mount");
                failed.push((rec.name.clone(), e));
            }
        }
        failed
    }

    fn describe(&self, rec: &VolumeRecord) -> Volume {
        let mut status = BTreeMap::new();
        for (k, v) in &rec.options {
            status.insert(
                k.trim_start_matches('-').to_string(),
                serde_json::Value::String(v.clone()),
            );
        }
        status.insert("mounts".into(), json!(rec.mount_count()));
        let mounted = rec.mount_count() > 0;
        Volume {
            name: rec.name.clone(),
            mountpoint: if mounted {
                mountpoint(&self.state_dir, &rec.name).display().to_string()
            } else {
                String::new()
            },
            created_at: Some(horcrux::util::rfc3339(rec.created_at)),
            status: Some(status),
        }
    }
}

impl<M: Mounter> VolumeDriver for Driver<M> {
    fn create(&self, req: CreateRequest) -> Result<(), String> {
        check_docker_name(&req.name)?;
        let opts = req.opts.unwrap_or_default();
        let parsed = VolumeOptions::parse(Some(&opts)).map_err(|e| e.to_string())?;
        check_no_credentials(&parsed.access_spec)?;
        let lock = self.lock(&req.name);
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = self.registry().get(&req.name).map_err(|e| e.to_string())? {
            // The engine may create again what it already knows (implicit creation).
            let same = VolumeOptions::parse(Some(&existing.options)).ok() == Some(parsed);
            return if same || opts.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "volume `{}` already exists with other options; remove it first",
                    req.name
                ))
            };
        }
        self.registry()
            .insert(&req.name, &opts, now())
            .map_err(|e| e.to_string())?;
        tracing::info!(volume = %req.name, access = %parsed.access_spec, "created");
        Ok(())
    }

    fn remove(&self, req: NameRequest) -> Result<(), String> {
        let lock = self.lock(&req.name);
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        let rec = self.record(&req.name)?;
        let n = rec.mount_count();
        if n > 0 {
            return Err(format!(
                "volume `{}` is in use ({n} mount{}); stop the containers using it first",
                req.name,
                if n == 1 { "" } else { "s" }
            ));
        }
        let mp = mountpoint(&self.state_dir, &req.name);
        if self.mounter.state(&mp) != MountState::Absent {
            return Err(format!(
                "volume `{}` is still mounted on {} (by a horcrux command?); try again when it is done",
                req.name,
                mp.display()
            ));
        }
        let ov = overlay_dir(&self.state_dir, &req.name);
        if self.mounter.has_changes(&ov)? {
            return Err(format!(
                "volume `{0}` has uncommitted changes: `horcrux status {0}` shows them; keep them \
                 with `horcrux commit -m MESSAGE {0}` (and `horcrux push`), or throw them away with \
                 `horcrux discard --force {0}`, then remove it again",
                req.name
            ));
        }
        let dir = volume_dir(&self.state_dir, &req.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing {}: {e}", dir.display()))?;
        }
        self.registry()
            .delete(&req.name)
            .map_err(|e| e.to_string())?;
        tracing::info!(volume = %req.name, "removed");
        Ok(())
    }

    fn mount(&self, req: MountRequest) -> Result<String, String> {
        let lock = self.lock(&req.name);
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        let rec = self.record(&req.name)?;
        // Mounted (again) before it is counted: a failed mount leaves no count behind.
        let mp = self.ensure_mounted(&rec)?;
        self.registry()
            .add_mount(&req.name, &req.id)
            .map_err(|e| e.to_string())?;
        Ok(mp.display().to_string())
    }

    fn unmount(&self, req: MountRequest) -> Result<(), String> {
        let lock = self.lock(&req.name);
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        let known = self
            .registry()
            .drop_mount(&req.name, &req.id)
            .map_err(|e| e.to_string())?;
        if !known {
            tracing::warn!(volume = %req.name, id = %req.id, "unmount of an ID that has no mount");
        }
        let rec = self.record(&req.name)?;
        if rec.mount_count() == 0 {
            let mp = mountpoint(&self.state_dir, &req.name);
            match self.mounter.state(&mp) {
                MountState::Absent => {}
                s => {
                    self.mounter.unmount(&mp, s == MountState::Dead)?;
                    tracing::info!(volume = %req.name, "unmounted (last user gone)");
                }
            }
        }
        Ok(())
    }

    fn path(&self, req: NameRequest) -> Result<String, String> {
        let rec = self.record(&req.name)?;
        Ok(if rec.mount_count() > 0 {
            mountpoint(&self.state_dir, &req.name).display().to_string()
        } else {
            String::new()
        })
    }

    fn get(&self, req: NameRequest) -> Result<Volume, String> {
        Ok(self.describe(&self.record(&req.name)?))
    }

    fn list(&self) -> Result<Vec<Volume>, String> {
        let list = self.registry().list().map_err(|e| e.to_string())?;
        Ok(list.iter().map(|r| self.describe(r)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[derive(Default)]
    struct FakeMounter {
        live: Mutex<HashSet<PathBuf>>,
        dirty: Mutex<bool>,
        mounts: Mutex<u32>,
    }

    impl Mounter for FakeMounter {
        fn mount(&self, spec: &MountSpec) -> Result<(), String> {
            *self.mounts.lock().unwrap() += 1;
            self.live.lock().unwrap().insert(spec.mountpoint.clone());
            Ok(())
        }
        fn unmount(&self, mp: &Path, _lazy: bool) -> Result<(), String> {
            self.live.lock().unwrap().remove(mp);
            Ok(())
        }
        fn state(&self, mp: &Path) -> MountState {
            if self.live.lock().unwrap().contains(mp) {
                MountState::Live
            } else {
                MountState::Absent
            }
        }
        fn has_changes(&self, _: &Path) -> Result<bool, String> {
            Ok(*self.dirty.lock().unwrap())
        }
    }

    fn create(d: &Driver<FakeMounter>, name: &str) -> Result<(), String> {
        let mut o = BTreeMap::new();
        o.insert("access".into(), "file:///r".into());
        d.create(CreateRequest {
            name: name.into(),
            opts: Some(o),
        })
    }

    fn m(name: &str, id: &str) -> MountRequest {
        MountRequest {
            name: name.into(),
            id: id.into(),
        }
    }

    #[test]
    fn ref_counts_and_removal_rules() {
        let dir = tempfile::tempdir().unwrap();
        let d = Driver::open(dir.path(), None, FakeMounter::default()).unwrap();
        create(&d, "v1").unwrap();
        create(&d, "v1").unwrap(); // same options: fine
        assert!(
            d.create(CreateRequest {
                name: "v1".into(),
                opts: Some([("access".to_string(), "file:///other".to_string())].into())
            })
            .unwrap_err()
            .contains("other options")
        );
        assert!(create(&d, "../x").is_err());
        let mp = d.mount(m("v1", "c1")).unwrap();
        assert!(mp.ends_with("volumes/v1/mnt"));
        d.mount(m("v1", "c1")).unwrap();
        assert_eq!(*d.mounter.mounts.lock().unwrap(), 1);
        d.unmount(m("v1", "c1")).unwrap();
        assert_eq!(d.mounter.state(Path::new(&mp)), MountState::Live);
        assert!(d.remove(NameRequest { name: "v1".into() }).is_err());
        d.unmount(m("v1", "c1")).unwrap();
        assert_eq!(d.mounter.state(Path::new(&mp)), MountState::Absent);
        assert_eq!(d.path(NameRequest { name: "v1".into() }).unwrap(), "");
        *d.mounter.dirty.lock().unwrap() = true;
        let e = d.remove(NameRequest { name: "v1".into() }).unwrap_err();
        assert!(e.contains("horcrux discard --force v1"), "{e}");
        *d.mounter.dirty.lock().unwrap() = false;
        d.remove(NameRequest { name: "v1".into() }).unwrap();
        assert!(d.get(NameRequest { name: "v1".into() }).is_err());
    }

    #[test]
    fn credentials_are_refused() {
        assert!(check_no_credentials("file:///r").is_ok());
        assert!(check_no_credentials("scp://dev@host:/r").is_ok());
        assert!(check_no_credentials("s3://b/p?region=x&endpoint=http://h:9000").is_ok());
        assert!(check_no_credentials("scp://dev:hunter2@host:/r").is_err());
        let e = check_no_credentials("s3://b/p?secret_access_key=abc").unwrap_err();
        assert!(!e.contains("abc"), "{e}");
    }
}
