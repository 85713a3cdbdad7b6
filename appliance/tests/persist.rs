//! Save and restore on real KVM: a machine saved at an exit boundary (its
//! state, plus a copy of its memory) and restored into a fresh machine
//! replays the rest of a recording to the same final digest as the machine
//! that was never stopped. States of another version or machine are refused.

use ftvm_appliance::devices::console::Console;
use ftvm_appliance::machine::{Machine, MachineError};
use ftvm_appliance::persist::{MachineState, PersistError};
use ftvm_appliance::replay::env::EnvError;
use ftvm_appliance::replay::live::LiveWorld;
use ftvm_appliance::replay::log::{self, Entry, EntrySource, LogReader, LogSink, LogWriter};
use ftvm_appliance::replay::recorder::{DigestSchedule, Recorder};
use ftvm_appliance::replay::replayer::Replayer;
use ftvm_appliance::vstate::vcpu::VcpuControl;
use ftvm_config::appliance::ApplianceConfig;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{demo_image, kvm};

fn config(dir: &Path, memory_mib: u64) -> ApplianceConfig {
    let p = dir.join(format!("demo-{memory_mib}.toml"));
    std::fs::write(
        &p,
        format!(
            "[machine]\nimage = {:?}\nmemory_mib = {memory_mib}\ncmdline = \"workload=mixed iterations=3\"\n\
             [console]\noutput = \"none\"\n[replay]\ndigest_interval = 64\nfull_digest_every = 4\n",
            demo_image()
        ),
    )
    .unwrap();
    ApplianceConfig::load(&p).unwrap()
}

/// Entries of a log after exit `after` (a machine restored at that exit
/// replays from here).
struct After {
    entries: VecDeque<Entry>,
}

impl After {
    fn new(path: &Path, after: u64) -> After {
        let (_, all) = log::read_all(path).unwrap();
        let entries = all
            .into_iter()
            .skip_while(|e| e.ordinal() <= after)
            .collect();
        After { entries }
    }
}

impl EntrySource for After {
    fn next_entry(&mut self) -> Result<Option<Entry>, EnvError> {
        Ok(self.entries.pop_front())
    }
    fn peek_entry(&mut self) -> Result<Option<&Entry>, EnvError> {
        Ok(self.entries.front())
    }
}

/// Memory and state of `m`, taken on its vCPU thread at an exit boundary.
fn snapshot(m: &mut Machine) -> (MachineState, Vec<u8>) {
    let st = m.save_state().unwrap();
    let (mem, _) = m.memory();
    let mut bytes = vec![0u8; (st.shape.memory_size) as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    (st, bytes)
}

#[test]
fn a_restored_machine_replays_the_rest_to_the_same_end() {
    if !kvm("a_restored_machine_replays_the_rest_to_the_same_end") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 32);
    let log_path = dir.path().join("run.ftlog");

    // Record, and snapshot at an exit boundary once the guest is well under
    // way. How far "under way" a delay gets depends on the machine's speed,
    // so a run that ended before the snapshot (or snapshotted before the
    // first exit) is recorded again with the snapshot asked for sooner
    // (or later): no single timing decides the test.
    let mut attempt = None;
    for delay_ms in [300u64, 100, 30, 10, 3, 1, 600, 2000] {
        let mut m = Machine::new(&cfg, Console::none()).unwrap();
        let writer =
            LogWriter::create(&log_path, &m.log_header(log::DiskReads::Ship, "", 0)).unwrap();
        let schedule = DigestSchedule {
            interval: 64,
            full_every: 4,
        };
        let mut rec = Recorder::new(
            LiveWorld::new().unwrap(),
            writer,
            schedule,
            log::DiskReads::Ship,
        );
        let control = std::sync::Arc::new(VcpuControl::new());
        let (tx, rx) = mpsc::channel();
        let c = control.clone();
        let snapper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            c.run_at_boundary(Box::new(move |m: &mut Machine| {
                let _ = tx.send(snapshot(m));
            }));
        });
        let summary = m.run(&mut rec, &control).unwrap();
        snapper.join().unwrap();
        // A task the run ended before taking is dropped with its sender.
        drop(control.take_boundary_task());
        let (_, mut log) = rec.into_parts();
        log.flush().unwrap();
        drop(log);
        if let Ok((state, memory)) = rx.try_recv() {
            if state.ordinal > 0 && state.ordinal < summary.exits {
                attempt = Some((state, memory, summary));
                break;
            }
        }
    }
    let (state, memory, summary) =
        attempt.expect("no attempt snapshotted the machine between its first and last exit");

    // The state survives its own encoding.
    let state = MachineState::decode(&state.encode().unwrap()).unwrap();

    // A fresh machine, its memory and state restored, replays the rest.
    let mut b = Machine::new_for_restore(&cfg, Console::none()).unwrap();
    let (mem, _) = b.memory();
    mem.write_slice(&memory, GuestAddress(0)).unwrap();
    b.restore_state(&state).unwrap();
    assert_eq!(b.ordinal(), state.ordinal);
    let mut replayer = Replayer::new(After::new(&log_path, state.ordinal));
    let end = b.run(&mut replayer, &VcpuControl::new()).unwrap();
    assert_eq!(end.exits, summary.exits);
    assert_eq!(
        end.digest, summary.digest,
        "the restored machine ended elsewhere"
    );
    assert!(replayer.digests_checked > 0);

    // A state of another version or another machine is refused, saying why.
    let mut other = state.clone();
    other.format_version = 99;
    let bytes = other.encode().unwrap();
    assert!(matches!(
        MachineState::decode(&bytes),
        Err(PersistError::Version { found: 99 })
    ));
    let mut c = Machine::new_for_restore(&config(dir.path(), 64), Console::none()).unwrap();
    let err = c.restore_state(&state).unwrap_err();
    assert!(
        matches!(&err, MachineError::Persist(PersistError::Shape(why)) if why.contains("MiB")),
        "{err}"
    );
    let mut reader = LogReader::open(&log_path).unwrap();
    assert!(reader.next_entry().unwrap().is_some());
}
