//! Witness benchmark: claim latency and throughput against a real
//! `ftvm-witness` process on loopback (QUIC with mutual TLS), with every
//! grant flushed to its sled database before it is answered.

use crate::report::Table;
use anyhow::{anyhow, bail, Context};
use ftvm_transport::pki;
use ftvm_transport::quic::{QuicOptions, TlsFiles};
use ftvm_witness::{ClaimOutcome, ClientOptions, WitnessClient};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sequential grants measured (after the warm-up).
const GRANTS: u64 = 2000;
/// Racing rounds (two members claim the same epoch at once).
const RACE_ROUNDS: u64 = 1000;
/// Denied claims measured (no write).
const DENIALS: u64 = 2000;
const WARMUP: u64 = 50;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls(dir: &Path, node: &str) -> TlsFiles {
    let (cert, key) = pki::node_files(dir, node);
    TlsFiles {
        ca: dir.join(pki::CA_CERT_FILE),
        cert,
        key,
    }
}

fn client(pki_dir: &Path, node: &str, addr: SocketAddr) -> anyhow::Result<WitnessClient> {
    Ok(WitnessClient::new(
        &addr.to_string(),
        "witness",
        Some("bench".to_string()),
        &tls(pki_dir, node),
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            attempts: 1,
            retry_backoff: Duration::from_millis(100),
            quic: QuicOptions::default(),
        },
    )?)
}

fn start(bin_dir: &Path, dir: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let cfg = dir.join("witness.toml");
    std::fs::write(
        &cfg,
        r#"[server]
node = "witness"
listen = "127.0.0.1:0"
db = "witness.db"
ca = "pki/ca.pem"
cert = "pki/witness.pem"
key = "pki/witness.key"

[[cluster]]
name = "bench"
members = ["node-a", "node-b"]
"#,
    )?;
    let bin = bin_dir.join("ftvm-witness");
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("witness.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        anyhow!(
            "ftvm-witness did not start; see {}",
            dir.join("witness.log").display()
        )
    })?;
    let addr = line
        .strip_prefix("LISTENING ")
        .ok_or_else(|| anyhow!("unexpected first line {line:?}"))?
        .parse()?;
    Ok((proc, addr))
}

struct Stats {
    n: usize,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn stats(mut lat: Vec<Duration>, claims: u64, wall: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| {
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat.get(i).copied().unwrap_or_default()
    };
    Stats {
        n: claims as usize,
        p50: pick(0.50),
        p99: pick(0.99),
        per_sec: claims as f64 / wall.as_secs_f64(),
    }
}

async fn measure(pki_dir: &Path, addr: SocketAddr) -> anyhow::Result<Vec<(&'static str, Stats)>> {
    let a = client(pki_dir, "node-a", addr)?;
    let b = client(pki_dir, "node-b", addr)?;
    let mut epoch = 0u64;
    for _ in 0..WARMUP {
        match a.claim(epoch).await? {
            ClaimOutcome::Granted { .. } => epoch += 1,
            d => bail!("warm-up claim denied: {d:?}"),
        }
    }

    // 1. One member, every claim a new grant (write + flush).
    let mut lat = Vec::with_capacity(GRANTS as usize);
    let t0 = Instant::now();
    for _ in 0..GRANTS {
        let t = Instant::now();
        match a.claim(epoch).await? {
            ClaimOutcome::Granted { .. } => epoch += 1,
            d => bail!("sequential claim denied: {d:?}"),
        }
        lat.push(t.elapsed());
    }
    let grants = stats(lat, GRANTS, t0.elapsed());

    // 2. Two members racing for each epoch: one grant (flush) and one denial.
    let mut lat = Vec::with_capacity(2 * RACE_ROUNDS as usize);
    let t0 = Instant::now();
    for _ in 0..RACE_ROUNDS {
        let ta = async {
            let t = Instant::now();
            a.claim(epoch).await.map(|r| (r, t.elapsed()))
        };
        let tb = async {
            let t = Instant::now();
            b.claim(epoch).await.map(|r| (r, t.elapsed()))
        };
        let (ra, rb) = tokio::join!(ta, tb);
        let (ra, la) = ra?;
        let (rb, lb) = rb?;
        let granted = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, ClaimOutcome::Granted { .. }))
            .count();
        if granted != 1 {
            bail!("epoch {epoch}: {granted} grants ({ra:?}, {rb:?})");
        }
        lat.extend([la, lb]);
        epoch += 1;
    }
    let race = stats(lat, 2 * RACE_ROUNDS, t0.elapsed());

    // 3. A stale claim: denied, nothing written.
    let mut lat = Vec::with_capacity(DENIALS as usize);
    let t0 = Instant::now();
    for _ in 0..DENIALS {
        let t = Instant::now();
        match b.claim(0).await? {
            ClaimOutcome::Denied { .. } => {}
            g => bail!("stale claim granted: {g:?}"),
        }
        lat.push(t.elapsed());
    }
    let denied = stats(lat, DENIALS, t0.elapsed());
    a.close().await;
    b.close().await;
    Ok(vec![
        ("grant, one member (write + flush each)", grants),
        ("race, two members per epoch (1 grant + 1 denial)", race),
        ("stale claim, denied (no write)", denied),
    ])
}

/// Runs the witness benchmark with the `ftvm-witness` binary in `bin_dir`
/// and returns its Markdown section.
pub fn run(bin_dir: &Path) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let p = dir.join("pki");
    pki::init_ca(&p)?;
    for n in ["witness", "node-a", "node-b"] {
        pki::issue_node(&p, n)?;
    }
    let (_proc, addr) = start(bin_dir, dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rows = rt.block_on(measure(&p, addr))?;

    let mut t = Table::new(&["workload", "claims", "p50 (µs)", "p99 (µs)", "claims/s"]);
    for (name, s) in &rows {
        t.row(vec![
            name.to_string(),
            s.n.to_string(),
            s.p50.as_micros().to_string(),
            s.p99.as_micros().to_string(),
            format!("{:.0}", s.per_sec),
        ]);
    }
    let fs_note = std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| fs_of(&m, dir))
        .unwrap_or_else(|| "unknown".into());
    Ok(format!(
        "## Witness claims\n\n\
         One `ftvm-witness` process on 127.0.0.1, clients over QUIC with mutual TLS \
         (one connection per member, one stream per request), the client's time from \
         sending a claim to reading the answer. Every grant is written to sled and \
         flushed to disk before it is answered (database on {fs_note}); denials write \
         nothing. Decisions are logged at `info`. {} cores.\n\n{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        t.to_markdown()
    ))
}

/// The filesystem type of the longest mount point holding `dir`.
fn fs_of(mounts: &str, dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mnt).then(|| (mnt.len(), ty.to_string()))
        })
        .max()
        .map(|(_, ty)| ty)
}

#[cfg(test)]
mod tests {
    /// Runs the whole benchmark (build `ftvm-witness` in the same profile first).
    #[test]
    #[ignore = "benchmark; run with --ignored after building ftvm-witness"]
    fn witness_bench_runs() {
        let bin = crate::bin("ftvm-witness");
        let section = super::run(bin.parent().unwrap()).unwrap();
        println!("{section}");
        assert!(section.contains("claims/s"));
    }
}
