//! The vCPU can be paused and resumed from another thread, and stopped, on
//! real KVM. While paused it makes no exits.

use ftvm_appliance::devices::console::Console;
use ftvm_appliance::machine::Machine;
use ftvm_appliance::replay::digest::PageRun;
use ftvm_appliance::replay::env::{
    DigestDue, EnvError, Environment, ExitPoint, Gather, LocalRead, Outcome, WaitOutcome,
};
use ftvm_appliance::replay::live::LiveWorld;
use ftvm_appliance::vstate::vcpu::{VcpuControl, VcpuState};
use ftvm_config::appliance::ApplianceConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The live world, counting exits so the test can see progress.
struct Counting {
    live: LiveWorld,
    exits: Arc<AtomicU64>,
}

impl Environment for Counting {
    fn exit(&mut self, ordinal: u64, point: &ExitPoint) -> Result<u64, EnvError> {
        self.exits.store(ordinal, Ordering::SeqCst);
        self.live.exit(ordinal, point)
    }
    fn entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError> {
        self.live.entropy(buf)
    }
    fn wait(&mut self, deadline_ns: u64, gather: Gather) -> Result<WaitOutcome, EnvError> {
        self.live.wait(deadline_ns, gather)
    }
    fn net_rx(&mut self) -> Result<Option<Vec<u8>>, EnvError> {
        self.live.net_rx()
    }
    fn net_tx(&mut self, frame: &[u8]) -> Result<(), EnvError> {
        self.live.net_tx(frame)
    }
    fn disk_read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        local: LocalRead<'_>,
    ) -> Result<(), EnvError> {
        self.live.disk_read(offset, buf, local)
    }
    fn exit_done(&mut self) -> Result<(), EnvError> {
        Ok(())
    }
    fn digest_due(&mut self, _: u64) -> Result<Option<DigestDue>, EnvError> {
        Ok(None)
    }
    fn digest_taken(
        &mut self,
        _: u64,
        _: bool,
        _: &[PageRun],
        _: [u8; 32],
    ) -> Result<(), EnvError> {
        Ok(())
    }
    fn finish(&mut self, _: u64, _: &Outcome, _: [u8; 32]) -> Result<(), EnvError> {
        Ok(())
    }
}

#[test]
fn pause_resume_and_stop_from_another_thread() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        // CI sets FTVM_REQUIRE_ALL_TESTS=1: there a missing /dev/kvm is a failure.
        assert!(
            std::env::var("FTVM_REQUIRE_ALL_TESTS").map_or(true, |v| v != "1"),
            "/dev/kvm cannot be opened ({e}) and FTVM_REQUIRE_ALL_TESTS=1"
        );
        println!(
            "SKIPPED pause_resume_and_stop_from_another_thread: /dev/kvm cannot be opened ({e})"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("vm.toml");
    let image = std::path::PathBuf::from(env!("FTVM_GUEST_DIR")).join("demo");
    std::fs::write(
        &cfg_path,
        format!("[machine]\nimage = {image:?}\nmemory_mib = 16\ncmdline = \"workload=exits iterations=1000000\"\n[console]\noutput = \"none\"\n"),
    )
    .unwrap();
    let cfg = ApplianceConfig::load(&cfg_path).unwrap();
    let control = Arc::new(VcpuControl::new());
    let exits = Arc::new(AtomicU64::new(0));
    let (c, e) = (control.clone(), exits.clone());
    let vcpu = std::thread::spawn(move || {
        let mut machine = Machine::new(&cfg, Console::none()).unwrap();
        let mut env = Counting {
            live: LiveWorld::new().unwrap(),
            exits: e,
        };
        machine.run(&mut env, &c).unwrap()
    });
    while exits.load(Ordering::SeqCst) < 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(control.pause(), VcpuState::Paused);
    let at_pause = exits.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(exits.load(Ordering::SeqCst), at_pause, "exits while paused");
    assert_eq!(control.state(), VcpuState::Paused);
    control.resume();
    while exits.load(Ordering::SeqCst) < at_pause + 100 {
        std::thread::sleep(Duration::from_millis(5));
    }
    control.stop();
    let summary = vcpu.join().unwrap();
    assert_eq!(summary.outcome, Outcome::Stopped);
    assert!(summary.exits >= at_pause + 100);
    assert_eq!(control.state(), VcpuState::Finished);
}
