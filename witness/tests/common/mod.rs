//! Helpers for the witness integration tests: a fresh PKI, a config file, and
//! a real `ftvm-witness` process on loopback.
#![allow(dead_code)]

use ftvm_transport::pki;
use ftvm_transport::quic::{QuicOptions, TlsFiles};
use ftvm_witness::{ClientOptions, WitnessClient};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ftvm-witness");
pub const CLUSTER: &str = "prod";

/// A temp dir with `pki/` (CA; witness, node-a, node-b, stranger, operator)
/// and `other-pki/` (another CA with its own node-a).
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pki");
        pki::init_ca(&p).unwrap();
        for n in ["witness", "node-a", "node-b", "stranger", "operator"] {
            pki::issue_node(&p, n).unwrap();
        }
        let o = dir.path().join("other-pki");
        pki::init_ca(&o).unwrap();
        pki::issue_node(&o, "node-a").unwrap();
        Lab { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn tls(&self, node: &str) -> TlsFiles {
        let p = self.path().join("pki");
        let (cert, key) = pki::node_files(&p, node);
        TlsFiles {
            ca: p.join("ca.pem"),
            cert,
            key,
        }
    }

    /// node-a's identity from the other CA, trusting our CA (so only the
    /// witness's check of the client certificate can fail).
    pub fn foreign_tls(&self) -> TlsFiles {
        let o = self.path().join("other-pki");
        let (cert, key) = pki::node_files(&o, "node-a");
        TlsFiles {
            ca: self.path().join("pki/ca.pem"),
            cert,
            key,
        }
    }

    /// Writes `witness.toml` (db `witness.db`, listening on `listen`) and returns its path.
    pub fn config(&self, listen: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"[server]
node = "witness"
listen = "{listen}"
db = "witness.db"
ca = "pki/ca.pem"
cert = "pki/witness.pem"
key = "pki/witness.key"
operators = ["operator"]
request_timeout_ms = 2000
{extra}
[[cluster]]
name = "{CLUSTER}"
members = ["node-a", "node-b"]

[[cluster]]
name = "other"
members = ["stranger"]
"#
        );
        let p = self.path().join("witness.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn client(&self, node: &str, addr: SocketAddr) -> WitnessClient {
        client_with(&self.tls(node), addr, 3)
    }
}

pub fn client_with(tls: &TlsFiles, addr: SocketAddr, attempts: u32) -> WitnessClient {
    client_timeout(tls, addr, attempts, Duration::from_secs(3))
}

pub fn client_timeout(
    tls: &TlsFiles,
    addr: SocketAddr,
    attempts: u32,
    timeout: Duration,
) -> WitnessClient {
    WitnessClient::new(
        &addr.to_string(),
        "witness",
        Some(CLUSTER.to_string()),
        tls,
        ClientOptions {
            connect_timeout: timeout,
            request_timeout: timeout,
            attempts,
            retry_backoff: Duration::from_millis(50),
            quic: QuicOptions {
                keep_alive: Duration::from_millis(500),
                idle_timeout: Duration::from_secs(5),
                max_bidi_streams: 0,
                max_uni_streams: 0,
                ..QuicOptions::default()
            },
        },
    )
    .unwrap()
}

/// A running `ftvm-witness run`; killed (SIGKILL) when dropped.
pub struct WitnessProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl WitnessProc {
    /// Starts the witness and waits for its `LISTENING` line.
    pub fn start(config: &Path) -> WitnessProc {
        let dir = config.parent().unwrap();
        let n = std::fs::read_dir(dir).unwrap().count();
        let log = dir.join(format!("witness-{n}.log"));
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "witness did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = line
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        WitnessProc { child, addr, log }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for WitnessProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `ftvm-witness` with `args` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
