//! A real three-member etcd cluster (Debian's `etcd-server`, etcd 3.4) for
//! the etcd witness backend's tests and benchmark: each member in its own
//! network namespace, joined to a bridge (in a namespace of its own) by a
//! veth pair, with a fourth namespace for the clients; TLS with client
//! certificates between clients and members and between members, from the
//! development PKI. Partitions are nftables rules in the members'
//! namespaces; member processes are started and killed by PID.

use crate::site::{Guard, NetNs};
use anyhow::{bail, Context, Result};
use ftvm_config::witness::WitnessClientConfig;
use ftvm_transport::pki;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Members of every lab cluster.
pub const MEMBERS: usize = 3;
/// The cluster (pair) name the tests claim in.
pub const CLUSTER: &str = "prod";
/// The nodes (certificates) that claim.
pub const NODES: [&str; 2] = ["node-a", "node-b"];
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
/// nftables table a partition adds in a member's namespace.
const PARTITION_TABLE: &str = "ftvm_partition";

/// Why a lab cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    crate::site::root_missing()
        .or_else(|| crate::site::tool_missing("etcd", "etcd-server"))
        .or_else(|| crate::site::tool_missing("nft", "nftables"))
}

/// True when etcd tests can run here; otherwise prints a SKIPPED line.
pub fn available(test: &str) -> bool {
    match missing() {
        Some(why) => crate::skip(test, &why),
        None => true,
    }
}

fn member_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + i as u8)
}

const CLIENTS_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);

/// One etcd member: its namespace, data directory and process.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: NetNs,
    pub data: PathBuf,
    pub log: PathBuf,
    pub proc: Option<Guard>,
}

impl Member {
    /// The member's client URL.
    pub fn endpoint(&self) -> String {
        format!("https://{}:{CLIENT_PORT}", self.ip)
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The lab: PKI, namespaces and members. Dropping it kills the members and
/// deletes the namespaces.
#[derive(Debug)]
pub struct EtcdLab {
    pub dir: PathBuf,
    pub members: Vec<Member>,
    /// Where clients run (see [`NetNs::block_on`]).
    pub clients: NetNs,
    /// Holds the bridge.
    pub hub: NetNs,
}

impl EtcdLab {
    /// Builds the PKI and the network in `dir` and starts every member.
    /// Returns once the cluster answers a linearizable read.
    pub fn start(dir: &Path) -> Result<EtcdLab> {
        let p = dir.join("pki");
        pki::init_ca(&p)?;
        for n in NODES.iter().chain(&["operator"]) {
            pki::issue_node(&p, n)?;
        }
        // Another CA with its own node-a: a certificate etcd must refuse.
        let o = dir.join("other-pki");
        pki::init_ca(&o)?;
        pki::issue_node(&o, "node-a")?;

        let hub = NetNs::new("etcd-hub")?;
        run(Command::new("ip").args(["-n", &hub.name, "link", "add", "br0", "type", "bridge"]))?;
        run(Command::new("ip").args(["-n", &hub.name, "link", "set", "br0", "up"]))?;
        let attach = |ns: &NetNs, port: &str, ip: Ipv4Addr| -> Result<()> {
            run(Command::new("ip").args([
                "-n", &hub.name, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns.name,
            ]))?;
            run(Command::new("ip")
                .args(["-n", &hub.name, "link", "set", port, "master", "br0", "up"]))?;
            run(Command::new("ip").args([
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]))?;
            run(Command::new("ip").args(["-n", &ns.name, "link", "set", "eth0", "up"]))?;
            Ok(())
        };
        let clients = NetNs::new("etcd-clients")?;
        attach(&clients, "clients", CLIENTS_IP)?;
        let mut members = Vec::new();
        for i in 0..MEMBERS {
            let name = format!("etcd-{}", i + 1);
            let ip = member_ip(i);
            pki::issue_node_with_ips(&p, &name, &[IpAddr::V4(ip)])?;
            let ns = NetNs::new(&name)?;
            attach(&ns, &format!("m{}", i + 1), ip)?;
            members.push(Member {
                log: dir.join(format!("{name}.log")),
                data: dir.join(format!("{name}.data")),
                name,
                ip,
                ns,
                proc: None,
            });
        }
        let mut lab = EtcdLab {
            dir: dir.to_path_buf(),
            members,
            clients,
            hub,
        };
        for i in 0..MEMBERS {
            lab.start_member(i)?;
        }
        lab.wait_ready(&[0, 1, 2], Duration::from_secs(120))?;
        Ok(lab)
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// Starts member `i` (again), on its data directory.
    pub fn start_member(&mut self, i: usize) -> Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=https://{}:{PEER_PORT}", m.name, m.ip))
            .collect();
        let p = self.pki();
        let m = &mut self.members[i];
        let (cert, key) = pki::node_files(&p, &m.name);
        let ca = p.join(pki::CA_CERT_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let mut cmd = m.ns.command("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .arg("--listen-client-urls")
            .arg(m.endpoint())
            .arg("--advertise-client-urls")
            .arg(m.endpoint())
            .arg("--listen-peer-urls")
            .arg(format!("https://{}:{PEER_PORT}", m.ip))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("https://{}:{PEER_PORT}", m.ip))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .args(["--initial-cluster-token", "ftvm-lab"])
            .args(["--initial-cluster-state", "new"])
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--peer-client-cert-auth")
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .arg("--peer-cert-file")
            .arg(&cert)
            .arg("--peer-key-file")
            .arg(&key)
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        m.proc = Some(Guard::spawn(&mut cmd)?);
        Ok(())
    }

    /// SIGKILLs member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut g) = self.members[i].proc.take() {
            g.signal(libc::SIGKILL);
            if let Some(c) = g.child.as_mut() {
                let _ = c.wait();
            }
        }
    }

    /// Whether member `i`'s process is running.
    pub fn member_running(&mut self, i: usize) -> bool {
        self.members[i]
            .proc
            .as_mut()
            .is_some_and(|g| g.is_running())
    }

    /// Cuts member `i` off from the other members (both directions, dropped
    /// on input as a WAN cut would), leaving the clients' paths alone.
    pub fn partition(&self, i: usize) -> Result<()> {
        let others: Vec<String> = (0..MEMBERS)
            .filter(|&j| j != i)
            .map(|j| member_ip(j).to_string())
            .collect();
        self.drop_from(i, &others)?;
        for j in (0..MEMBERS).filter(|&j| j != i) {
            self.drop_from(j, &[member_ip(i).to_string()])?;
        }
        Ok(())
    }

    fn drop_from(&self, i: usize, sources: &[String]) -> Result<()> {
        let rules = format!(
            "table inet {PARTITION_TABLE} {{\n  chain input {{\n    type filter hook input priority 0;\n    ip saddr {{ {} }} drop\n  }}\n}}\n",
            sources.join(", ")
        );
        let mut child = self.members[i]
            .ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Removes every partition.
    pub fn heal(&self) -> Result<()> {
        for m in &self.members {
            // Absent tables are fine: only partitioned members have one.
            let _ =
                m.ns.command("nft")
                    .args(["delete", "table", "inet", PARTITION_TABLE])
                    .output();
        }
        Ok(())
    }

    /// Writes a node file (`[witness]`, kind "etcd") for `node`, reaching the
    /// members `reach`, and returns its path. `cert_dir` names whose PKI
    /// holds the node's certificate (`pki`, or `other-pki` for a stranger).
    pub fn node_file(
        &self,
        node: &str,
        cert_dir: &str,
        reach: &[usize],
        attempts: u32,
        request_timeout_ms: u64,
    ) -> Result<PathBuf> {
        let endpoints: Vec<String> = reach
            .iter()
            .map(|&i| format!("{:?}", self.members[i].endpoint()))
            .collect();
        let name: String = reach.iter().map(|i| (i + 1).to_string()).collect();
        let path = self
            .dir
            .join(format!("{node}-{cert_dir}-etcd-{name}-{attempts}.toml"));
        std::fs::write(
            &path,
            format!(
                "[witness]\nkind = \"etcd\"\nendpoints = [{}]\ncluster = \"{CLUSTER}\"\n\
                 ca = \"pki/ca.pem\"\ncert = \"{cert_dir}/{node}.pem\"\nkey = \"{cert_dir}/{node}.key\"\n\
                 connect_timeout_ms = 3000\nrequest_timeout_ms = {request_timeout_ms}\n\
                 attempts = {attempts}\nretry_backoff_ms = 100\n",
                endpoints.join(", ")
            ),
        )?;
        Ok(path)
    }

    /// The `[witness]` settings of [`Self::node_file`].
    pub fn node_config(
        &self,
        node: &str,
        reach: &[usize],
        attempts: u32,
        request_timeout_ms: u64,
    ) -> Result<WitnessClientConfig> {
        let f = self.node_file(node, "pki", reach, attempts, request_timeout_ms)?;
        Ok(WitnessClientConfig::load(&f)?)
    }

    /// A raw etcd client (for checks the witness API does not offer: the
    /// key's history, each member's view of the leader), made inside the
    /// clients' namespace, so call it from [`NetNs::block_on`] there.
    pub async fn raw_client(&self, reach: &[usize]) -> Result<etcd_client::Client> {
        let p = self.pki();
        let (cert, key) = pki::node_files(&p, "operator");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(
                p.join(pki::CA_CERT_FILE),
            )?))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ));
        let endpoints: Vec<String> = reach.iter().map(|&i| self.members[i].endpoint()).collect();
        let opts = etcd_client::ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        Ok(etcd_client::Client::connect(endpoints, Some(opts)).await?)
    }

    /// Waits until every running member agrees on one leader, and returns
    /// its index.
    pub async fn leader(&self, within: Duration) -> Result<usize> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < within {
            match self.leader_once().await {
                Ok(Some(i)) => return Ok(i),
                Ok(None) => last = "no agreed leader".into(),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("no leader within {within:?}: {last}")
    }

    async fn leader_once(&self) -> Result<Option<usize>> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for i in 0..MEMBERS {
            if self.members[i].proc.is_none() {
                continue;
            }
            let mut c = self.raw_client(&[i]).await?;
            let st = tokio::time::timeout(Duration::from_secs(5), c.status())
                .await
                .context("status timed out")??;
            let id = st.header().map(|h| h.member_id()).unwrap_or(0);
            ids.push((id, i));
            leaders.push(st.leader());
        }
        let first = leaders.first().copied().unwrap_or(0);
        if first == 0 || leaders.iter().any(|&l| l != first) {
            return Ok(None);
        }
        Ok(ids.iter().find(|(id, _)| *id == first).map(|&(_, i)| i))
    }

    /// Waits until each of the members `which` serves a linearizable read.
    pub fn wait_ready(&self, which: &[usize], within: Duration) -> Result<()> {
        for &i in which {
            self.wait_member_ready(i, within)?;
        }
        Ok(())
    }

    fn wait_member_ready(&self, i: usize, within: Duration) -> Result<()> {
        self.clients.block_on(|| async {
            let start = Instant::now();
            let mut last = String::new();
            while start.elapsed() < within {
                match self.raw_client(&[i]).await {
                    Ok(mut c) => {
                        match tokio::time::timeout(Duration::from_secs(5), c.get("/", None)).await {
                            Ok(Ok(_)) => return Ok(()),
                            Ok(Err(e)) => last = e.to_string(),
                            Err(_) => last = "timed out".into(),
                        }
                    }
                    Err(e) => last = format!("{e:#}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            bail!(
                "etcd member {} not ready within {within:?}: {last}; member logs in {}",
                i + 1,
                self.dir.display()
            )
        })?
    }

    /// The last lines of member `i`'s log (for failure messages).
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
            .collect()
    }
}

/// Every write ever made to `key` (oldest first) as (epoch, holder),
/// read back through the key's revisions: each version of the key is read
/// at the revision just before the next one was written. Call it where the
/// client can reach the members.
pub async fn history(client: &mut etcd_client::Client, key: &str) -> Result<Vec<(u64, String)>> {
    use ftvm_witness::etcd::EpochRecord;
    let mut out = Vec::new();
    let mut at: Option<i64> = None;
    loop {
        let opts = at.map(|r| etcd_client::GetOptions::new().with_revision(r));
        let resp = client.get(key, opts).await?;
        let Some(kv) = resp.kvs().first() else { break };
        let rec = EpochRecord::decode(kv.value())
            .with_context(|| format!("{key} holds {:?}", String::from_utf8_lossy(kv.value())))?;
        out.push((rec.epoch, rec.holder));
        if kv.version() <= 1 {
            break;
        }
        at = Some(kv.mod_revision() - 1);
    }
    out.reverse();
    Ok(out)
}
