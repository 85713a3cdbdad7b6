//! Witness benchmark: claim latency and throughput of both backends in one
//! run, through the same client interface ([`WitnessBackend`]): a real
//! `ftvm-witness` process (QUIC with mutual TLS, every grant flushed to its
//! sled database before it is answered) and a real three-member etcd
//! cluster (gRPC over TLS with client certificates, every grant a raft
//! commit fsynced on a majority). Both run in the network namespaces of an
//! [`EtcdLab`] (the witness in the first member's), and the clients in the
//! lab's client namespace, so both pay the same veth and bridge hops. When
//! the lab cannot run here (no root, etcd or nft), only `ftvm-witness` is
//! measured, on loopback, and the section says why.

use crate::etcd_lab::{self, EtcdLab};
use crate::report::Table;
use anyhow::{anyhow, bail, Context};
use ftvm_transport::pki;
use ftvm_transport::quic::{QuicOptions, TlsFiles};
use ftvm_witness::{ClaimOutcome, ClientOptions, WitnessBackend, WitnessClient};
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
        Some(etcd_lab::CLUSTER.to_string()),
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

/// Starts `ftvm-witness` listening on `listen`, through `launch` (the
/// binary itself, or `ip netns exec NS` in front of it).
fn start(
    bin_dir: &Path,
    dir: &Path,
    listen: &str,
    launch: impl FnOnce(&Path) -> Command,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let cfg = dir.join("witness.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[server]
node = "witness"
listen = "{listen}"
db = "witness.db"
ca = "pki/ca.pem"
cert = "pki/witness.pem"
key = "pki/witness.key"

[[cluster]]
name = "{}"
members = ["node-a", "node-b"]
"#,
            etcd_lab::CLUSTER
        ),
    )?;
    let bin = bin_dir.join("ftvm-witness");
    let mut child = launch(&bin)
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

/// The three workloads with two members' clients of one backend.
async fn measure(
    a: &dyn WitnessBackend,
    b: &dyn WitnessBackend,
) -> anyhow::Result<Vec<(&'static str, Stats)>> {
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
    Ok(vec![
        ("grant, one node (a durable write each)", grants),
        ("race, two nodes per epoch (1 grant + 1 denial)", race),
        ("stale claim, denied (no write)", denied),
    ])
}

/// Measures `ftvm-witness` at `addr` (clients made where this runs).
async fn measure_ftvm(
    pki_dir: &Path,
    addr: SocketAddr,
) -> anyhow::Result<Vec<(&'static str, Stats)>> {
    let a = client(pki_dir, "node-a", addr)?;
    let b = client(pki_dir, "node-b", addr)?;
    let rows = measure(&a, &b).await;
    a.close().await;
    b.close().await;
    rows
}

/// Measures the lab's etcd cluster (clients reach every member).
async fn measure_etcd(lab: &EtcdLab) -> anyhow::Result<Vec<(&'static str, Stats)>> {
    let all: Vec<usize> = (0..etcd_lab::MEMBERS).collect();
    let a = ftvm_witness::from_config(&lab.node_config("node-a", &all, 1, 5000)?)?;
    let b = ftvm_witness::from_config(&lab.node_config("node-b", &all, 1, 5000)?)?;
    let rows = measure(&*a, &*b).await;
    a.close().await;
    b.close().await;
    rows
}

/// Runs the witness benchmark with the `ftvm-witness` binary in `bin_dir`
/// and returns its Markdown section.
pub fn run(bin_dir: &Path) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let p = dir.join("pki");
    let mut rows = Vec::new();
    let setting = match etcd_lab::missing() {
        None => {
            // The lab makes the PKI (nodes, operator, members); add the witness.
            let lab = EtcdLab::start(dir)?;
            pki::issue_node(&p, "witness")?;
            let ns = lab.members[0].ns.name.clone();
            let listen = format!("{}:7470", lab.members[0].ip);
            let (_proc, addr) = start(bin_dir, dir, &listen, |bin| {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns]).arg(bin);
                c
            })?;
            let (ftvm, etcd) = lab.clients.block_on(|| async {
                let ftvm = measure_ftvm(&p, addr).await?;
                let etcd = measure_etcd(&lab).await?;
                Ok::<_, anyhow::Error>((ftvm, etcd))
            })??;
            rows.extend(ftvm.into_iter().map(|(w, s)| ("ftvm-witness", w, s)));
            rows.extend(etcd.into_iter().map(|(w, s)| ("etcd, 3 members", w, s)));
            format!(
                "Both backends in one run, through the same client interface. `ftvm-witness`: \
                 one process, QUIC with mutual TLS (one connection per node, one stream per \
                 request); every grant written to sled and flushed to disk before it is \
                 answered; denials write nothing. etcd {}: three members (Debian's \
                 etcd-server), gRPC over TLS with client certificates, default heartbeat and \
                 election settings; a claim is a linearizable GET then, for a grant, one \
                 compare-and-put transaction, answered once raft committed it (WAL fsynced on \
                 a majority); a denial is the GET alone, and a lost race a failed \
                 transaction and a second GET. Each backend and each etcd member runs in its \
                 own network namespace (the witness in the first member's), the clients in \
                 another, all joined by veth pairs to one bridge.",
                etcd_version()
            )
        }
        Some(why) => {
            pki::init_ca(&p)?;
            for n in ["witness", "node-a", "node-b"] {
                pki::issue_node(&p, n)?;
            }
            let (_proc, addr) = start(bin_dir, dir, "127.0.0.1:0", |bin| Command::new(bin))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let ftvm = rt.block_on(measure_ftvm(&p, addr))?;
            rows.extend(ftvm.into_iter().map(|(w, s)| ("ftvm-witness", w, s)));
            format!(
                "`ftvm-witness` only, on 127.0.0.1 (etcd not measured: {why}). One process, QUIC \
                 with mutual TLS (one connection per node, one stream per request); every \
                 grant written to sled and flushed to disk before it is answered; denials \
                 write nothing."
            )
        }
    };

    let mut t = Table::new(&[
        "backend",
        "workload",
        "claims",
        "p50 (µs)",
        "p99 (µs)",
        "claims/s",
    ]);
    for (backend, name, s) in &rows {
        t.row(vec![
            backend.to_string(),
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
         {setting} Latency is the client's time from sending a claim to reading the \
         answer. Databases and etcd data directories on {fs_note}. Decisions are logged at \
         `info`. {} cores.\n\n{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        t.to_markdown()
    ))
}

/// `etcd --version`'s first line's version, for the report.
fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("etcd Version: "))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(version unknown)".into())
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
