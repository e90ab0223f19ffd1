//! Options of `docker volume create -d horcrux -o KEY=VALUE ...`.
//!
//! Both spellings are accepted: `-o access=URL` and the original Horcrux's `-o --access=URL`
//! (the Docker CLI splits at the first `=`, so the latter arrives as the key `--access`).
//! A flag given without a value (`-o read-only`) arrives with an empty value and means `true`.

use std::collections::BTreeMap;

use horcrux::format::{check_ref_name, check_volume_name, parse_size};
use horcrux::store::{AccessUrl, parse_access};

/// The option keys a volume accepts, in the order help texts list them.
pub const KNOWN_KEYS: &[&str] = &[
    "access",
    "name",
    "ref",
    "read-only",
    "cache-size",
    "record-profile",
    "no-replay",
    "no-profile",
];

/// What is wrong with the options, precisely enough for the user to fix the command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("unknown volume option `{key}`: known options are {}", KNOWN_KEYS.join(", "))]
    Unknown { key: String },
    #[error("volume option `{key}` is given more than once")]
    Duplicate { key: String },
    #[error(
        "missing volume option `access`: add -o access=file:///path/to/repository (mirrors separated by commas)"
    )]
    MissingAccess,
    #[error("volume option `{key}={value}`: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
}

/// Parsed options of one Docker volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Repository URLs, first preferred, the rest mirrors.
    pub access: Vec<AccessUrl>,
    /// The `access` value as the user wrote it (recorded in the volume registry).
    pub access_spec: String,
    /// Volume inside the repository; `None` = the repository's only volume.
    pub name: Option<String>,
    /// Branch, tag or commit to mount.
    pub reference: String,
    pub read_only: bool,
    /// Cache size bound in bytes; `None` = the driver's default.
    pub cache_size: Option<u64>,
    /// Start-up profile window in seconds, as given (`horcrux mount --record-profile`);
    /// `None` = the mount's default.
    pub record_profile: Option<String>,
    /// `horcrux mount --no-replay`.
    pub no_replay: bool,
    /// `horcrux mount --no-profile`.
    pub no_profile: bool,
}

/// `--access` and `access` are the same key; keys are case-insensitive.
fn canonical_key(raw: &str) -> String {
    let k = raw.trim();
    let k = k
        .strip_prefix("--")
        .or_else(|| k.strip_prefix('-'))
        .unwrap_or(k);
    k.to_ascii_lowercase()
}

fn parse_bool(key: &str, value: &str) -> Result<bool, OptionsError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(OptionsError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            why: "expected true or false".into(),
        }),
    }
}

impl VolumeOptions {
    /// Parse the `Opts` of a `/VolumeDriver.Create` request (which may be `null`).
    pub fn parse(opts: Option<&BTreeMap<String, String>>) -> Result<Self, OptionsError> {
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (raw, value) in opts.into_iter().flatten() {
            let key = canonical_key(raw);
            if !KNOWN_KEYS.contains(&key.as_str()) {
                return Err(OptionsError::Unknown { key: raw.clone() });
            }
            if seen.insert(key.clone(), value.clone()).is_some() {
                return Err(OptionsError::Duplicate { key });
            }
        }
        let bad = |key: &str, value: &str, why: String| OptionsError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            why,
        };
        let access_spec = seen
            .get("access")
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .ok_or(OptionsError::MissingAccess)?;
        let access =
            parse_access(&access_spec).map_err(|e| bad("access", &access_spec, e.to_string()))?;
        let name = match seen.get("name").map(|s| s.trim()) {
            None | Some("") => None,
            Some(n) => {
                check_volume_name(n).map_err(|e| bad("name", n, e.to_string()))?;
                Some(n.to_string())
            }
        };
        let reference = match seen.get("ref").map(|s| s.trim()) {
            None | Some("") => "main".to_string(),
            Some(r) => {
                check_ref_name(r).map_err(|_| {
                    bad(
                        "ref",
                        r,
                        "expected a branch, a tag or a commit id (letters, digits, `.`, `_`, `-`)"
                            .into(),
                    )
                })?;
                r.to_string()
            }
        };
        let read_only = match seen.get("read-only") {
            None => false,
            Some(v) => parse_bool("read-only", v)?,
        };
        let cache_size = match seen.get("cache-size") {
            None => None,
            Some(v) => Some(parse_size(v).ok_or_else(|| {
                bad(
                    "cache-size",
                    v,
                    "expected a size such as 10G (suffixes K, M, G, T)".into(),
                )
            })?),
        };
        let record_profile = match seen.get("record-profile").map(|s| s.trim()) {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && (0.0..=86_400.0).contains(&x) => Some(v.to_string()),
                _ => {
                    return Err(bad(
                        "record-profile",
                        v,
                        "expected seconds from 0 (off) to 86400, e.g. 30".into(),
                    ));
                }
            },
        };
        let flag = |k: &str| seen.get(k).map_or(Ok(false), |v| parse_bool(k, v));
        Ok(Self {
            access,
            access_spec,
            name,
            reference,
            read_only,
            cache_size,
            record_profile,
            no_replay: flag("no-replay")?,
            no_profile: flag("no-profile")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn both_spellings() {
        let plain = VolumeOptions::parse(Some(&opts(&[
            ("access", "file:///opt/horcrux-amcc"),
            ("name", "AMCC"),
        ])))
        .unwrap();
        let original = VolumeOptions::parse(Some(&opts(&[
            ("--access", "cp:///opt/horcrux-amcc"),
            ("--name", "AMCC"),
        ])))
        .unwrap();
        assert_eq!(plain.access, original.access);
        assert_eq!(plain.name.as_deref(), Some("AMCC"));
        assert_eq!(original.name.as_deref(), Some("AMCC"));
        assert_eq!(
            plain.access,
            vec![AccessUrl::File {
                path: "/opt/horcrux-amcc".into()
            }]
        );
        assert_eq!(plain.reference, "main");
        assert!(!plain.read_only);
        assert_eq!(plain.cache_size, None);
    }

    #[test]
    fn every_key() {
        let o = VolumeOptions::parse(Some(&opts(&[
            ("access", "file:///a, file:///b"),
            ("ref", "v2"),
            ("--read-only", ""),
            ("cache-size", "10G"),
            ("record-profile", "60"),
            ("--no-replay", ""),
            ("no-profile", "false"),
        ])))
        .unwrap();
        assert_eq!(o.record_profile.as_deref(), Some("60"));
        assert!(o.no_replay);
        assert!(!o.no_profile);
        assert_eq!(o.access.len(), 2);
        assert_eq!(o.access_spec, "file:///a, file:///b");
        assert_eq!(o.name, None);
        assert_eq!(o.reference, "v2");
        assert!(o.read_only);
        assert_eq!(o.cache_size, Some(10 << 30));
        let o = VolumeOptions::parse(Some(&opts(&[
            ("access", "file:///a"),
            ("read-only", "false"),
        ])))
        .unwrap();
        assert!(!o.read_only);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(VolumeOptions::parse(None), Err(OptionsError::MissingAccess));
        assert_eq!(
            VolumeOptions::parse(Some(&opts(&[("access", "  ")]))),
            Err(OptionsError::MissingAccess)
        );
        let e = VolumeOptions::parse(Some(&opts(&[("access", "file:///a"), ("size", "1G")])))
            .unwrap_err();
        assert_eq!(e, OptionsError::Unknown { key: "size".into() });
        let msg = e.to_string();
        for k in KNOWN_KEYS {
            assert!(msg.contains(k), "{msg}");
        }
        assert_eq!(
            VolumeOptions::parse(Some(&opts(&[
                ("access", "file:///a"),
                ("--access", "file:///b")
            ]))),
            Err(OptionsError::Duplicate {
                key: "access".into()
            })
        );
        for (k, v) in [
            ("access", "gopher://x/y"),
            ("access", "file://relative"),
            ("name", "a/b"),
            ("ref", "../x"),
            ("read-only", "maybe"),
            ("cache-size", "lots"),
            ("record-profile", "-1"),
            ("no-replay", "perhaps"),
        ] {
            let mut o = opts(&[(k, v)]);
            if k != "access" {
                o.insert("access".into(), "file:///a".into());
            }
            match VolumeOptions::parse(Some(&o)) {
                Err(OptionsError::BadValue { key, .. }) => assert_eq!(key, k),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
    }
}
