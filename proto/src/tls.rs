//! Certificates for peers: a private CA, node certificates it signs, and the rustls
//! configurations both ends of a peer connection use.
//!
//! # Files (a node's TLS directory)
//!
//! ```text
//! ca.crt        the CA certificate (PEM), on every node
//! ca.key        the CA private key (PEM, 0600), only where certificates are issued
//! NAME.crt      this node's certificate (PEM), signed by the CA
//! NAME.key      this node's private key (PEM, 0600)
//! ```
//!
//! A node certificate serves both ends of a connection (extended key usage serverAuth and
//! clientAuth): a node is a server to the nodes reading from it and a client of the others.
//!
//! # Policy
//!
//! TLS 1.3 only. The server requires a client certificate chaining to the CA; the client
//! checks the server's certificate against the CA *and* against the address or name it
//! dialled (a SAN of IP or DNS kind), so a stolen node certificate only works for the
//! addresses it was issued for.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls::{
    self, ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// File name of the CA certificate in a TLS directory.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA key in a TLS directory.
pub const CA_KEY: &str = "ca.key";

/// How long issued certificates are valid.
const CA_VALID_DAYS: i64 = 3650;
const NODE_VALID_DAYS: i64 = 825;

/// Errors about certificates and keys. Messages name the file and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{0}: a CA already exists here; pass --force to replace it (every node certificate it signed stops working)"
    )]
    CaExists(PathBuf),
    #[error("{dir}: no CA here ({CA_CERT} and {CA_KEY}); create one with `horcrux tls init --dir {dir}`", dir = .0.display())]
    NoCa(PathBuf),
    #[error("{}: no CA certificate ({CA_CERT}); copy the fleet's ca.crt here", .0.display())]
    NoCaCert(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Bad { path: PathBuf, what: String },
    #[error("{}: the key does not belong to the certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: {what}", dir.display())]
    Choose { dir: PathBuf, what: String },
    #[error("invalid certificate name `{0}`: use letters, digits, `.`, `_` and `-`")]
    BadName(String),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `data` to `path` atomically (temp file in the same directory, fsync, rename) with
/// `mode`: a reader sees the old file or the new one, and a key is never world-readable,
/// not even for a moment.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that are slightly behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// What `init` and `issue` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Create a private CA in `dir` (created 0700 if missing). Refuses to replace an existing CA
/// unless `force`.
pub fn init_ca(dir: &Path, common_name: &str, force: bool) -> Result<Written, TlsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(TlsError::CaExists(dir.to_path_buf()));
    }
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "horcrux");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALID_DAYS);
    let cert = params.self_signed(&key)?;
    // Key first: a CA certificate without its key is useless, the reverse is just retried.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

/// Check a certificate name (it becomes a file name and a DNS SAN).
fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name != "ca"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName(name.to_string()))
    }
}

/// Issue (or re-issue: rotate) the node certificate `NAME.crt`/`NAME.key` in `dir`, signed by
/// the CA there, for `name` (a DNS SAN) and every one of `sans` (IP addresses become IP SANs,
/// anything else DNS SANs).
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<Written, TlsError> {
    check_name(name)?;
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    if !ca_cert_path.exists() || !ca_key_path.exists() {
        return Err(TlsError::NoCa(dir.to_path_buf()));
    }
    let ca_key = KeyPair::from_pem(&read_text(&ca_key_path)?).map_err(|e| TlsError::Bad {
        path: ca_key_path.clone(),
        what: format!("not a private key in PEM form: {e}"),
    })?;
    let ca_pem = read_text(&ca_cert_path)?;
    let ca_der = first_cert(&ca_cert_path, ca_pem.as_bytes())?;
    check_key_matches(&ca_cert_path, &ca_der, &ca_key_path, &ca_key)?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, &ca_key).map_err(|e| TlsError::Bad {
        path: ca_cert_path.clone(),
        what: format!("not a usable CA certificate: {e}"),
    })?;

    let mut alt = vec![SanType::DnsName(name.try_into()?)];
    for s in sans {
        let san = match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.as_str().try_into()?),
        };
        if !alt.contains(&san) {
            alt.push(san);
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "horcrux");
    params.distinguished_name = dn;
    params.subject_alt_names = alt;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, NODE_VALID_DAYS);
    let cert = params.signed_by(&key, &issuer)?;
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    // Rotation replaces both files; each replacement is atomic. A reader between the two
    // renames sees a mismatched pair and gets a clear error; loading again fixes it.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

fn first_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
    let certs = certs_from_pem(path, pem)?;
    certs.into_iter().next().ok_or_else(|| TlsError::Bad {
        path: path.to_path_buf(),
        what: "no certificate in it (expected PEM `BEGIN CERTIFICATE`)".into(),
    })
}

fn certs_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bad {
            path: path.to_path_buf(),
            what: format!("not a PEM certificate: {e}"),
        })
}

/// The raw public key of a certificate.
fn cert_public_key(path: &Path, der: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Bad {
        path: path.to_path_buf(),
        what: format!("not a valid X.509 certificate: {e}"),
    })?;
    Ok(x509.public_key().subject_public_key.data.to_vec())
}

fn check_key_matches(
    cert_path: &Path,
    cert: &CertificateDer<'_>,
    key_path: &Path,
    key: &KeyPair,
) -> Result<(), TlsError> {
    if cert_public_key(cert_path, cert)? != key.public_key_raw() {
        return Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        });
    }
    Ok(())
}

/// Where a node's CA certificate, certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Find the files in a TLS directory: `ca.crt`, and the node certificate `cert` (a path,
    /// or a name in `dir`) with its `key` (default: the certificate's path with `.key`). Without
    /// `cert`, the one certificate in `dir` other than the CA's is used.
    pub fn find(dir: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, TlsError> {
        let ca = dir.join(CA_CERT);
        if !ca.exists() {
            return Err(TlsError::NoCaCert(dir.to_path_buf()));
        }
        let in_dir = |p: &Path| {
            if p.is_absolute() || p.exists() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        let cert = match cert {
            Some(c) => {
                let c = in_dir(c);
                // `--tls-cert node-a` names node-a.crt.
                if !c.exists() && c.extension().is_none() {
                    c.with_extension("crt")
                } else {
                    c
                }
            }
            None => {
                let mut found = Vec::new();
                for e in fs::read_dir(dir).map_err(io_err(dir))? {
                    let p = e.map_err(io_err(dir))?.path();
                    if p.extension().is_some_and(|x| x == "crt")
                        && p.file_name().is_some_and(|n| n != CA_CERT)
                    {
                        found.push(p);
                    }
                }
                found.sort();
                match found.len() {
                    1 => found.remove(0),
                    0 => {
                        return Err(TlsError::Choose {
                            dir: dir.to_path_buf(),
                            what: format!(
                                "no node certificate here; issue one with `horcrux tls issue NAME --dir {} --san ADDRESS`",
                                dir.display()
                            ),
                        });
                    }
                    _ => {
                        let names: Vec<String> = found
                            .iter()
                            .filter_map(|p| p.file_stem()?.to_str().map(str::to_string))
                            .collect();
                        return Err(TlsError::Choose {
                            dir: dir.to_path_buf(),
                            what: format!(
                                "several node certificates here ({}); choose one with --tls-cert NAME",
                                names.join(", ")
                            ),
                        });
                    }
                }
            }
        };
        let key = match key {
            Some(k) => in_dir(k),
            None => cert.with_extension("key"),
        };
        Ok(Self { ca, cert, key })
    }
}

/// The crypto all peer connections use: AWS-LC's AEADs (AES-GCM, ChaCha20) for the records,
/// ring for key exchange, signatures and randomness. AWS-LC alone spent 65-145 ms seeding its
/// random generator at a process's first handshake, which every short-lived client (and every
/// mount's first peer read) would pay; ring's handshake costs ~1 ms.
///
/// AES-128-GCM comes first (AWS-LC's own order puts AES-256 first): with AES-NI both are far
/// faster than the link, but 128-bit keys take 10 AES rounds instead of 14 on every byte of
/// the bulk path, on the same cores as the reader. The others stay, for peers that lack it.
fn provider() -> Arc<CryptoProvider> {
    let ring = rustls::crypto::ring::default_provider();
    let aws = rustls::crypto::aws_lc_rs::default_provider();
    let mut suites = aws.cipher_suites;
    suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..ring
    })
}

/// A node's loaded identity and trust anchor.
#[derive(Debug)]
struct Loaded {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let ca_pem = fs::read(&files.ca).map_err(io_err(&files.ca))?;
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(&files.ca, &ca_pem)? {
        roots.add(c).map_err(|e| TlsError::Bad {
            path: files.ca.clone(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::Bad {
            path: files.ca.clone(),
            what: "no certificate in it".into(),
        });
    }
    let cert_pem = fs::read(&files.cert).map_err(io_err(&files.cert))?;
    let chain = certs_from_pem(&files.cert, &cert_pem)?;
    if chain.is_empty() {
        return Err(TlsError::Bad {
            path: files.cert.clone(),
            what: "no certificate in it (expected PEM `BEGIN CERTIFICATE`)".into(),
        });
    }
    let key_pem = read_text(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Bad {
        path: files.key.clone(),
        what: format!("not a PEM private key: {e}"),
    })?;
    let kp = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Bad {
        path: files.key.clone(),
        what: format!("unsupported private key: {e}"),
    })?;
    check_key_matches(&files.cert, &chain[0], &files.key, &kp)?;
    Ok(Loaded { roots, chain, key })
}

/// ALPN of the peer service: HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// Server side: TLS 1.3, a client certificate of the CA required.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let l = load(files)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(l.roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain, l.key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side: TLS 1.3, the server's certificate checked against the CA and the dialled
/// name or address, this node's certificate presented.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let l = load(files)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(l.roots)
        .with_client_auth_cert(l.chain, l.key)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Both configurations of a node.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl TlsConfig {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            server: server_config(files)?,
            client: client_config(files)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_modes_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tls");
        assert!(matches!(issue(&dir, "node-a", &[]), Err(TlsError::NoCa(_))));
        let w = init_ca(&dir, "test CA", false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&w.key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert!(matches!(
            init_ca(&dir, "test CA", false),
            Err(TlsError::CaExists(_))
        ));
        let n = issue(&dir, "node-a", &["127.0.0.1".into(), "node-a.test".into()]).unwrap();
        assert_eq!(mode(&n.key), 0o600);
        let files = TlsFiles::find(&dir, None, None).unwrap();
        assert_eq!(files.cert, n.cert);
        TlsConfig::load(&files).unwrap();
        // Re-issuing rotates: a new key.
        let before = fs::read(&n.key).unwrap();
        issue(&dir, "node-a", &["127.0.0.1".into()]).unwrap();
        assert_ne!(before, fs::read(&n.key).unwrap());
        // Two node certificates: the caller must choose.
        issue(&dir, "node-b", &[]).unwrap();
        let err = TlsFiles::find(&dir, None, None).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        let b = TlsFiles::find(&dir, Some(Path::new("node-b")), None).unwrap();
        assert!(b.cert.ends_with("node-b.crt"));
        // A key of another certificate is refused clearly.
        let mixed = TlsFiles {
            key: dir.join("node-a.key"),
            ..b
        };
        let err = TlsConfig::load(&mixed).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        // Unreadable / garbage files.
        fs::write(dir.join("node-b.crt"), "garbage").unwrap();
        let b = TlsFiles::find(&dir, Some(Path::new("node-b")), None).unwrap();
        assert!(TlsConfig::load(&b).is_err());
        assert!(matches!(
            issue(&dir, "../evil", &[]),
            Err(TlsError::BadName(_))
        ));
        // --force replaces the CA.
        init_ca(&dir, "test CA", true).unwrap();
    }
}
