//! Development PKI: a cluster CA and node certificates, for tests and labs.
//!
//! `ftvm certs init --dir D` writes `D/ca.pem` and `D/ca.key`;
//! `ftvm certs issue --dir D --node NAME` writes `D/NAME.pem` and `D/NAME.key`,
//! signed by that CA. A node certificate carries the node name as its subject
//! common name and as a DNS subject alternative name: that name is what peers
//! check (see [`crate::quic::peer_node_name`]). Production users bring their own
//! CA and issue certificates with the same shape. Keys are written with mode
//! 0600 and existing files are never overwritten.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `ftvm certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA (`ca.pem`, `ca.key`) in DIR (for tests and labs).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for node NAME (`NAME.pem`, `NAME.key`) signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        /// An IP address the certificate also names (repeatable): for
        /// servers reached by address, such as etcd members.
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName { name: String, reason: String },
    #[error("{path}: already exists; refusing to overwrite it (remove it first)")]
    Exists { path: PathBuf },
    #[error("{path}: cannot create directory: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read: {source} (run `ftvm certs init --dir` first?)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable CA file: {message}")]
    BadCa { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Name of the CA certificate file in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// Name of the CA key file in a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Paths of a node's certificate and key in a PKI directory.
pub fn node_files(dir: &Path, node: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{node}.pem")),
        dir.join(format!("{node}.key")),
    )
}

/// Runs one `ftvm certs` subcommand.
pub fn run_certs(cmd: &CertsCommand) -> Result<(), PkiError> {
    match cmd {
        CertsCommand::Init { dir } => init_ca(dir),
        CertsCommand::Issue { dir, node, ips } => issue_node_with_ips(dir, node, ips),
    }
}

/// Checks that `name` can be a node name: it becomes a DNS subject alternative
/// name, so it is one or more dot-separated labels of `a-z`, `0-9` and `-`
/// (no label starts or ends with `-`), at most 253 bytes.
pub fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| PkiError::InvalidNodeName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 bytes long"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label must be 1 to 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(
                "only lowercase letters, digits, '-' and '.' are allowed",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label may not start or end with '-'"));
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad("must not look like an IP address"));
    }
    Ok(())
}

/// Creates a new cluster CA in `dir` (created if missing): `ca.pem`, `ca.key`.
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    // A name unique to this CA (from its key), so that certificates of two
    // development CAs are told apart by issuer name, not only by signature.
    let fp: String = key
        .public_key_raw()
        .iter()
        .rev()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("ftvm development CA {fp}"));
    dn.push(DnType::OrganizationName, "ftvm (testing and labs only)");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    tracing::info!(cert = %cert_path.display(), key = %key_path.display(), "created development CA");
    Ok(())
}

/// Issues a certificate for `node` signed by the CA in `dir`: `<node>.pem`,
/// `<node>.key`. The node name is the subject CN and a DNS SAN; the
/// certificate is valid for both client and server authentication.
pub fn issue_node(dir: &Path, node: &str) -> Result<(), PkiError> {
    issue_node_with_ips(dir, node, &[])
}

/// Like [`issue_node`], with `ips` as IP address SANs as well (a server
/// reached by address, e.g. an etcd member whose URLs name its IP).
pub fn issue_node_with_ips(
    dir: &Path,
    node: &str,
    ips: &[std::net::IpAddr],
) -> Result<(), PkiError> {
    validate_node_name(node)?;
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| PkiError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let ca_key_pem = read(&ca_key_path)?;
    let ca_cert_pem = read(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadCa {
        path: ca_key_path.clone(),
        message: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(|e| PkiError::BadCa {
        path: ca_cert_path.clone(),
        message: e.to_string(),
    })?;

    let (cert_path, key_path) = node_files(dir, node);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(node.try_into()?)];
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), true)?;
    write_new(&cert_path, cert.pem().as_bytes(), false)?;
    tracing::info!(node, cert = %cert_path.display(), key = %key_path.display(), "issued node certificate");
    Ok(())
}

/// Writes a file that must not exist yet; keys get mode 0600.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if secret {
        opts.mode(0o600);
    }
    let err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_writes_four_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        issue_node(dir.path(), "node-a").unwrap();
        for f in ["ca.pem", "ca.key", "node-a.pem", "node-a.key"] {
            assert!(dir.path().join(f).exists(), "{f} missing");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node-a.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        assert!(matches!(init_ca(dir.path()), Err(PkiError::Exists { .. })));
        assert!(matches!(
            issue_node(dir.path(), "node-a"),
            Err(PkiError::Exists { .. })
        ));
        // The node name is in the certificate as CN and DNS SAN.
        let pem = std::fs::read(dir.path().join("node-a.pem")).unwrap();
        let der = crate::quic::load_certs(&dir.path().join("node-a.pem")).unwrap();
        assert!(!pem.is_empty());
        assert_eq!(crate::quic::node_name_from_cert(&der[0]).unwrap(), "node-a");
    }

    #[test]
    fn ip_addresses_become_ip_sans_and_the_name_stays() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let ip: std::net::IpAddr = "10.77.0.11".parse().unwrap();
        run_certs(&CertsCommand::Issue {
            dir: dir.path().to_path_buf(),
            node: "etcd-1".into(),
            ips: vec![ip],
        })
        .unwrap();
        let der = crate::quic::load_certs(&dir.path().join("etcd-1.pem")).unwrap();
        assert_eq!(crate::quic::node_name_from_cert(&der[0]).unwrap(), "etcd-1");
        let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::IPAddress(b) if *b == [10, 77, 0, 11]
        )));
    }

    #[test]
    fn issue_without_ca_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue_node(dir.path(), "node-a").unwrap_err().to_string();
        assert!(err.contains("ca.key"), "{err}");
    }

    #[test]
    fn bad_node_names_refused() {
        for n in ["", "Node", "a b", "-a", "a..b", "../x", "1.2.3.4", "a_b"] {
            assert!(validate_node_name(n).is_err(), "{n:?} accepted");
        }
        for n in ["node-a", "witness", "a1.site-b.example"] {
            validate_node_name(n).unwrap();
        }
    }
}
