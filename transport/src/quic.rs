//! QUIC endpoints (quinn) with TLS 1.3 and mutual authentication from PEM
//! files, for every ftvm channel (witness, log).
//!
//! Both sides present a certificate signed by the cluster CA
//! ([`TlsFiles::ca`]). The server verifies client certificates with rustls's
//! `WebPkiClientVerifier` (a client without a certificate, or with one from
//! another CA, fails the handshake); the client verifies the server's
//! certificate against the same CA and the server name it dialled. The
//! application protocol is chosen by ALPN ([`ALPN_WITNESS`], [`ALPN_LOG`]); a
//! peer offering another protocol fails the handshake. Keep-alive and idle
//! timeouts are always set explicitly ([`QuicOptions`]).
//!
//! After the handshake, [`peer_node_name`] gives the authenticated node name
//! of the peer: the subject common name of its certificate (which must also be
//! one of its DNS subject alternative names when it has any), or its only DNS
//! name when it has no common name. Applications check that name against
//! their configuration.
//!
//! Crypto is rustls with the ring provider only.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// ALPN of the witness protocol.
pub const ALPN_WITNESS: &[u8] = b"ftvm-witness/1";
/// ALPN of the log channel between primary and backup.
pub const ALPN_LOG: &[u8] = b"ftvm-log/1";

/// The PEM files of one identity: the cluster CA that peers must be signed
/// by, this node's certificate (chain) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// QUIC congestion controllers ftvm can ask quinn for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    #[default]
    Cubic,
    /// Marked experimental in quinn; keeps a long fat pipe full despite loss.
    Bbr,
    NewReno,
}

/// QUIC transport settings that ftvm always sets explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicOptions {
    /// Interval of keep-alive packets (must be below `idle_timeout`).
    pub keep_alive: Duration,
    /// A connection with no packets for this long is closed.
    pub idle_timeout: Duration,
    /// Bidirectional streams the peer may have open at once.
    pub max_bidi_streams: u32,
    /// Unidirectional streams the peer may have open at once.
    pub max_uni_streams: u32,
    /// Bytes the peer may send on one stream before we read them, and on
    /// the whole connection; `None` keeps quinn's defaults (about 1.25 MB per
    /// stream, which caps one stream near 25 MB/s at 50 ms RTT).
    pub receive_window: Option<u64>,
    /// Bytes we may have in flight unacknowledged; `None`: quinn's default.
    pub send_window: Option<u64>,
    pub congestion: CongestionControl,
}

impl Default for QuicOptions {
    fn default() -> Self {
        QuicOptions {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            max_bidi_streams: 16,
            max_uni_streams: 0,
            receive_window: None,
            send_window: None,
            congestion: CongestionControl::Cubic,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("{path}: cannot read {what}: {source}")]
    ReadFile {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no usable {what} in PEM file: {message}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("{path}: bad CA certificate: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("certificate {cert} with key {key} refused: {message}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("invalid QUIC options: {0}")]
    Options(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr} as {server_name:?}: {message}")]
    Connect {
        addr: SocketAddr,
        server_name: String,
        message: String,
    },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("handshake with {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate unusable: {0}")]
    BadPeerCertificate(String),
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, QuicError> {
    std::fs::read(path).map_err(|source| QuicError::ReadFile {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, QuicError> {
    let bytes = read(path, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QuicError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(QuicError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            message: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, QuicError> {
    let bytes = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| QuicError::Pem {
        path: path.to_path_buf(),
        what: "private key",
        message: e.to_string(),
    })
}

fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, QuicError> {
    let certs = load_certs(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| QuicError::Ca {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(opts: &QuicOptions) -> Result<Arc<quinn::TransportConfig>, QuicError> {
    if opts.keep_alive.is_zero() || opts.keep_alive >= opts.idle_timeout {
        return Err(QuicError::Options(format!(
            "keep-alive {:?} must be non-zero and below the idle timeout {:?}",
            opts.keep_alive, opts.idle_timeout
        )));
    }
    let idle = quinn::IdleTimeout::try_from(opts.idle_timeout)
        .map_err(|e| QuicError::Options(format!("idle timeout {:?}: {e}", opts.idle_timeout)))?;
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(opts.keep_alive))
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(opts.max_bidi_streams.into())
        .max_concurrent_uni_streams(opts.max_uni_streams.into());
    if let Some(w) = opts.receive_window {
        let var = quinn::VarInt::from_u64(w)
            .map_err(|_| QuicError::Options(format!("receive window {w} is too large")))?;
        // The connection window covers every stream; the log stream must be
        // able to use all of it, and bulk streams must not starve it.
        t.stream_receive_window(var).receive_window(var);
    }
    if let Some(w) = opts.send_window {
        t.send_window(w);
    }
    match opts.congestion {
        CongestionControl::Cubic => {}
        CongestionControl::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        CongestionControl::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
    }
    Ok(Arc::new(t))
}

fn identity(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), QuicError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    Ok((certs, key))
}

fn identity_err(files: &TlsFiles, e: rustls::Error) -> QuicError {
    QuicError::Identity {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    }
}

/// A server config requiring client certificates signed by `files.ca`,
/// presenting `files.cert`, and speaking one of `alpn`.
pub fn server_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
    opts: &QuicOptions,
) -> Result<quinn::ServerConfig, QuicError> {
    let roots = load_roots(&files.ca)?;
    let (certs, key) = identity(files)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| QuicError::Ca {
            path: files.ca.clone(),
            message: e.to_string(),
        })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| identity_err(files, e))?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(opts)?);
    Ok(cfg)
}

/// A client config trusting servers signed by `files.ca`, authenticating
/// with `files.cert`/`files.key`, and offering `alpn`.
pub fn client_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
    opts: &QuicOptions,
) -> Result<quinn::ClientConfig, QuicError> {
    let roots = load_roots(&files.ca)?;
    let (certs, key) = identity(files)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| identity_err(files, e))?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(opts)?);
    Ok(cfg)
}

/// A server endpoint bound to `addr` (port 0 picks a free port; see
/// `Endpoint::local_addr`). Must be called inside a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, QuicError> {
    quinn::Endpoint::server(config, addr).map_err(|source| QuicError::Bind { addr, source })
}

/// A client endpoint bound to `bind` (e.g. `0.0.0.0:0`) using `config` for
/// its connections. Must be called inside a tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, QuicError> {
    let mut ep =
        quinn::Endpoint::client(bind).map_err(|source| QuicError::Bind { addr: bind, source })?;
    ep.set_default_client_config(config);
    Ok(ep)
}

/// An endpoint that both accepts connections (with `server`) and makes them
/// (with `client`): each node of a pair is dialled by its peer when it is
/// primary and dials its peer when it is backup. Must be called inside a
/// tokio runtime.
pub fn dual_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
) -> Result<quinn::Endpoint, QuicError> {
    let mut ep = server_endpoint(addr, server)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Connects to `addr`, checking that the server's certificate is valid for
/// `server_name` (the server's node name), within `timeout`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, QuicError> {
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| QuicError::Connect {
            addr,
            server_name: server_name.to_string(),
            message: e.to_string(),
        })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(QuicError::Handshake { addr, source }),
        Err(_) => Err(QuicError::Timeout {
            addr,
            after: timeout,
        }),
    }
}

/// The authenticated node name of the peer of an established connection.
pub fn peer_node_name(conn: &quinn::Connection) -> Result<String, QuicError> {
    let identity = conn.peer_identity().ok_or(QuicError::NoPeerCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| QuicError::BadPeerCertificate("unexpected identity type".into()))?;
    let leaf = certs.first().ok_or(QuicError::NoPeerCertificate)?;
    node_name_from_cert(leaf)
}

/// The node name a certificate carries: its subject CN (which must be among
/// its DNS SANs if it has any), or its only DNS SAN when it has no CN.
pub fn node_name_from_cert(der: &CertificateDer<'_>) -> Result<String, QuicError> {
    use x509_parser::extensions::GeneralName;
    let bad = |m: String| QuicError::BadPeerCertificate(m);
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let cn = match cert.subject().iter_common_name().next() {
        Some(attr) => Some(
            attr.as_str()
                .map_err(|e| bad(format!("common name is not a string: {e}")))?
                .to_string(),
        ),
        None => None,
    };
    let mut dns = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("subject alternative name: {e}")))?
    {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                dns.push(d.to_string());
            }
        }
    }
    let name = match cn {
        Some(cn) => {
            if !dns.is_empty() && !dns.contains(&cn) {
                return Err(bad(format!(
                    "common name {cn:?} is not among its DNS names {dns:?}"
                )));
            }
            cn
        }
        None if dns.len() == 1 => dns.remove(0),
        None => {
            return Err(bad(format!(
                "no common name and {} DNS names: cannot tell the node name",
                dns.len()
            )))
        }
    };
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return Err(bad(format!("unusable node name {name:?}")));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn files(dir: &Path, node: &str) -> TlsFiles {
        let (cert, key) = pki::node_files(dir, node);
        TlsFiles {
            ca: dir.join(pki::CA_CERT_FILE),
            cert,
            key,
        }
    }

    #[test]
    fn missing_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path()).unwrap();
        pki::issue_node(dir.path(), "a").unwrap();
        let mut f = files(dir.path(), "a");
        f.key = dir.path().join("nope.key");
        let err = server_config(&f, &[ALPN_WITNESS], &QuicOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.key"), "{err}");
        let err = client_config(&f, &[ALPN_WITNESS], &QuicOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.key"), "{err}");
    }

    #[test]
    fn key_not_matching_cert_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path()).unwrap();
        pki::issue_node(dir.path(), "a").unwrap();
        pki::issue_node(dir.path(), "b").unwrap();
        let mut f = files(dir.path(), "a");
        f.key = dir.path().join("b.key");
        let err = client_config(&f, &[ALPN_LOG], &QuicOptions::default()).unwrap_err();
        assert!(matches!(err, QuicError::Identity { .. }), "{err}");
        // A file that is not PEM at all names the file.
        std::fs::write(dir.path().join("junk.pem"), "hello").unwrap();
        f.ca = dir.path().join("junk.pem");
        let err = client_config(&f, &[ALPN_LOG], &QuicOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("junk.pem"), "{err}");
    }

    #[test]
    fn keep_alive_must_be_below_idle() {
        let o = QuicOptions {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            ..QuicOptions::default()
        };
        assert!(matches!(transport(&o), Err(QuicError::Options(_))));
    }

    async fn echo_once(server: quinn::Endpoint) -> anyhow::Result<String> {
        let inc = server.accept().await.ok_or(anyhow::anyhow!("closed"))?;
        let conn = inc.await?;
        let name = peer_node_name(&conn)?;
        let (mut s, mut r) = conn.accept_bi().await?;
        let f = crate::frame::read_frame_async(&mut r, 1024).await?;
        let f = f.ok_or(anyhow::anyhow!("eof"))?;
        crate::frame::write_frame_async(&mut s, f.kind, &f.payload, 1024).await?;
        s.finish()?;
        conn.closed().await;
        Ok(name)
    }

    #[tokio::test]
    async fn mutual_tls_round_trip_names_both_peers() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path()).unwrap();
        pki::issue_node(dir.path(), "srv").unwrap();
        pki::issue_node(dir.path(), "node-a").unwrap();
        let opts = QuicOptions::default();
        let scfg = server_config(&files(dir.path(), "srv"), &[ALPN_LOG], &opts).unwrap();
        let server = server_endpoint("127.0.0.1:0".parse().unwrap(), scfg).unwrap();
        let addr = server.local_addr().unwrap();
        let task = tokio::spawn(echo_once(server));
        let ccfg = client_config(&files(dir.path(), "node-a"), &[ALPN_LOG], &opts).unwrap();
        let client = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg).unwrap();
        let conn = connect(&client, addr, "srv", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(peer_node_name(&conn).unwrap(), "srv");
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        crate::frame::write_frame_async(&mut s, 4, b"ping", 1024)
            .await
            .unwrap();
        let back = crate::frame::read_frame_async(&mut r, 1024)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.payload, b"ping");
        conn.close(0u32.into(), b"done");
        assert_eq!(task.await.unwrap().unwrap(), "node-a");
    }

    #[tokio::test]
    async fn wrong_server_name_or_alpn_fails_handshake() {
        let dir = tempfile::tempdir().unwrap();
        pki::init_ca(dir.path()).unwrap();
        pki::issue_node(dir.path(), "srv").unwrap();
        pki::issue_node(dir.path(), "node-a").unwrap();
        let opts = QuicOptions::default();
        let scfg = server_config(&files(dir.path(), "srv"), &[ALPN_WITNESS], &opts).unwrap();
        let server = server_endpoint("127.0.0.1:0".parse().unwrap(), scfg).unwrap();
        let addr = server.local_addr().unwrap();
        let srv = server.clone();
        tokio::spawn(async move {
            while let Some(inc) = srv.accept().await {
                tokio::spawn(async move {
                    let _ = inc.await;
                });
            }
        });
        let ccfg = client_config(&files(dir.path(), "node-a"), &[ALPN_LOG], &opts).unwrap();
        let client = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg).unwrap();
        let err = connect(&client, addr, "srv", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, QuicError::Handshake { .. }), "{err}");
        let ccfg = client_config(&files(dir.path(), "node-a"), &[ALPN_WITNESS], &opts).unwrap();
        let client = client_endpoint("127.0.0.1:0".parse().unwrap(), ccfg).unwrap();
        let err = connect(&client, addr, "not-srv", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.to_lowercase().contains("certificate"), "{err}");
    }
}
