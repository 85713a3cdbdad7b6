//! Witness configuration: the service's file (`ftvm-witness run --config`)
//! and the client settings a node uses to reach it (a `[witness]` table, in a
//! file of its own or inside the appliance's config). See docs/witness.md.
//!
//! ```toml
//! # witness.toml
//! [server]
//! node = "witness"              # this witness's node name (its certificate's)
//! listen = "0.0.0.0:7470"
//! db = "witness.db"             # sled directory, relative to this file
//! ca = "pki/ca.pem"
//! cert = "pki/witness.pem"
//! key = "pki/witness.key"
//!
//! [[cluster]]
//! name = "prod"
//! members = ["node-a", "node-b"]
//! ```
//!
//! A node's `[witness]` table names either an `ftvm-witness` (`kind = "ftvm"`,
//! the default: `address`, `server_name`) or an etcd cluster (`kind = "etcd"`:
//! `endpoints`, optional `key_prefix` and `server_name`); the TLS files,
//! cluster, timeouts and retries are common to both.
//!
//! ```toml
//! [witness]
//! kind = "etcd"
//! endpoints = ["https://10.0.1.5:2379", "https://10.0.2.5:2379", "https://10.0.3.5:2379"]
//! cluster = "prod"
//! ca = "pki/ca.pem"
//! cert = "pki/node-a.pem"
//! key = "pki/node-a.key"
//! ```

use crate::{load_toml, resolve_path, ConfigError};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Largest witness frame payload a config may allow.
pub const MAX_FRAME_BYTES_LIMIT: u32 = 65536;
/// Smallest witness frame payload a config may allow.
pub const MIN_FRAME_BYTES_LIMIT: u32 = 256;
/// Longest cluster name, in bytes.
pub const MAX_CLUSTER_NAME: usize = 64;
/// Most members a cluster may list.
pub const MAX_MEMBERS: usize = 16;
/// Most clusters one witness serves (a status of all of them fits one frame).
pub const MAX_CLUSTERS: usize = 128;

/// The whole `ftvm-witness` config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    pub server: ServerConfig,
    /// The clusters served (`[[cluster]]` tables).
    #[serde(rename = "cluster", default)]
    pub clusters: Vec<ClusterConfig>,
    /// Optional client identity that `ftvm-witness status` and `claim` use to
    /// ask the running witness over QUIC.
    #[serde(default)]
    pub control: Option<WitnessClientConfig>,
    /// Where the file was loaded from; relative paths were resolved against it.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The witness's node name; its certificate must carry it.
    pub node: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The sled database directory.
    pub db: PathBuf,
    /// Cluster CA certificate (PEM): clients must present a certificate it signed.
    pub ca: PathBuf,
    /// The witness's certificate (PEM).
    pub cert: PathBuf,
    /// The witness's private key (PEM).
    pub key: PathBuf,
    /// Nodes (by certificate name) that may ask for the status of every
    /// cluster. Members may always ask about their own cluster.
    #[serde(default)]
    pub operators: Vec<String>,
    /// QUIC keep-alive interval, milliseconds.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// QUIC idle timeout, milliseconds.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Largest request frame payload accepted, bytes; a larger one ends the connection.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// A stream that has not delivered its request within this time is closed.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Connections served at once; more are refused at the handshake.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

/// One cluster: a name and the node names allowed to claim in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    pub members: Vec<String>,
}

/// Which kind of witness a node asks (`[witness] kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WitnessKind {
    /// One `ftvm-witness` process (QUIC with mutual TLS, sled).
    #[default]
    Ftvm,
    /// An etcd v3 cluster (gRPC over TLS with client certificates).
    Etcd,
}

impl WitnessKind {
    /// The name used in config files (`ftvm`, `etcd`).
    pub fn name(self) -> &'static str {
        match self {
            WitnessKind::Ftvm => "ftvm",
            WitnessKind::Etcd => "etcd",
        }
    }
}

/// Where a cluster's keys live in etcd when `key_prefix` is not set.
pub const DEFAULT_ETCD_KEY_PREFIX: &str = "/ftvm/witness";
/// Most etcd endpoints a `[witness]` table may list.
pub const MAX_ETCD_ENDPOINTS: usize = 16;
/// Longest etcd key prefix, in bytes.
pub const MAX_ETCD_KEY_PREFIX: usize = 128;

/// How a node (or an operator tool) reaches the witness: a `[witness]` table.
/// `kind` picks the backend; the keys of the other backend are refused, so a
/// file never says two things.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessClientConfig {
    /// `ftvm` (default) or `etcd`.
    #[serde(default)]
    pub kind: WitnessKind,
    /// kind = "ftvm": the witness's address, `host:port` (required).
    #[serde(default)]
    pub address: Option<String>,
    /// kind = "ftvm": the witness's node name, checked against its
    /// certificate (required). kind = "etcd": optional; a name every etcd
    /// member's certificate carries, checked instead of each endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// kind = "etcd": the members' client URLs, `https://host:port` (required).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// kind = "etcd": where the clusters' keys live; cluster C's epoch is the
    /// key `<key_prefix>/<C>/epoch`. Default [`DEFAULT_ETCD_KEY_PREFIX`].
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// The cluster this node belongs to (required for a node; optional for `[control]`).
    #[serde(default)]
    pub cluster: Option<String>,
    /// CA certificate (PEM) that signed the witness's (or etcd members') certificates.
    pub ca: PathBuf,
    /// This node's certificate (PEM); its name is the node's name.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// Time allowed for one connection (handshake), milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for one request's answer, milliseconds.
    #[serde(default = "default_client_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Attempts per request (1 = no retry). No answer after all of them is
    /// reported as "no answer", never as a grant.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Pause between attempts, milliseconds (doubles each time).
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Keep-alive interval, milliseconds (QUIC; HTTP/2 pings for etcd).
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// A connection silent this long is closed, milliseconds (QUIC idle
    /// timeout; for etcd, how long a keep-alive ping may go unanswered).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

/// A file holding only a `[witness]` table (the node-side settings).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    witness: WitnessClientConfig,
}

fn default_keep_alive_ms() -> u64 {
    1000
}
fn default_idle_timeout_ms() -> u64 {
    10_000
}
fn default_max_frame_bytes() -> u32 {
    4096
}
fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_max_connections() -> u32 {
    1024
}
fn default_connect_timeout_ms() -> u64 {
    2000
}
fn default_client_request_timeout_ms() -> u64 {
    2000
}
fn default_attempts() -> u32 {
    3
}
fn default_retry_backoff_ms() -> u64 {
    200
}

/// Checks a node name: dot-separated labels of `a-z`, `0-9`, `-` (it becomes
/// a DNS name in certificates). Returns what is wrong.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("node name {name:?} must be 1 to 253 bytes"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "node name {name:?}: use dot-separated labels of a-z, 0-9 and '-' (not at a label's ends)"
            ));
        }
    }
    Ok(())
}

/// Checks a cluster name: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`.
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLUSTER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cluster name {name:?} must be 1 to {MAX_CLUSTER_NAME} bytes of letters, digits, '.', '_' and '-'"
        ))
    }
}

fn check_timeouts(
    f: &Path,
    prefix: &str,
    keep_alive_ms: u64,
    idle_timeout_ms: u64,
) -> Result<(), ConfigError> {
    if keep_alive_ms == 0 {
        return Err(ConfigError::invalid(
            f,
            &format!("{prefix}.keep_alive_ms"),
            "must be at least 1",
        ));
    }
    if idle_timeout_ms <= keep_alive_ms {
        return Err(ConfigError::invalid(
            f,
            &format!("{prefix}.idle_timeout_ms"),
            format!("{idle_timeout_ms} must be greater than keep_alive_ms ({keep_alive_ms})"),
        ));
    }
    Ok(())
}

impl WitnessConfig {
    /// Loads, resolves relative paths and validates a witness config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let mut cfg: WitnessConfig = load_toml(file)?;
        cfg.source = file.to_path_buf();
        let s = &mut cfg.server;
        s.db = resolve_path(file, &s.db);
        s.ca = resolve_path(file, &s.ca);
        s.cert = resolve_path(file, &s.cert);
        s.key = resolve_path(file, &s.key);
        if let Some(c) = &mut cfg.control {
            c.resolve(file);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The cluster named `name`, if served.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let f = &self.source;
        let s = &self.server;
        check_node_name(&s.node).map_err(|m| ConfigError::invalid(f, "server.node", m))?;
        for (i, op) in s.operators.iter().enumerate() {
            check_node_name(op)
                .map_err(|m| ConfigError::invalid(f, &format!("server.operators[{i}]"), m))?;
        }
        check_timeouts(f, "server", s.keep_alive_ms, s.idle_timeout_ms)?;
        if !(MIN_FRAME_BYTES_LIMIT..=MAX_FRAME_BYTES_LIMIT).contains(&s.max_frame_bytes) {
            return Err(ConfigError::invalid(
                f,
                "server.max_frame_bytes",
                format!(
                    "{} is out of range {MIN_FRAME_BYTES_LIMIT}..={MAX_FRAME_BYTES_LIMIT}",
                    s.max_frame_bytes
                ),
            ));
        }
        if s.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                f,
                "server.request_timeout_ms",
                "must be at least 1",
            ));
        }
        if s.max_connections == 0 {
            return Err(ConfigError::invalid(
                f,
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if self.clusters.is_empty() {
            return Err(ConfigError::invalid(
                f,
                "cluster",
                "at least one [[cluster]] table is required",
            ));
        }
        if self.clusters.len() > MAX_CLUSTERS {
            return Err(ConfigError::invalid(
                f,
                "cluster",
                format!(
                    "{} clusters; one witness serves at most {MAX_CLUSTERS}",
                    self.clusters.len()
                ),
            ));
        }
        for (i, c) in self.clusters.iter().enumerate() {
            let key = format!("cluster[{i}]");
            check_cluster_name(&c.name)
                .map_err(|m| ConfigError::invalid(f, &format!("{key}.name"), m))?;
            if self.clusters[..i].iter().any(|o| o.name == c.name) {
                return Err(ConfigError::invalid(
                    f,
                    &format!("{key}.name"),
                    format!("cluster {:?} is listed twice", c.name),
                ));
            }
            if c.members.is_empty() || c.members.len() > MAX_MEMBERS {
                return Err(ConfigError::invalid(
                    f,
                    &format!("{key}.members"),
                    format!("must list 1 to {MAX_MEMBERS} node names"),
                ));
            }
            for (j, m) in c.members.iter().enumerate() {
                let mkey = format!("{key}.members[{j}]");
                check_node_name(m).map_err(|msg| ConfigError::invalid(f, &mkey, msg))?;
                if c.members[..j].contains(m) {
                    return Err(ConfigError::invalid(
                        f,
                        &mkey,
                        format!("{m:?} is listed twice"),
                    ));
                }
            }
        }
        if let Some(c) = &self.control {
            if c.kind != WitnessKind::Ftvm {
                return Err(ConfigError::invalid(
                    f,
                    "control.kind",
                    "must be \"ftvm\": [control] reaches this ftvm-witness",
                ));
            }
            c.validate(f, "control", false)?;
        }
        Ok(())
    }
}

impl WitnessClientConfig {
    /// Loads a node-side file holding a `[witness]` table; the cluster is required.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let parsed: ClientFile = load_toml(file)?;
        let mut cfg = parsed.witness;
        cfg.resolve(file);
        cfg.validate(file, "witness", true)?;
        Ok(cfg)
    }

    /// Resolves relative PEM paths against the directory of `config_file`
    /// (for a `[witness]` table embedded in another config).
    pub fn resolve(&mut self, config_file: &Path) {
        self.ca = resolve_path(config_file, &self.ca);
        self.cert = resolve_path(config_file, &self.cert);
        self.key = resolve_path(config_file, &self.key);
    }

    /// The etcd key prefix (the configured one or the default).
    pub fn key_prefix(&self) -> &str {
        self.key_prefix
            .as_deref()
            .unwrap_or(DEFAULT_ETCD_KEY_PREFIX)
    }

    /// Validates the table found at `prefix` (e.g. `witness`) in `file`.
    pub fn validate(
        &self,
        file: &Path,
        prefix: &str,
        require_cluster: bool,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        match self.kind {
            WitnessKind::Ftvm => self.validate_ftvm(file, prefix)?,
            WitnessKind::Etcd => self.validate_etcd(file, prefix)?,
        }
        match &self.cluster {
            Some(c) => {
                check_cluster_name(c).map_err(|m| ConfigError::invalid(file, &key("cluster"), m))?
            }
            None if require_cluster => {
                return Err(ConfigError::invalid(
                    file,
                    &key("cluster"),
                    "is required (the cluster this node belongs to)",
                ))
            }
            None => {}
        }
        for (k, v) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(file, &key(k), "must be at least 1"));
            }
        }
        if !(1..=100).contains(&self.attempts) {
            return Err(ConfigError::invalid(
                file,
                &key("attempts"),
                format!("{} is out of range 1..=100", self.attempts),
            ));
        }
        check_timeouts(file, prefix, self.keep_alive_ms, self.idle_timeout_ms)
    }

    fn validate_ftvm(&self, file: &Path, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let only_etcd = |k: &str| {
            ConfigError::invalid(
                file,
                &key(k),
                "is only for kind = \"etcd\" (this table has kind = \"ftvm\")",
            )
        };
        if !self.endpoints.is_empty() {
            return Err(only_etcd("endpoints"));
        }
        if self.key_prefix.is_some() {
            return Err(only_etcd("key_prefix"));
        }
        let address = self.address.as_deref().ok_or_else(|| {
            ConfigError::invalid(
                file,
                &key("address"),
                "is required (the witness's host:port)",
            )
        })?;
        if !is_host_port(address) {
            return Err(ConfigError::invalid(
                file,
                &key("address"),
                format!("{address:?} is not host:port"),
            ));
        }
        let server_name = self.server_name.as_deref().ok_or_else(|| {
            ConfigError::invalid(
                file,
                &key("server_name"),
                "is required (the witness's node name, as in its certificate)",
            )
        })?;
        check_node_name(server_name).map_err(|m| ConfigError::invalid(file, &key("server_name"), m))
    }

    fn validate_etcd(&self, file: &Path, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        if self.address.is_some() {
            return Err(ConfigError::invalid(
                file,
                &key("address"),
                "is only for kind = \"ftvm\"; an etcd witness is reached through `endpoints`",
            ));
        }
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ETCD_ENDPOINTS {
            return Err(ConfigError::invalid(
                file,
                &key("endpoints"),
                format!(
                    "must list 1 to {MAX_ETCD_ENDPOINTS} etcd client URLs (https://host:port), one per member"
                ),
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let k = key(&format!("endpoints[{i}]"));
            check_etcd_endpoint(e).map_err(|m| ConfigError::invalid(file, &k, m))?;
            if self.endpoints[..i].contains(e) {
                return Err(ConfigError::invalid(
                    file,
                    &k,
                    format!("{e:?} is listed twice"),
                ));
            }
        }
        if let Some(p) = &self.key_prefix {
            check_etcd_key_prefix(p)
                .map_err(|m| ConfigError::invalid(file, &key("key_prefix"), m))?;
        }
        if let Some(n) = &self.server_name {
            check_node_name(n).map_err(|m| ConfigError::invalid(file, &key("server_name"), m))?;
        }
        Ok(())
    }
}

fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

/// Checks an etcd endpoint: `https://host:port` and nothing else (the etcd
/// backend always uses TLS with a client certificate).
pub fn check_etcd_endpoint(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "{url:?} must start with https:// (the etcd witness is reached over TLS with a client certificate)"
        ));
    };
    let host_port = rest.strip_suffix('/').unwrap_or(rest);
    let ok = is_host_port(host_port)
        && !host_port
            .bytes()
            .any(|b| b.is_ascii_whitespace() || matches!(b, b'/' | b'?' | b'#' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!("{url:?} is not https://host:port"))
    }
}

/// Checks an etcd key prefix: starts with `/`, does not end with one, at most
/// [`MAX_ETCD_KEY_PREFIX`] bytes of printable ASCII without spaces.
pub fn check_etcd_key_prefix(p: &str) -> Result<(), String> {
    let ok = p.len() > 1
        && p.len() <= MAX_ETCD_KEY_PREFIX
        && p.starts_with('/')
        && !p.ends_with('/')
        && p.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} must start with '/', not end with '/', and be 2 to {MAX_ETCD_KEY_PREFIX} bytes of printable ASCII without spaces"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
node = "witness"
listen = "127.0.0.1:7470"
db = "w.db"
ca = "pki/ca.pem"
cert = "pki/witness.pem"
key = "pki/witness.key"

[[cluster]]
name = "prod"
members = ["node-a", "node-b"]
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("witness.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn good_config_loads_with_resolved_paths() {
        let (dir, p) = write(GOOD);
        let cfg = WitnessConfig::load(&p).unwrap();
        assert_eq!(cfg.server.db, dir.path().join("w.db"));
        assert_eq!(cfg.server.key, dir.path().join("pki/witness.key"));
        assert_eq!(cfg.cluster("prod").unwrap().members.len(), 2);
        assert_eq!(cfg.server.max_frame_bytes, 4096);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (GOOD.replace("\"node-b\"", "\"node-a\""), "cluster[0].members[1]"),
            (GOOD.replace("\"node-b\"", "\"Node B\""), "cluster[0].members[1]"),
            (GOOD.replace("name = \"prod\"", "name = \"\""), "cluster[0].name"),
            (GOOD.replace("node = \"witness\"", "node = \"-w\""), "server.node"),
            (GOOD.replace("127.0.0.1:7470", "nowhere"), "server.listen"),
            (
                GOOD.replace("[[cluster]]", "max_frame_bytes = 10\n[[cluster]]"),
                "server.max_frame_bytes",
            ),
            (
                GOOD.replace("[[cluster]]", "keep_alive_ms = 20000\n[[cluster]]"),
                "server.idle_timeout_ms",
            ),
            (GOOD.replace("members", "memberz"), "cluster[0].memberz"),
            (
                GOOD.split("[[cluster]]").next().unwrap().to_string(),
                "cluster",
            ),
            (
                format!("{GOOD}\n[control]\naddress = \"x\"\nserver_name = \"witness\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n"),
                "control.address",
            ),
        ];
        for (text, key) in cases {
            let (_d, p) = write(&text);
            let err = WitnessConfig::load(&p).unwrap_err().to_string();
            // (the opening backtick only: unknown keys inside arrays of tables are
            // reported by the shared parser with the field name repeated)
            assert!(err.contains(&format!("`{key}")), "{key}: {err}");
            assert!(err.contains("witness.toml"), "{err}");
        }
    }

    #[test]
    fn client_file_requires_cluster_and_names_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node-a.toml");
        let base = "[witness]\naddress = \"127.0.0.1:7470\"\nserver_name = \"witness\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n";
        std::fs::write(&p, base).unwrap();
        let err = WitnessClientConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("`witness.cluster`"), "{err}");
        std::fs::write(&p, format!("{base}cluster = \"prod\"\nattempts = 0\n")).unwrap();
        let err = WitnessClientConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("`witness.attempts`"), "{err}");
        std::fs::write(&p, format!("{base}cluster = \"prod\"\n")).unwrap();
        let cfg = WitnessClientConfig::load(&p).unwrap();
        assert_eq!(cfg.key, dir.path().join("a.key"));
        assert_eq!(cfg.attempts, 3);
        // Existing files (no `kind`) are ftvm-witness clients.
        assert_eq!(cfg.kind, WitnessKind::Ftvm);
    }

    const ETCD: &str = "[witness]\nkind = \"etcd\"\nendpoints = [\"https://10.0.1.5:2379\", \"https://etcd-2.example:2379/\"]\ncluster = \"prod\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n";

    #[test]
    fn etcd_table_loads_with_default_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node-a.toml");
        std::fs::write(&p, ETCD).unwrap();
        let cfg = WitnessClientConfig::load(&p).unwrap();
        assert_eq!(cfg.kind, WitnessKind::Etcd);
        assert_eq!(cfg.endpoints.len(), 2);
        assert_eq!(cfg.key_prefix(), DEFAULT_ETCD_KEY_PREFIX);
        assert_eq!(cfg.ca, dir.path().join("ca.pem"));
        std::fs::write(&p, format!("{ETCD}key_prefix = \"/pairs/eu\"\n")).unwrap();
        assert_eq!(
            WitnessClientConfig::load(&p).unwrap().key_prefix(),
            "/pairs/eu"
        );
    }

    #[test]
    fn bad_etcd_and_mixed_tables_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node-a.toml");
        let ftvm = "[witness]\naddress = \"127.0.0.1:7470\"\nserver_name = \"witness\"\ncluster = \"prod\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n";
        let cases = [
            (
                ETCD.replace("https://10.0.1.5", "http://10.0.1.5"),
                "witness.endpoints[0]",
                "https://",
            ),
            (
                ETCD.replace(":2379/", ""),
                "witness.endpoints[1]",
                "host:port",
            ),
            (
                ETCD.replace("https://etcd-2.example:2379/", "https://10.0.1.5:2379"),
                "witness.endpoints[1]",
                "twice",
            ),
            (
                ETCD.replace("endpoints = [", "endpoints = [] #"),
                "witness.endpoints",
                "1 to 16",
            ),
            (
                format!("{ETCD}key_prefix = \"ftvm\"\n"),
                "witness.key_prefix",
                "start with '/'",
            ),
            (
                format!("{ETCD}key_prefix = \"/ftvm/\"\n"),
                "witness.key_prefix",
                "not end",
            ),
            (
                format!("{ETCD}address = \"127.0.0.1:7470\"\n"),
                "witness.address",
                "only for kind = \"ftvm\"",
            ),
            (
                ETCD.replace("\"etcd\"", "\"zookeeper\""),
                "witness.kind",
                "unknown variant",
            ),
            (
                format!("{ftvm}endpoints = [\"https://a:1\"]\n"),
                "witness.endpoints",
                "only for kind = \"etcd\"",
            ),
            (
                format!("{ftvm}key_prefix = \"/x\"\n"),
                "witness.key_prefix",
                "only for kind = \"etcd\"",
            ),
            (
                ftvm.replace("address = \"127.0.0.1:7470\"\n", ""),
                "witness.address",
                "required",
            ),
            (
                ftvm.replace("server_name = \"witness\"\n", ""),
                "witness.server_name",
                "required",
            ),
        ];
        for (text, key, why) in cases {
            std::fs::write(&p, &text).unwrap();
            let err = WitnessClientConfig::load(&p).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
            assert!(err.contains(why), "{key}: {err}");
            assert!(err.contains("node-a.toml"), "{err}");
        }
    }

    #[test]
    fn control_table_must_reach_an_ftvm_witness() {
        let text = format!("{GOOD}\n[control]\nkind = \"etcd\"\nendpoints = [\"https://a:2379\"]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n");
        let (_d, p) = write(&text);
        let err = WitnessConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("`control.kind`"), "{err}");
    }
}
