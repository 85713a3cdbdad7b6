//! Settings from the boot command line (`key=value` words).
//!
//! | word | default | meaning |
//! |---|---|---|
//! | `ip=A.B.C.D/N` | `10.0.2.15/24` | address and prefix length |
//! | `gw=A.B.C.D` or `gw=none` | `10.0.2.1` | default route |
//! | `port=N` | `6379` | TCP port |
//! | `maxclients=N` | `128` | listening sockets = most concurrent connections (1..=1024; lowered to what memory allows) |
//! | `maxmemory=BYTES` | `67108864` | keyspace limit (`-OOM` beyond it) |
//! | `clock_base_ms=N` | `0` | added to the platform clock for the engine's time (SET EX/PX) |
//! | `format` | off | overwrite a disk that holds no ftkv log |
//! | `gather_us=N` | `100` | under load, let the VMM gather input for up to N us per exit (0..=1000; 0: off; `src/server.rs`) |
//! | `gather_frames=N` | `0` | ... or until N frames wait (0: as many as connections are open) |

use alloc::format;
use alloc::string::String;
use core::net::Ipv4Addr;

use ftkv_core::Config;
use ftvm_guest_rt::cmdline;

pub struct Settings {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub port: u16,
    pub max_clients: usize,
    pub clock_base_ms: u64,
    pub format: bool,
    /// Interrupt moderation: see `server.rs`, step 5.
    pub gather_ns: u64,
    pub gather_frames: u64,
    pub engine: Config,
}

pub const MAX_CLIENTS_LIMIT: usize = 1024;

fn number(key: &str, default: u64, max: u64) -> Result<u64, String> {
    match cmdline::get_u64(key) {
        None => Ok(default),
        Some(Ok(n)) if n <= max => Ok(n),
        Some(Ok(n)) => Err(format!("{key}={n}: at most {max}")),
        Some(Err(v)) => Err(format!("{key}={v}: not a number")),
    }
}

impl Settings {
    pub fn from_cmdline() -> Result<Settings, String> {
        let (ip, prefix) = match cmdline::get("ip") {
            None => (Ipv4Addr::new(10, 0, 2, 15), 24),
            Some(v) => {
                let (addr, prefix) = v.split_once('/').unwrap_or((v, "24"));
                let ip: Ipv4Addr = addr
                    .parse()
                    .map_err(|_| format!("ip={v}: not an IPv4 address"))?;
                let prefix: u8 = prefix
                    .parse()
                    .ok()
                    .filter(|p| (1..=32).contains(p))
                    .ok_or_else(|| format!("ip={v}: bad prefix length"))?;
                (ip, prefix)
            }
        };
        let gateway = match cmdline::get("gw") {
            None => Some(Ipv4Addr::new(10, 0, 2, 1)),
            Some("none") | Some("") => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| format!("gw={v}: not an IPv4 address"))?,
            ),
        };
        let port = number("port", 6379, 65535)?;
        if port == 0 {
            return Err(String::from("port=0: not a port"));
        }
        let max_clients = number("maxclients", 128, MAX_CLIENTS_LIMIT as u64)?.max(1) as usize;
        let max_memory = number("maxmemory", Config::default().max_memory as u64, 1 << 40)?;
        Ok(Settings {
            ip,
            prefix,
            gateway,
            port: port as u16,
            max_clients,
            clock_base_ms: number("clock_base_ms", 0, u64::MAX / 2)?,
            format: cmdline::get("format").is_some(),
            gather_ns: number("gather_us", 100, ftvm_guest_rt::MAX_GATHER_NS / 1000)? * 1000,
            gather_frames: number("gather_frames", 0, 1 << 20)?,
            engine: Config {
                max_memory: max_memory as usize,
                hash_seed: {
                    let mut seed = [0u8; 8];
                    ftvm_guest_rt::entropy(&mut seed);
                    u64::from_le_bytes(seed)
                },
                ..Config::default()
            },
        })
    }
}
