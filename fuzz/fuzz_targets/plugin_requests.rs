//! The Docker volume plugin's socket: the engine (or anything root lets onto the socket) posts
//! JSON to `/VolumeDriver.*`. Input: requests, one per line, `PATH BODY`. Each input runs the
//! real dispatcher and driver (options parsing, name checks, the SQLite registry, reference
//! counts) on a fresh state directory; only the `Mounter` is a recorder instead of FUSE. Every
//! reply is JSON with an `Err` field that is empty exactly on success, and every mountpoint
//! handed out lies inside the state directory.

#![no_main]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use horcrux_plugin::{Driver, MountSpec, MountState, Mounter, dispatch};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Recorder {
    live: Mutex<HashSet<std::path::PathBuf>>,
}

impl Mounter for Recorder {
    fn mount(&self, spec: &MountSpec) -> Result<(), String> {
        self.live.lock().unwrap().insert(spec.mountpoint.clone());
        Ok(())
    }
    fn unmount(&self, mountpoint: &Path, _lazy: bool) -> Result<(), String> {
        self.live.lock().unwrap().remove(mountpoint);
        Ok(())
    }
    fn state(&self, mountpoint: &Path) -> MountState {
        if self.live.lock().unwrap().contains(mountpoint) {
            MountState::Live
        } else {
            MountState::Absent
        }
    }
    fn has_changes(&self, _overlay_dir: &Path) -> Result<bool, String> {
        Ok(false)
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = common::fresh_dir("plugin");
    let driver = Driver::open(&dir, None, Recorder::default()).expect("driver opens");
    let state = driver.state_dir().to_path_buf();
    for line in data.split(|b| *b == b'\n').take(32) {
        let (path, body) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        let path = String::from_utf8_lossy(path);
        let reply = dispatch(&driver, &path, body);
        let v: serde_json::Value =
            serde_json::from_slice(&reply.body).expect("every reply is JSON");
        let err = v.get("Err").and_then(|e| e.as_str());
        match reply.status {
            200 => assert!(err.is_none_or(str::is_empty), "{path}: {v}"),
            _ => assert!(err.is_some_and(|e| !e.is_empty()), "{path}: {v}"),
        }
        if let Some(mp) = v.get("Mountpoint").and_then(|m| m.as_str()) {
            if !mp.is_empty() {
                let mp = Path::new(mp);
                assert!(
                    mp.starts_with(&state) && !mp.components().any(|c| c.as_os_str() == ".."),
                    "{mp:?} is outside {state:?}"
                );
            }
        }
    }
});
