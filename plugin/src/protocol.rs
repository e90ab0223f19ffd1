//! Docker plugin protocol v1 for volume drivers: `POST /Plugin.Activate` and
//! `POST /VolumeDriver.{Create,Remove,Mount,Unmount,Path,Get,List,Capabilities}` with JSON
//! bodies (field names in Docker's PascalCase).
//!
//! Compatibility rules the engine relies on, kept here:
//! - requests may carry `"Opts": null` (or omit it) and bodies may be empty or `null` for the
//!   endpoints without arguments (the engine sends no body to `/Plugin.Activate`);
//! - unknown request fields are ignored (newer engines add fields);
//! - every response carries `Err`: empty on success, the message on failure;
//! - `CreatedAt` is omitted when unknown (the engine parses it as an RFC 3339 time, and an empty
//!   string would not parse).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Media type of plugin protocol messages (the engine sends it as `Accept`).
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// Response to `/Plugin.Activate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivateResponse {
    pub implements: Vec<String>,
}

impl Default for ActivateResponse {
    fn default() -> Self {
        Self {
            implements: vec!["VolumeDriver".to_string()],
        }
    }
}

/// `/VolumeDriver.Create`: `{"Name": "v1", "Opts": {"access": "file:///r"}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateRequest {
    pub name: String,
    /// Driver options (`-o key=value`); `null` or absent when none were given.
    #[serde(default)]
    pub opts: Option<BTreeMap<String, String>>,
}

/// `/VolumeDriver.Remove`, `/VolumeDriver.Path` and `/VolumeDriver.Get`: `{"Name": "v1"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NameRequest {
    pub name: String,
}

/// `/VolumeDriver.Mount` and `/VolumeDriver.Unmount`: `{"Name": "v1", "ID": "<caller id>"}`.
/// The ID identifies the container (or other caller) so mounts can be reference-counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "ID", default)]
    pub id: String,
}

/// Response carrying only an error (`Create`, `Remove`, `Unmount`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ErrResponse {
    #[serde(default)]
    pub err: String,
}

/// Response of `Mount` and `Path`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MountpointResponse {
    #[serde(default)]
    pub mountpoint: String,
    #[serde(default)]
    pub err: String,
}

/// A volume as `Get` and `List` report it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Volume {
    pub name: String,
    /// Host path while mounted; empty (omitted) otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Free-form status shown by `docker volume inspect` (access URL, ref, cache use...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<BTreeMap<String, serde_json::Value>>,
}

/// Response of `Get`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<Volume>,
    #[serde(default)]
    pub err: String,
}

/// Response of `List`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListResponse {
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub err: String,
}

/// Volume scope: `local` (this host only) or `global` (the same volume cluster-wide).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Capability {
    pub scope: String,
}

/// Response of `Capabilities`: horcrux volumes are `{"Scope": "local"}` (each host has its own
/// overlay and cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CapabilitiesResponse {
    pub capabilities: Capability,
    #[serde(default)]
    pub err: String,
}

impl Default for CapabilitiesResponse {
    fn default() -> Self {
        Self {
            capabilities: Capability {
                scope: "local".to_string(),
            },
            err: String::new(),
        }
    }
}

/// What a volume driver implements. Errors are messages for the user: they become `Err`.
pub trait VolumeDriver {
    fn create(&self, req: CreateRequest) -> Result<(), String>;
    fn remove(&self, req: NameRequest) -> Result<(), String>;
    /// Must return only once the mount is live (the original returned too early).
    fn mount(&self, req: MountRequest) -> Result<String, String>;
    fn unmount(&self, req: MountRequest) -> Result<(), String>;
    fn path(&self, req: NameRequest) -> Result<String, String>;
    fn get(&self, req: NameRequest) -> Result<Volume, String>;
    fn list(&self) -> Result<Vec<Volume>, String>;
}

/// An HTTP status and a JSON body to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl DispatchReply {
    fn json<T: Serialize>(status: u16, v: &T) -> Self {
        Self {
            status,
            body: serde_json::to_vec(v).expect("protocol types serialize"),
        }
    }

    fn error(status: u16, msg: String) -> Self {
        Self::json(status, &ErrResponse { err: msg })
    }
}

/// Decode a request body; an empty body or `null` means "no fields".
fn decode<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, String> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(trimmed).map_err(|e| format!("malformed request body: {e}"))
}

/// Answer one protocol call: `path` is the HTTP path (`/VolumeDriver.Mount`), `body` the JSON
/// the engine posted. Failures of the driver are `500` with `{"Err": "..."}`, malformed
/// requests `400`, unknown endpoints `404`.
pub fn dispatch(driver: &dyn VolumeDriver, path: &str, body: &[u8]) -> DispatchReply {
    macro_rules! req {
        ($t:ty) => {
            match decode::<$t>(body) {
                Ok(r) => r,
                Err(e) => return DispatchReply::error(400, e),
            }
        };
    }
    let done = |r: Result<(), String>| match r {
        Ok(()) => DispatchReply::json(200, &ErrResponse::default()),
        Err(e) => DispatchReply::error(500, e),
    };
    let mountpoint = |r: Result<String, String>| match r {
        Ok(m) => DispatchReply::json(
            200,
            &MountpointResponse {
                mountpoint: m,
                err: String::new(),
            },
        ),
        Err(e) => DispatchReply::error(500, e),
    };
    match path {
        "/Plugin.Activate" => DispatchReply::json(200, &ActivateResponse::default()),
        "/VolumeDriver.Capabilities" => DispatchReply::json(200, &CapabilitiesResponse::default()),
        "/VolumeDriver.Create" => done(driver.create(req!(CreateRequest))),
        "/VolumeDriver.Remove" => done(driver.remove(req!(NameRequest))),
        "/VolumeDriver.Mount" => mountpoint(driver.mount(req!(MountRequest))),
        "/VolumeDriver.Unmount" => done(driver.unmount(req!(MountRequest))),
        "/VolumeDriver.Path" => mountpoint(driver.path(req!(NameRequest))),
        "/VolumeDriver.Get" => match driver.get(req!(NameRequest)) {
            Ok(v) => DispatchReply::json(
                200,
                &GetResponse {
                    volume: Some(v),
                    err: String::new(),
                },
            ),
            Err(e) => DispatchReply::error(500, e),
        },
        "/VolumeDriver.List" => match driver.list() {
            Ok(volumes) => DispatchReply::json(
                200,
                &ListResponse {
                    volumes,
                    err: String::new(),
                },
            ),
            Err(e) => DispatchReply::error(500, e),
        },
        other => DispatchReply::error(404, format!("unknown plugin endpoint `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use serde_json::{Value, json};

    use super::*;

    fn to_value<T: Serialize>(v: &T) -> Value {
        serde_json::to_value(v).unwrap()
    }

    #[test]
    fn requests_as_the_engine_sends_them() {
        let c: CreateRequest =
            serde_json::from_str(r#"{"Name":"v1","Opts":{"--access":"file:///r","name":"A"}}"#)
                .unwrap();
        assert_eq!(c.name, "v1");
        let opts = c.opts.unwrap();
        assert_eq!(opts["--access"], "file:///r");
        assert_eq!(opts["name"], "A");
        // `docker volume create -d horcrux v1` without -o sends null (or nothing).
        let c: CreateRequest = serde_json::from_str(r#"{"Name":"v1","Opts":null}"#).unwrap();
        assert_eq!(c.opts, None);
        let c: CreateRequest = serde_json::from_str(r#"{"Name":"v1"}"#).unwrap();
        assert_eq!(c.opts, None);
        let m: MountRequest = serde_json::from_str(r#"{"Name":"v1","ID":"abc123"}"#).unwrap();
        assert_eq!(
            m,
            MountRequest {
                name: "v1".into(),
                id: "abc123".into()
            }
        );
        // Unknown fields from newer engines are ignored.
        let n: NameRequest = serde_json::from_str(r#"{"Name":"v1","Extra":1}"#).unwrap();
        assert_eq!(n.name, "v1");
    }

    #[test]
    fn responses_as_the_engine_expects_them() {
        assert_eq!(
            to_value(&ActivateResponse::default()),
            json!({"Implements": ["VolumeDriver"]})
        );
        assert_eq!(
            to_value(&CapabilitiesResponse::default()),
            json!({"Capabilities": {"Scope": "local"}, "Err": ""})
        );
        assert_eq!(to_value(&ErrResponse::default()), json!({"Err": ""}));
        assert_eq!(
            to_value(&MountpointResponse {
                mountpoint: "/m".into(),
                err: String::new()
            }),
            json!({"Mountpoint": "/m", "Err": ""})
        );
        let v = Volume {
            name: "v1".into(),
            ..Default::default()
        };
        // No empty CreatedAt (the engine would fail to parse it), no empty Mountpoint.
        assert_eq!(to_value(&v), json!({"Name": "v1"}));
        let mut status = BTreeMap::new();
        status.insert("access".to_string(), json!("file:///r"));
        let v = Volume {
            name: "v1".into(),
            mountpoint: "/m".into(),
            created_at: Some("2024-01-02T03:04:05Z".into()),
            status: Some(status),
        };
        assert_eq!(
            to_value(&ListResponse {
                volumes: vec![v],
                err: String::new()
            }),
            json!({"Volumes": [{"Name": "v1", "Mountpoint": "/m",
                "CreatedAt": "2024-01-02T03:04:05Z", "Status": {"access": "file:///r"}}], "Err": ""})
        );
    }

    /// A driver that records calls and fails on the name "bad".
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<String>>,
    }

    impl Fake {
        fn check(&self, call: &str, name: &str) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("{call} {name}"));
            if name == "bad" {
                Err(format!("volume `{name}` failed"))
            } else {
                Ok(())
            }
        }
    }

    impl VolumeDriver for Fake {
        fn create(&self, r: CreateRequest) -> Result<(), String> {
            self.check("create", &r.name)
        }
        fn remove(&self, r: NameRequest) -> Result<(), String> {
            self.check("remove", &r.name)
        }
        fn mount(&self, r: MountRequest) -> Result<String, String> {
            self.calls.borrow_mut().push(format!("mount-id {}", r.id));
            self.check("mount", &r.name)?;
            Ok(format!("/mnt/{}", r.name))
        }
        fn unmount(&self, r: MountRequest) -> Result<(), String> {
            self.check("unmount", &r.name)
        }
        fn path(&self, r: NameRequest) -> Result<String, String> {
            self.check("path", &r.name)?;
            Ok(format!("/mnt/{}", r.name))
        }
        fn get(&self, r: NameRequest) -> Result<Volume, String> {
            self.check("get", &r.name)?;
            Ok(Volume {
                name: r.name,
                ..Default::default()
            })
        }
        fn list(&self) -> Result<Vec<Volume>, String> {
            self.check("list", "")?;
            Ok(vec![Volume {
                name: "v1".into(),
                ..Default::default()
            }])
        }
    }

    fn call(d: &Fake, path: &str, body: &str) -> (u16, Value) {
        let r = dispatch(d, path, body.as_bytes());
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    #[test]
    fn dispatch_routes_every_endpoint() {
        let d = Fake::default();
        assert_eq!(
            call(&d, "/Plugin.Activate", ""),
            (200, json!({"Implements": ["VolumeDriver"]}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Capabilities", "null"),
            (200, json!({"Capabilities": {"Scope": "local"}, "Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Create", r#"{"Name":"v1","Opts":null}"#),
            (200, json!({"Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Mount", r#"{"Name":"v1","ID":"c1"}"#),
            (200, json!({"Mountpoint": "/mnt/v1", "Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Path", r#"{"Name":"v1"}"#),
            (200, json!({"Mountpoint": "/mnt/v1", "Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Get", r#"{"Name":"v1"}"#),
            (200, json!({"Volume": {"Name": "v1"}, "Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.List", "{}"),
            (200, json!({"Volumes": [{"Name": "v1"}], "Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Unmount", r#"{"Name":"v1","ID":"c1"}"#),
            (200, json!({"Err": ""}))
        );
        assert_eq!(
            call(&d, "/VolumeDriver.Remove", r#"{"Name":"v1"}"#),
            (200, json!({"Err": ""}))
        );
        assert_eq!(
            *d.calls.borrow(),
            [
                "create v1",
                "mount-id c1",
                "mount v1",
                "path v1",
                "get v1",
                "list ",
                "unmount v1",
                "remove v1"
            ]
        );
    }

    #[test]
    fn dispatch_reports_errors_in_err() {
        let d = Fake::default();
        let (status, v) = call(&d, "/VolumeDriver.Mount", r#"{"Name":"bad","ID":"x"}"#);
        assert_eq!(status, 500);
        assert_eq!(v, json!({"Err": "volume `bad` failed"}));
        let (status, v) = call(&d, "/VolumeDriver.Create", "{not json");
        assert_eq!(status, 400);
        assert!(v["Err"].as_str().unwrap().contains("malformed"));
        let (status, v) = call(&d, "/VolumeDriver.Frobnicate", "{}");
        assert_eq!(status, 404);
        assert!(v["Err"].as_str().unwrap().contains("Frobnicate"));
    }
}
