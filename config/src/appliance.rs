//! The appliance (`ftvm`) configuration file.

use crate::{load_toml, resolve_path, ConfigError};
use serde::Deserialize;
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

    #[test]
    fn zero_digest_interval_is_refused() {
        let (_d, p) = write("[machine]\nimage = \"g\"\n[replay]\ndigest_interval = 0\n");
        let err = ApplianceConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("replay.digest_interval"), "{err}");
    }
}
