//! The three-site lab (`scripts/lab.sh`) for end-to-end tests: namespaces
//! for site A, site B, the witness and a client, the WAN relay between
//! them, the lab configs, and helpers to start the witness and the nodes,
//! read their status and drive the relay. The witness is `ftvm-witness` or
//! a three-member etcd cluster, one member per site ([`Witness`]). Every lab
//! has its own prefix and directory, so tests run side by side; dropping it
//! kills its processes and removes its namespaces.

use crate::site::{Guard, GUEST_IP};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Labs of one test binary run one at a time: each runs two VMs, a relay
/// and clients, and two cores shared with other test binaries are not
/// enough for several at once without starving their heartbeats.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Failure timeout of lab tests: the production default (2 s) with room for
/// a loaded CI machine, where a heartbeat can be late without any fault.
pub const TEST_FAILURE_TIMEOUT_MS: u64 = 4000;

/// Hang guard for waits in tests: generous, so a busy machine never trips
/// it; it only catches a test that would otherwise wait forever.
pub const HANG: Duration = Duration::from_secs(120);

/// What breaks the pair's ties (`scripts/lab.sh up --witness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Witness {
    /// One `ftvm-witness` process on the witness site.
    Ftvm,
    /// Three etcd members, one on each site (etcd-a, etcd-b, etcd-w).
    Etcd,
}

impl Witness {
    fn arg(self) -> &'static str {
        match self {
            Witness::Ftvm => "ftvm",
            Witness::Etcd => "etcd",
        }
    }

    /// Why a lab with this witness cannot run here, beyond what every lab
    /// needs (root, KVM, redis-cli), if it cannot.
    pub fn missing(self) -> Option<String> {
        match self {
            Witness::Ftvm => None,
            Witness::Etcd => crate::etcd_lab::missing()
                .or_else(|| crate::site::tool_missing("etcdctl", "etcd-client")),
        }
    }
}

/// One of the lab's sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    A,
    B,
}

impl Site {
    pub fn letter(self) -> &'static str {
        match self {
            Site::A => "a",
            Site::B => "b",
        }
    }

    pub fn other(self) -> Site {
        match self {
            Site::A => Site::B,
            Site::B => Site::A,
        }
    }
}

/// A lab, torn down on drop.
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub witness_kind: Witness,
    _tmp: Option<tempfile::TempDir>,
    pub witness: Option<Guard>,
    pub nodes: [Option<Guard>; 2],
    _turn: std::sync::MutexGuard<'static, ()>,
}

fn script() -> PathBuf {
    crate::repo_root().join("scripts/lab.sh")
}

fn bin_dir() -> PathBuf {
    crate::bin("ftvm")
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

fn checked(mut cmd: Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl Lab {
    /// Builds a lab in a fresh temporary directory with `delay_ms` one-way
    /// delay on every relay route and an `ftvm-witness` witness.
    pub fn up(delay_ms: u64) -> Result<Lab> {
        Lab::up_with(delay_ms, Witness::Ftvm)
    }

    /// [`Lab::up`] with the witness `witness` (an etcd cluster is started
    /// and answering when this returns; `ftvm-witness` is started by
    /// [`Lab::start_witness`] or a drill).
    pub fn up_with(delay_ms: u64, witness: Witness) -> Result<Lab> {
        Lab::create(delay_ms, witness, &[])
    }

    /// [`Lab::up`] with sites A and B and the witness site as SSH hosts
    /// (`lab.sh up --hosts`): node-a, node-b and witness-c in
    /// [`Lab::ssh_config`], each with private /etc/ftvm, /var/lib/ftvm,
    /// /opt/ftvm, /run/ftvm and /var/log/ftvm.
    pub fn up_with_hosts(delay_ms: u64) -> Result<Lab> {
        Lab::create(delay_ms, Witness::Ftvm, &["--hosts"])
    }

    fn create(delay_ms: u64, witness: Witness, extra: &[&str]) -> Result<Lab> {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("lab");
        let prefix = format!(
            "l{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let lab = Lab {
            prefix,
            dir,
            witness_kind: witness,
            _tmp: Some(tmp),
            witness: None,
            nodes: [None, None],
            _turn: turn,
        };
        let delay = delay_ms.to_string();
        let mut args = vec!["up", "--delay-ms", &delay, "--witness", witness.arg()];
        args.extend_from_slice(extra);
        lab.script(&args)?;
        lab.set_failure_timeout(TEST_FAILURE_TIMEOUT_MS)?;
        Ok(lab)
    }

    /// Sets `ft.failure_timeout_ms` of both nodes and the drill's targets
    /// (before the nodes start).
    pub fn set_failure_timeout(&self, ms: u64) -> Result<()> {
        let t = ms.to_string();
        for s in [Site::A, Site::B] {
            self.set_ft(s, "failure_timeout_ms", &t)?;
        }
        let targets = self.dir.join("drill.toml");
        let text = std::fs::read_to_string(&targets)?;
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("failure_timeout_ms = ") {
                out.push_str(&format!("failure_timeout_ms = {t}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(&targets, out)?;
        Ok(())
    }

    /// The ssh_config naming the lab's hosts (after [`Lab::up_with_hosts`]).
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.join("hosts/ssh_config")
    }

    /// Runs `command` on lab host `host` over SSH; its stdout.
    pub fn ssh(&self, host: &str, command: &[&str]) -> Result<String> {
        let mut c = Command::new("ssh");
        c.arg("-F").arg(self.ssh_config()).arg(host).args(command);
        let out = checked(c)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether a lab test `test` can run here (KVM, root, redis-cli, the
    /// witness's tools); prints why not.
    pub fn ready(test: &str, witness: Witness) -> bool {
        crate::kvm_available(test)
            && crate::site::root_available(test)
            && crate::site::tool_available(test, "redis-cli", "redis-tools")
            && witness.missing().is_none_or(|why| crate::skip(test, &why))
    }

    /// Runs `scripts/lab.sh ARGS[0] --prefix P --dir D ARGS[1..]` on this lab.
    pub fn script(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new("bash");
        c.arg(script())
            .arg(args[0])
            .args(["--prefix", &self.prefix, "--dir"])
            .arg(&self.dir)
            .args(&args[1..])
            .env("FTVM_BIN_DIR", bin_dir());
        checked(c)
    }

    pub fn ns(&self, site: &str) -> String {
        format!("{}-{site}", self.prefix)
    }

    /// A command running `program` in namespace `site` (a, b, w, c, wan).
    pub fn command(&self, site: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(site)]).arg(program);
        c
    }

    pub fn config(&self, site: Site) -> PathBuf {
        self.dir.join(format!("node-{}.toml", site.letter()))
    }

    /// Replaces `key = ...` (first occurrence at the start of a line) in a
    /// site's config, or appends `line` to the `[ft]` table when absent.
    pub fn set_ft(&self, site: Site, key: &str, value: &str) -> Result<()> {
        let p = self.config(site);
        let text = std::fs::read_to_string(&p)?;
        let mut done = false;
        let mut out = String::new();
        for line in text.lines() {
            if !done && line.starts_with(&format!("{key} = ")) {
                out.push_str(&format!("{key} = {value}\n"));
                done = true;
            } else {
                out.push_str(line);
                out.push('\n');
                if !done && line == "[ft]" && !text.contains(&format!("\n{key} = ")) {
                    out.push_str(&format!("{key} = {value}\n"));
                    done = true;
                }
            }
        }
        if !done {
            bail!("{}: no [ft] table to add {key} to", p.display());
        }
        std::fs::write(&p, out)?;
        Ok(())
    }

    /// Sends a command to the WAN relay (`set`, `block`, `unblock`, `status`).
    pub fn relay(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["relay", "--"];
        full.extend_from_slice(args);
        let out = self.script(&full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn_logged(
        &self,
        site: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Guard> {
        let out = std::fs::File::create(self.dir.join(format!("{name}.out")))?;
        let err = std::fs::File::create(self.dir.join(format!("{name}.err")))?;
        let mut c = self.command(site, program);
        c.args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        Guard::spawn(&mut c)
    }

    /// Starts `ftvm-witness` and waits until it listens; with an etcd
    /// witness, starts the witness site's member (etcd-w) unless it runs.
    pub fn start_witness(&mut self) -> Result<()> {
        if self.witness_kind == Witness::Etcd {
            return self.script(&["start", "witness"]).map(drop);
        }
        let cfg = self.dir.join("witness.toml");
        let g = self.spawn_logged(
            "w",
            "witness",
            &crate::bin("ftvm-witness"),
            &["run", "--config", cfg.to_str().context("path")?],
            &[],
        )?;
        self.witness = Some(g);
        let log = self.dir.join("witness.out");
        wait_until("the witness to listen", || {
            Ok(std::fs::read_to_string(&log)?.contains("LISTENING"))
        })
    }

    /// Starts `ftvm run` for `site` with `extra` arguments (e.g. `--primary`).
    pub fn start_node(&mut self, site: Site, extra: &[&str]) -> Result<()> {
        self.start_node_env(site, extra, &[])
    }

    /// [`Lab::start_node`] with extra environment variables (test hooks).
    pub fn start_node_env(
        &mut self,
        site: Site,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let cfg = self.config(site);
        let mut args = vec!["run", "--config", cfg.to_str().context("path")?];
        args.extend_from_slice(extra);
        let name = format!("node-{}", site.letter());
        let g = self.spawn_logged(site.letter(), &name, &crate::bin("ftvm"), &args, env)?;
        self.nodes[site as usize] = Some(g);
        Ok(())
    }

    pub fn node(&mut self, site: Site) -> Option<&mut Guard> {
        self.nodes[site as usize].as_mut()
    }

    /// What the node printed on stdout and stderr so far.
    pub fn node_output(&self, site: Site) -> (String, String) {
        let read = |ext: &str| {
            std::fs::read_to_string(self.dir.join(format!("node-{}.{ext}", site.letter())))
                .unwrap_or_default()
        };
        (read("out"), read("err"))
    }

    /// Sends `sig` to the node and waits for it to exit; returns its exit code.
    pub fn stop_node(&mut self, site: Site, sig: i32) -> Result<Option<i32>> {
        let g = self.nodes[site as usize]
            .take()
            .context("node not running")?;
        g.signal(sig);
        let status = g.wait_status()?;
        Ok(status.code())
    }

    /// Stops the primary on `site` with SIGTERM, which ends the log; the
    /// backup must stop at the same exit by itself. Fails unless both exit
    /// 0, the backup prints `replay: OK` with the primary's record summary
    /// and disk line, and the two images are byte-identical. Returns the
    /// disks' Merkle root.
    pub fn stop_pair_cleanly(&mut self, primary: Site) -> Result<String> {
        let backup = primary.other();
        let code = self.stop_node(primary, libc::SIGTERM)?;
        ensure!(code == Some(0), "the primary exited with {code:?}");
        let code = self.wait_node(backup)?;
        ensure!(code == Some(0), "the backup exited with {code:?}");
        let line = |text: &str, prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .map(str::to_string)
        };
        let (p_out, p_err) = self.node_output(primary);
        let (b_out, b_err) = self.node_output(backup);
        let record = line(&p_out, "record:")
            .with_context(|| format!("no record summary from the primary:\n{p_out}{p_err}"))?;
        let replay = line(&b_out, "replay: OK")
            .with_context(|| format!("the backup did not replay OK:\n{b_out}{b_err}"))?;
        ensure!(
            replay.replace("replay: OK", "") == record.replace("record:", ""),
            "the backup's replay ({replay}) does not end where the primary's record ({record}) does"
        );
        ensure!(
            line(&p_out, "disk:") == line(&b_out, "disk:"),
            "the disk lines differ: {:?} vs {:?}",
            line(&p_out, "disk:"),
            line(&b_out, "disk:")
        );
        let img = |s: Site| self.dir.join(format!("node-{}.img", s.letter()));
        let (root_p, root_b) = (
            crate::reprotect::disk_root(&img(primary))?,
            crate::reprotect::disk_root(&img(backup))?,
        );
        ensure!(root_p == root_b, "disk roots differ: {root_p} vs {root_b}");
        ensure!(
            same_bytes(&img(primary), &img(backup))?,
            "the two disk images differ byte for byte"
        );
        Ok(root_p)
    }

    /// Waits for the node to exit by itself; returns its exit code.
    pub fn wait_node(&mut self, site: Site) -> Result<Option<i32>> {
        let g = self.nodes[site as usize]
            .take()
            .context("node not running")?;
        let start = Instant::now();
        let mut g = g;
        while g.is_running() {
            if start.elapsed() > HANG {
                bail!("node {site:?} did not exit within {HANG:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(g.wait_status()?.code())
    }

    /// The node's `/status` document.
    pub fn status(&self, site: Site) -> Result<serde_json::Value> {
        self.status_command(site)()
    }

    /// Reads the node's `/status` when called; owns what it needs, so it
    /// can run on another thread.
    pub fn status_command(
        &self,
        site: Site,
    ) -> impl Fn() -> Result<serde_json::Value> + Send + 'static {
        let ns = self.ns(site.letter());
        let config = self.config(site);
        move || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(crate::bin("ftvm"))
                .args(["status", "--json", "--config"])
                .arg(&config)
                .output()?;
            if !out.status.success() {
                bail!(
                    "status of {site:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(serde_json::from_slice(&out.stdout)?)
        }
    }

    /// Stops both nodes and the witness, and starts over from `site`'s
    /// disk (`lab.sh reset --from`): state forgotten, both disks equal.
    pub fn reset_from(&mut self, site: Site) -> Result<()> {
        for g in self
            .nodes
            .iter_mut()
            .chain(std::iter::once(&mut self.witness))
        {
            drop(g.take());
        }
        self.script(&["reset", "--from", site.letter()]).map(drop)
    }

    /// Waits until the node's status satisfies `pred`.
    pub fn wait_status(
        &self,
        site: Site,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < HANG {
            if let Ok(v) = self.status(site) {
                if pred(&v) {
                    return Ok(v);
                }
                last = Some(v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{site:?} never reached {what}; last status: {last:?}\n{}",
            self.logs()
        )
    }

    /// `etcdctl ARGS` as the lab's operator (etcd witness only); its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["etcdctl", "--"];
        full.extend_from_slice(args);
        let out = self.script(&full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The tails of every process's logs, for failure messages.
    pub fn logs(&self) -> String {
        let witness: &[&str] = match self.witness_kind {
            Witness::Ftvm => &["witness.out", "witness.err"],
            Witness::Etcd => &["etcd-a.log", "etcd-b.log", "etcd-w.log"],
        };
        let nodes = ["node-a.out", "node-a.err", "node-b.out", "node-b.err"];
        let files: Vec<&str> = witness.iter().chain(&nodes).copied().collect();
        self.tails(&files, 25)
    }

    /// The last `n` lines of each of `files` (relative to the lab's
    /// directory), for failure messages.
    pub fn tails(&self, files: &[&str], n: usize) -> String {
        let mut out = String::new();
        for name in files {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let (tail, kept) = last_lines(&text, n);
            out.push_str(&format!("--- {name} (last {kept} lines)\n{tail}\n"));
        }
        out
    }

    /// `redis-cli` in the client namespace; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command("c", "timeout")
            .args(["60", "redis-cli", "-h", GUEST_IP])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until ftkv answers PING through the client LAN.
    pub fn wait_for_ping(&self) -> Result<()> {
        wait_until("ftkv to answer PING", || {
            Ok(self.cli(&["PING"]).is_ok_and(|o| o == "PONG"))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.logs()))
    }

    /// Runs `ftvm drill` against the lab with `clients` Redis clients;
    /// returns each iteration's report (passed or not).
    pub fn run_drill(
        &self,
        scenario: &str,
        repeat: u32,
        seed: u64,
        clients: usize,
    ) -> Result<Vec<serde_json::Value>> {
        let out = self.dir.join(format!("drill-{scenario}"));
        let run = Command::new(crate::bin("ftvm"))
            .args(["drill", "--targets"])
            .arg(self.dir.join("drill.toml"))
            .args(["--scenario", scenario, "--repeat", &repeat.to_string()])
            .args(["--seed", &seed.to_string(), "--settle", "6"])
            .args(["--clients", &clients.to_string(), "--out"])
            .arg(&out)
            .env("RUST_LOG", "info")
            // The targets' commands (lab.sh) start this build's nodes, not
            // whatever target/release holds.
            .env("FTVM_BIN_DIR", bin_dir())
            .output()?;
        let report = std::fs::read_to_string(out.join("report.json")).with_context(|| {
            format!(
                "no drill report: {}\n{}\n{}",
                String::from_utf8_lossy(&run.stdout),
                String::from_utf8_lossy(&run.stderr),
                self.logs()
            )
        })?;
        let all: Vec<serde_json::Value> = serde_json::from_str(&report)?;
        if all.len() != repeat as usize {
            bail!("{} iterations reported of {repeat}", all.len());
        }
        if !out.join(format!("{scenario}-1.svg")).exists() {
            bail!("the drill drew no plot");
        }
        Ok(all)
    }

    /// [`Lab::run_drill`] with 6 clients, checking what every drill checks
    /// (passed, nothing lost or broken, linearizable, never two live sites);
    /// panics otherwise.
    pub fn drill(&self, scenario: &str, repeat: u32, seed: u64) -> Vec<serde_json::Value> {
        let all = self
            .run_drill(scenario, repeat, seed, 6)
            .unwrap_or_else(|e| panic!("{e:#}"));
        for it in &all {
            assert_eq!(
                it["passed"],
                true,
                "{scenario} #{}: {}\n{}",
                it["iteration"],
                it["problems"],
                self.logs()
            );
            // The drill's checks, restated: nothing a client saw was lost.
            assert_eq!(it["writes_lost"], 0, "{it}");
            assert_eq!(it["connections_broken"], 0, "{it}");
            assert_eq!(it["linearizable"], "linearizable", "{it}");
            assert_eq!(it["two_live_moments"], 0, "{it}");
            assert!(it["writes_acknowledged"].as_u64() > Some(100), "{it}");
            assert!(it["first_reply_after_fault_ms"].is_number(), "{it}");
        }
        all
    }

    /// Starts the witness, the primary on A and the backup on B, and waits
    /// until they are paired and ftkv answers.
    pub fn start_pair(&mut self) -> Result<()> {
        self.start_witness()?;
        self.start_node(Site::A, &["--primary"])?;
        self.start_node(Site::B, &[])?;
        self.wait_status(Site::B, "the backup role", |v| v["role"] == "backup")?;
        self.wait_for_ping()
    }
}

/// Whether files `a` and `b` hold the same bytes (read in 1 MiB pieces:
/// disk images can be larger than memory allows twice).
pub fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Polls `pred` every 50 ms until it holds, for at most [`HANG`].
pub fn wait_until(what: &str, mut pred: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < HANG {
        if pred().unwrap_or(false) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("waited {HANG:?} for {what}")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for g in self
            .nodes
            .iter_mut()
            .chain(std::iter::once(&mut self.witness))
        {
            drop(g.take());
        }
        let _ = self.script(&["down"]);
    }
}

/// The last `n` lines of `text` (joined), and how many there are.
pub fn last_lines(text: &str, n: usize) -> (String, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    (tail.join("\n"), tail.len())
}

/// Runs `f` on a thread that lives in network namespace `ns` (sockets it
/// opens belong to that namespace), and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let name = ns.to_string();
    std::thread::spawn(move || {
        ftvm_appliance::drill::enter_netns(&name)
            .with_context(|| format!("entering network namespace {name}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))?
}

/// A minimal RESP client on one TCP connection (a real socket from the
/// client namespace; for timing replies and for seeing whether a reply
/// came at all).
#[derive(Debug)]
pub struct RespConn {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RespConn {
    pub fn connect(addr: &str) -> Result<RespConn> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(RespConn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends one command (array of bulk strings).
    pub fn send(&mut self, args: &[&str]) -> Result<()> {
        use std::io::Write;
        let mut m = format!("*{}\r\n", args.len());
        for a in args {
            m.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.stream.write_all(m.as_bytes())?;
        Ok(())
    }

    /// Reads one reply line (simple string, error, integer or the header of
    /// a bulk string followed by its data), waiting at most `timeout`;
    /// `Ok(None)` when nothing complete arrived in time.
    pub fn reply(&mut self, timeout: Duration) -> Result<Option<String>> {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = parse_reply(&self.buf) {
                let (text, used) = r;
                self.buf.drain(..used);
                return Ok(Some(text));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("the server closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a command and waits (up to [`HANG`]) for its reply.
    pub fn call(&mut self, args: &[&str]) -> Result<String> {
        self.send(args)?;
        self.reply(HANG)?
            .with_context(|| format!("no reply to {args:?} within {HANG:?}"))
    }
}

/// One RESP2 reply at the start of `b`: its text and the bytes it used.
fn parse_reply(b: &[u8]) -> Option<(String, usize)> {
    let end = b.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&b[..end]).into_owned();
    match b.first()? {
        b'$' => {
            let n: i64 = line[1..].parse().ok()?;
            if n < 0 {
                return Some(("(nil)".into(), end + 2));
            }
            let start = end + 2;
            let stop = start + n as usize;
            if b.len() < stop + 2 {
                return None;
            }
            Some((
                String::from_utf8_lossy(&b[start..stop]).into_owned(),
                stop + 2,
            ))
        }
        _ => Some((line, end + 2)),
    }
}
