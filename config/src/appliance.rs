//! The appliance (`ftvm`) configuration file.

use crate::witness::{check_cluster_name, check_node_name, WitnessClientConfig};
use crate::{load_toml, resolve_path, ConfigError};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Largest guest memory the machine model supports (the identity map covers 4 GiB
/// and platform request addresses are 32-bit).
pub const MAX_MEMORY_MIB: u64 = 3072;
/// Smallest guest memory: the low 2 MiB hold VMM structures and the image starts there.
pub const MIN_MEMORY_MIB: u64 = 8;
/// Largest boot command line, in bytes (it shares the platform page).
pub const MAX_CMDLINE: usize = 2048;

/// The whole `ftvm` config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    pub machine: MachineConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub replay: ReplayConfig,
    /// The guest's network card (virtio-net on a TAP device).
    pub net: Option<NetConfig>,
    /// The guest's disk (virtio-blk on a raw image).
    pub disk: Option<DiskConfig>,
    /// Fault tolerance: this node's half of a pair (DESIGN.md 5-6). Without
    /// it, `ftvm run` runs one unreplicated machine.
    pub ft: Option<FtConfig>,
    /// How this node reaches the witness (required with `[ft]`).
    pub witness: Option<WitnessClientConfig>,
    /// Where the file was loaded from; relative paths were resolved against it.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// The guest ELF image (relative to the config file).
    pub image: PathBuf,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// The boot command line handed to the guest through the platform page.
    #[serde(default)]
    pub cmdline: String,
}

fn default_memory_mib() -> u64 {
    64
}

/// Where the guest console (COM1 and the platform console) goes.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `stdout`, `log` (through tracing), `none`, or a file path.
    #[serde(default)]
    pub output: ConsoleOutput,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleOutput {
    #[default]
    Stdout,
    Log,
    None,
    File(PathBuf),
}

impl<'de> Deserialize<'de> for ConsoleOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "stdout" => ConsoleOutput::Stdout,
            "log" => ConsoleOutput::Log,
            "none" => ConsoleOutput::None,
            "" => return Err(serde::de::Error::custom("empty console output")),
            path => ConsoleOutput::File(PathBuf::from(path)),
        })
    }
}

/// virtio-net backed by a TAP device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP device name (created if missing; at most 15 bytes).
    pub tap: String,
    /// The guest's MAC address, `52:54:00:12:34:56` style.
    pub mac: String,
}

impl NetConfig {
    /// The MAC as bytes (validated by [`ApplianceConfig::load`]).
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// virtio-blk backed by a raw image file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image (relative to the config file). Create one with `ftvm disk create`.
    pub path: PathBuf,
    /// Chunk size for the disk's Merkle tree, in bytes.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
}

fn default_chunk_size() -> u64 {
    64 * 1024
}

/// Record/replay checking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// Guest exits between two state digests (registers and dirtied pages).
    #[serde(default = "default_digest_interval")]
    pub digest_interval: u64,
    /// Every this many digests, hash all of guest memory instead of the dirtied pages.
    #[serde(default = "default_full_digest_every")]
    pub full_digest_every: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            digest_interval: default_digest_interval(),
            full_digest_every: default_full_digest_every(),
        }
    }
}

/// Every 4096 exits: each digest re-arms KVM's dirty logging, whose write
/// faults are what a digest costs on this host (docs/BENCHMARKS.md).
fn default_digest_interval() -> u64 {
    4096
}
fn default_full_digest_every() -> u64 {
    16
}

/// How the backup gets the guest's disk-read data (DESIGN.md 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DiskReadsMode {
    /// The primary's read data travel in the log.
    #[default]
    Ship,
    /// The log carries a hash; the backup reads its own disk and checks it.
    BackupReads,
}

/// QUIC congestion controller of the log channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// quinn's default.
    #[default]
    Cubic,
    /// BBR (marked experimental in quinn): keeps a long fat pipe full
    /// despite random loss.
    Bbr,
    NewReno,
}

/// The WAN between the two sites: sizes the QUIC windows of the log channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanConfig {
    /// Round-trip time between the sites, milliseconds.
    #[serde(default = "default_wan_rtt_ms")]
    pub rtt_ms: u64,
    /// Bandwidth between the sites, megabits per second.
    #[serde(default = "default_wan_bandwidth_mbit")]
    pub bandwidth_mbit: u64,
    #[serde(default)]
    pub congestion: Congestion,
}

impl Default for WanConfig {
    fn default() -> Self {
        WanConfig {
            rtt_ms: default_wan_rtt_ms(),
            bandwidth_mbit: default_wan_bandwidth_mbit(),
            congestion: Congestion::default(),
        }
    }
}

fn default_wan_rtt_ms() -> u64 {
    50
}
fn default_wan_bandwidth_mbit() -> u64 {
    1000
}

impl WanConfig {
    /// Bytes a stream or connection may have in flight: twice the
    /// bandwidth-delay product, at least 4 MiB.
    pub fn window_bytes(&self) -> u64 {
        let bdp = self
            .bandwidth_mbit
            .saturating_mul(125_000)
            .saturating_mul(self.rtt_ms)
            / 1000;
        bdp.saturating_mul(2).max(4 << 20)
    }
}

/// The other node of the pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node name, checked against its certificate.
    pub name: String,
    /// Where its log channel listens, `host:port`.
    pub address: String,
}

/// Whether a survivor accepts a returning peer as its new backup by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Reprotect {
    /// Only when an operator starts the peer with `--join`.
    #[default]
    Manual,
    /// As soon as the configured peer comes back.
    Auto,
}

/// This node's half of a fault-tolerant pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtConfig {
    /// This node's name (its certificate's).
    pub node: String,
    /// The pair's cluster id (as the witness knows it).
    pub cluster: String,
    /// UDP address of this node's log channel endpoint.
    pub listen: SocketAddr,
    /// Directory of this node's durable state (epoch, role, fence): sled.
    pub state_dir: PathBuf,
    /// Cluster CA certificate (PEM); the peer must present one it signed.
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    pub peer: PeerConfig,
    #[serde(default)]
    pub disk_reads: DiskReadsMode,
    /// The backup may lag this much guest time behind before the primary
    /// slows its vCPU, milliseconds.
    #[serde(default = "default_max_lag_ms")]
    pub max_lag_ms: u64,
    /// A peer silent this long is declared failed, milliseconds.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// Heartbeat interval on the control stream, milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Log bytes the primary keeps until the backup acks them; when full
    /// the vCPU waits. MiB.
    #[serde(default = "default_log_buffer_mib")]
    pub log_buffer_mib: u64,
    /// The admin HTTP endpoint (`/status`, `/metrics`).
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Program run when this node goes live (DNS, BGP or VIP moves).
    #[serde(default)]
    pub go_live_hook: Option<PathBuf>,
    #[serde(default)]
    pub reprotect: Reprotect,
    #[serde(default)]
    pub wan: WanConfig,
}

fn default_max_lag_ms() -> u64 {
    1000
}
fn default_failure_timeout_ms() -> u64 {
    2000
}
fn default_heartbeat_ms() -> u64 {
    200
}
fn default_log_buffer_mib() -> u64 {
    64
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7480))
}

impl FtConfig {
    fn validate(&self, f: &Path) -> Result<(), ConfigError> {
        check_node_name(&self.node).map_err(|m| ConfigError::invalid(f, "ft.node", m))?;
        check_node_name(&self.peer.name).map_err(|m| ConfigError::invalid(f, "ft.peer.name", m))?;
        if self.peer.name == self.node {
            return Err(ConfigError::invalid(
                f,
                "ft.peer.name",
                format!("{:?} is this node's own name", self.peer.name),
            ));
        }
        check_cluster_name(&self.cluster).map_err(|m| ConfigError::invalid(f, "ft.cluster", m))?;
        match self.peer.address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(ConfigError::invalid(
                    f,
                    "ft.peer.address",
                    format!("{:?} is not host:port", self.peer.address),
                ))
            }
        }
        let positive = [
            ("ft.max_lag_ms", self.max_lag_ms),
            ("ft.heartbeat_ms", self.heartbeat_ms),
            ("ft.log_buffer_mib", self.log_buffer_mib),
            ("ft.wan.rtt_ms", self.wan.rtt_ms),
            ("ft.wan.bandwidth_mbit", self.wan.bandwidth_mbit),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::invalid(f, key, "must be at least 1"));
            }
        }
        if self.failure_timeout_ms < 2 * self.heartbeat_ms {
            return Err(ConfigError::invalid(
                f,
                "ft.failure_timeout_ms",
                format!(
                    "{} must be at least twice ft.heartbeat_ms ({}), or one late heartbeat is a failover",
                    self.failure_timeout_ms, self.heartbeat_ms
                ),
            ));
        }
        if self.log_buffer_mib > 16 * 1024 {
            return Err(ConfigError::invalid(
                f,
                "ft.log_buffer_mib",
                format!("{} is more than 16384", self.log_buffer_mib),
            ));
        }
        Ok(())
    }
}

impl ApplianceConfig {
    /// Loads, resolves relative paths and validates a config file.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let mut cfg: ApplianceConfig = load_toml(file)?;
        cfg.source = file.to_path_buf();
        cfg.machine.image = resolve_path(file, &cfg.machine.image);
        if let Some(d) = &mut cfg.disk {
            d.path = resolve_path(file, &d.path);
        }
        if let ConsoleOutput::File(p) = &cfg.console.output {
            cfg.console.output = ConsoleOutput::File(resolve_path(file, p));
        }
        if let Some(ft) = &mut cfg.ft {
            ft.state_dir = resolve_path(file, &ft.state_dir);
            ft.ca = resolve_path(file, &ft.ca);
            ft.cert = resolve_path(file, &ft.cert);
            ft.key = resolve_path(file, &ft.key);
            if let Some(h) = &ft.go_live_hook {
                ft.go_live_hook = Some(resolve_path(file, h));
            }
        }
        if let Some(w) = &mut cfg.witness {
            w.resolve(file);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let f = &self.source;
        let m = &self.machine;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m.memory_mib) {
            return Err(ConfigError::invalid(
                f,
                "machine.memory_mib",
                format!(
                    "{} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    m.memory_mib
                ),
            ));
        }
        if m.cmdline.len() > MAX_CMDLINE {
            return Err(ConfigError::invalid(
                f,
                "machine.cmdline",
                format!("{} bytes is longer than {MAX_CMDLINE}", m.cmdline.len()),
            ));
        }
        if let Some(n) = &self.net {
            if n.tap.is_empty() || n.tap.len() > 15 {
                return Err(ConfigError::invalid(
                    f,
                    "net.tap",
                    format!("{:?} must be 1 to 15 bytes", n.tap),
                ));
            }
            match n.mac_bytes() {
                None => {
                    return Err(ConfigError::invalid(
                        f,
                        "net.mac",
                        format!("{:?} is not a MAC address like 52:54:00:12:34:56", n.mac),
                    ))
                }
                Some(m) if m[0] & 1 == 1 => {
                    return Err(ConfigError::invalid(
                        f,
                        "net.mac",
                        format!("{} is a multicast address", n.mac),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(d) = &self.disk {
            if !d.chunk_size.is_power_of_two() || d.chunk_size < 4096 {
                return Err(ConfigError::invalid(
                    f,
                    "disk.chunk_size",
                    format!("{} must be a power of two of at least 4096", d.chunk_size),
                ));
            }
        }
        if self.replay.digest_interval == 0 {
            return Err(ConfigError::invalid(
                f,
                "replay.digest_interval",
                "must be at least 1",
            ));
        }
        if self.replay.full_digest_every == 0 {
            return Err(ConfigError::invalid(
                f,
                "replay.full_digest_every",
                "must be at least 1",
            ));
        }
        if let Some(w) = &self.witness {
            w.validate(f, "witness", false)?;
        }
        if let Some(ft) = &self.ft {
            ft.validate(f)?;
            let Some(w) = &self.witness else {
                return Err(ConfigError::invalid(
                    f,
                    "witness",
                    "a [witness] table is required with [ft]: only the witness decides which node is live",
                ));
            };
            if let Some(c) = w.cluster.as_ref().filter(|c| **c != ft.cluster) {
                return Err(ConfigError::invalid(
                    f,
                    "witness.cluster",
                    format!("{c:?} differs from ft.cluster {:?}", ft.cluster),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn relative_image_resolves_against_config_dir() {
        let (dir, p) = write("[machine]\nimage = \"g.elf\"\n");
        let cfg = ApplianceConfig::load(&p).unwrap();
        assert_eq!(cfg.machine.image, dir.path().join("g.elf"));
        assert_eq!(cfg.machine.memory_mib, 64);
    }

    #[test]
    fn memory_out_of_range_names_key() {
        let (_d, p) = write("[machine]\nimage = \"g\"\nmemory_mib = 1\n");
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("machine.memory_mib"), "{err}");
        assert!(err.contains("vm.toml"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let (_d, p) = write("[machine]\nimage = \"g\"\nmemory = 64\n");
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("machine.memory"), "{err}");
    }

    #[test]
    fn bad_mac_names_key() {
        let (_d, p) =
            write("[machine]\nimage = \"g\"\n[net]\ntap = \"t0\"\nmac = \"52:54:00:12:34\"\n");
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("net.mac"), "{err}");
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
    }

    #[test]
    fn disk_path_resolves_against_config_dir() {
        let (dir, p) = write("[machine]\nimage = \"g\"\n[disk]\npath = \"d.img\"\n");
        let cfg = ApplianceConfig::load(&p).unwrap();
        assert_eq!(cfg.disk.unwrap().path, dir.path().join("d.img"));
    }

    const FT: &str = "[machine]\nimage = \"g\"\n\
        [ft]\nnode = \"node-a\"\ncluster = \"lab\"\nlisten = \"0.0.0.0:7400\"\nstate_dir = \"state\"\n\
        ca = \"pki/ca.pem\"\ncert = \"pki/node-a.pem\"\nkey = \"pki/node-a.key\"\n\
        peer = { name = \"node-b\", address = \"10.0.0.2:7400\" }\n";
    const WITNESS: &str = "[witness]\naddress = \"w:7470\"\nserver_name = \"witness\"\n\
        ca = \"pki/ca.pem\"\ncert = \"pki/node-a.pem\"\nkey = \"pki/node-a.key\"\n";

    #[test]
    fn ft_section_with_defaults() {
        let (dir, p) = write(&format!("{FT}{WITNESS}"));
        let cfg = ApplianceConfig::load(&p).unwrap();
        let ft = cfg.ft.unwrap();
        assert_eq!(ft.state_dir, dir.path().join("state"));
        assert_eq!(ft.disk_reads, DiskReadsMode::Ship);
        assert_eq!(ft.max_lag_ms, 1000);
        assert_eq!(ft.failure_timeout_ms, 2000);
        assert_eq!(cfg.witness.unwrap().ca, dir.path().join("pki/ca.pem"));
    }

    #[test]
    fn ft_errors_name_the_key() {
        let (_d, p) = write(FT);
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("key `witness`"), "{err}");
        let (_d, p) = write(&format!("{FT}disk_reads = \"sometimes\"\n{WITNESS}"));
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("ft.disk_reads"), "{err}");
        let (_d, p) = write(&format!("{FT}failure_timeout_ms = 100\n{WITNESS}"));
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("ft.failure_timeout_ms"), "{err}");
        let (_d, p) = write(&format!("{FT}{WITNESS}cluster = \"other\"\n"));
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("witness.cluster"), "{err}");
    }

    #[test]
    fn zero_digest_interval_is_refused() {
        let (_d, p) = write("[machine]\nimage = \"g\"\n[replay]\ndigest_interval = 0\n");
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("replay.digest_interval"), "{err}");
    }
}
