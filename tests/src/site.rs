//! Test sites: network namespaces with a TAP device for a guest, processes
//! that are killed when the test ends, and a running ftkv VM.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why this process cannot create namespaces and TAP devices, if it cannot.
pub fn root_missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        Some("not running as root (network namespaces and TAP devices need root)".to_string())
    } else if !Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing".to_string())
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the `ip` command (iproute2) is missing".to_string())
    } else {
        None
    }
}

/// True when the test can create namespaces and TAP devices; otherwise
/// prints a SKIPPED line with the reason.
pub fn root_available(test: &str) -> bool {
    match root_missing() {
        Some(w) => crate::skip(test, &w),
        None => true,
    }
}

/// True when an ftkv VM can run here and `redis-cli` is installed;
/// otherwise prints a SKIPPED line with the reason.
pub fn ftkv_ready(test: &str) -> bool {
    crate::kvm_available(test)
        && root_available(test)
        && tool_available(test, "redis-cli", "redis-tools")
}

/// The Python that has the `redis` package (redis-py): `$FTVM_PYTHON`, or
/// the venv scripts/setup.sh creates at `target/py-venv`. Otherwise prints
/// a SKIPPED line saying how to get it.
pub fn python_with_redis(test: &str) -> Option<PathBuf> {
    let python = std::env::var_os("FTVM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/py-venv/bin/python"));
    let works = Command::new(&python)
        .args(["-c", "import redis"])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Some(python);
    }
    crate::skip(
        test,
        &format!(
            "{} cannot import redis-py (run scripts/setup.sh, or set FTVM_PYTHON)",
            python.display()
        ),
    );
    None
}

/// Why `tool` cannot run here (naming its Debian package), if it cannot.
pub fn tool_missing(tool: &str, package: &str) -> Option<String> {
    if Command::new(tool).arg("--version").output().is_ok() {
        return None;
    }
    Some(format!(
        "`{tool}` is not installed (Debian package {package}; scripts/setup.sh installs it)"
    ))
}

/// True when `tool` runs; otherwise prints a SKIPPED line naming the package.
pub fn tool_available(test: &str, tool: &str, package: &str) -> bool {
    match tool_missing(tool, package) {
        Some(w) => crate::skip(test, &w),
        None => true,
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Creates a persistent TAP `tap` with the host side at `host_cidr`.
    pub fn add_tap(&self, tap: &str, host_cidr: &str) -> Result<()> {
        run(
            Command::new("ip").args(["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"])
        )?;
        run(Command::new("ip").args(["-n", &self.name, "addr", "add", host_cidr, "dev", tap]))?;
        run(Command::new("ip").args(["-n", &self.name, "link", "set", tap, "up"]))?;
        Ok(())
    }

    /// Runs `f` on a new thread that has joined this namespace (sockets it
    /// opens live there), and returns what it returns.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_this_thread()?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread in namespace {} panicked", self.name))?
        })
    }

    /// Runs the future `make` returns to completion on a tokio runtime whose
    /// threads all live in this namespace: a thread enters it first, then
    /// builds the runtime (threads inherit the namespace of the thread that
    /// creates them), so every socket the future opens is inside.
    pub fn block_on<Fut: std::future::Future>(
        &self,
        make: impl FnOnce() -> Fut + Send,
    ) -> Result<Fut::Output>
    where
        Fut::Output: Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_this_thread()?;
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    Ok(rt.block_on(make()))
                })
                .join()
                // A failed assertion inside fails the caller the same way.
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread (only) into this namespace.
    fn enter_this_thread(&self) -> Result<()> {
        ftvm_appliance::drill::enter_netns(&self.name)
            .with_context(|| format!("entering network namespace {}", self.name))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process killed (SIGKILL) when dropped, unless waited for.
#[derive(Debug)]
pub struct Guard {
    pub child: Option<Child>,
}

impl Guard {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Guard { child: Some(child) })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn wait_output(mut self) -> Result<Output> {
        let child = self.child.take().context("already waited")?;
        Ok(child.wait_with_output()?)
    }

    /// Waits for the process to exit (after a signal, say).
    pub fn wait_status(mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already waited")?;
        Ok(child.wait()?)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the guest lives in every test site.
pub const GUEST_IP: &str = "10.0.2.15";
pub const HOST_CIDR: &str = "10.0.2.1/24";
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const TAP: &str = "ftvm0";

/// The built ftkv guest image.
pub fn ftkv_image() -> PathBuf {
    crate::guest_dir().join("ftkv")
}

/// Guest memory for ftkv in tests: ftkv sizes its connection count to a
/// worst case of ~7.2 MiB each plus twice `maxmemory` (docs in guest/ftkv),
/// so 1152 MiB with `maxmemory=32M` serves all 128 connections. Host
/// memory is only used as the guest touches it.
pub const FTKV_MEMORY_MIB: u64 = 1152;

/// ftkv's keyspace limit (`maxmemory=`) in tests.
pub const FTKV_MAXMEMORY: u64 = 32 << 20;

/// Writes an ftvm config running ftkv on `disk` with `memory_mib` of guest
/// memory and a keyspace limit of `maxmemory` bytes, its console in `dir`.
pub fn ftkv_config(dir: &Path, disk: &Path, memory_mib: u64, maxmemory: u64) -> Result<PathBuf> {
    let p = dir.join("ftkv.toml");
    std::fs::write(
        &p,
        format!(
            "[machine]\nimage = {:?}\nmemory_mib = {memory_mib}\ncmdline = \"ip={GUEST_IP}/24 gw=10.0.2.1 maxmemory={maxmemory}\"\n\
             [net]\ntap = \"{TAP}\"\nmac = \"{GUEST_MAC}\"\n\
             [disk]\npath = {:?}\n\
             [console]\noutput = {:?}\n",
            ftkv_image(),
            disk,
            dir.join("console.log")
        ),
    )?;
    Ok(p)
}

/// Creates a disk image with `ftvm disk create`.
pub fn create_disk(path: &Path, size: &str) -> Result<()> {
    run(Command::new(crate::bin("ftvm"))
        .args(["disk", "create"])
        .arg(path)
        .args(["--size", size]))?;
    Ok(())
}

/// Runs `redis-cli` in `ns` against the guest with `args`; returns stdout.
pub fn redis_cli(ns: &NetNs, args: &[&str]) -> Result<String> {
    let out = ns
        .command("timeout")
        .args(["30", "redis-cli", "-h", GUEST_IP])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until the guest answers PING (or `timeout` passes).
pub fn wait_for_ping(ns: &NetNs, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if redis_cli(ns, &["PING"]).is_ok_and(|o| o == "PONG") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("ftkv did not answer PING within {timeout:?}")
}

/// `ftvm replay --config <config> --log <log> --disk <disk>`: its stdout.
pub fn replay(config: &Path, log: &Path, disk: &Path) -> Result<String> {
    let out = Command::new(crate::bin("ftvm"))
        .arg("replay")
        .arg("--config")
        .arg(config)
        .arg("--log")
        .arg(log)
        .arg("--disk")
        .arg(disk)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `record: ...` and `disk: root=...` lines `ftvm record` prints.
pub fn record_summary(stdout: &str) -> Result<(String, String)> {
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
            .with_context(|| format!("no `{prefix}` line in ftvm's output:\n{stdout}"))
    };
    Ok((line("record: ")?, line("disk: root=")?))
}

/// A site: a namespace with a TAP, and the VM running in it.
#[derive(Debug)]
pub struct FtkvSite {
    pub ns: NetNs,
    pub vm: Option<Guard>,
    pub config: PathBuf,
}

impl FtkvSite {
    /// A namespace with the TAP ready; no VM yet.
    pub fn new(prefix: &str, config: PathBuf) -> Result<Self> {
        let ns = NetNs::new(prefix)?;
        ns.add_tap(TAP, HOST_CIDR)?;
        Ok(FtkvSite {
            ns,
            vm: None,
            config,
        })
    }

    /// A site whose VM runs ftkv on a fresh 64 MiB disk in `dir`; VM not started.
    pub fn with_new_disk(prefix: &str, dir: &Path) -> Result<Self> {
        let disk = dir.join("ftkv.img");
        create_disk(&disk, "64M")?;
        let config = ftkv_config(dir, &disk, FTKV_MEMORY_MIB, FTKV_MAXMEMORY)?;
        Self::new(prefix, config)
    }

    /// Starts `ftvm <args...> --config <config>` in the namespace and waits for PING.
    pub fn start(&mut self, args: &[&str]) -> Result<()> {
        let mut cmd = self.ns.command(crate::bin("ftvm"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.vm = Some(Guard::spawn(&mut cmd)?);
        wait_for_ping(&self.ns, Duration::from_secs(20))
    }

    /// Stops the VM with SIGTERM and returns its stdout.
    pub fn stop(&mut self) -> Result<String> {
        let vm = self.vm.take().context("no VM running")?;
        vm.signal(libc::SIGTERM);
        let out = vm.wait_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the VM with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.signal(libc::SIGKILL);
            let _ = vm.wait_output();
        }
    }

    pub fn cli(&self, args: &[&str]) -> Result<String> {
        redis_cli(&self.ns, args)
    }

    /// One `redis-cli <extra...>` connection to the guest, reading commands
    /// from its stdin (ended by `timeout` if a test goes wrong).
    pub fn spawn_cli(&self, extra: &[&str]) -> Result<Child> {
        let child = self
            .ns
            .command("timeout")
            .args(["120", "redis-cli", "-h", GUEST_IP])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(child)
    }

    /// Feeds `commands` (one per line) to one `redis-cli <extra...>`
    /// connection; returns its output lines.
    pub fn pipe_cli(&self, extra: &[&str], commands: &str) -> Result<Vec<String>> {
        use std::io::Write;
        let mut child = self.spawn_cli(extra)?;
        child
            .stdin
            .take()
            .context("redis-cli stdin")?
            .write_all(commands.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}
