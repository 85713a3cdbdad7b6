//! Record and replay on real KVM with the real `ftvm` binary: determinism,
//! divergence reported at the exact exit, and clear errors for bad inputs.

use ftvm_appliance::replay::env::Input;
use ftvm_appliance::replay::log::{self, Entry, LogHeader, LOG_FORMAT_VERSION};
use std::path::{Path, PathBuf};
use std::process::Command;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");

mod common;
use common::{demo_image, kvm};

/// A config in `dir` running the demo `workload`, digesting every `interval` exits.
fn config(dir: &Path, name: &str, image: &Path, cmdline: &str, interval: u64) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[machine]\nimage = {image:?}\nmemory_mib = 32\ncmdline = {cmdline:?}\n\
             [console]\noutput = \"none\"\n[replay]\ndigest_interval = {interval}\nfull_digest_every = 4\n"
        ),
    )
    .unwrap();
    p
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ftvm(args: &[&str]) -> Out {
    let o = Command::new(FTVM).args(args).output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn record(cfg: &Path, log: &Path) -> (u64, String) {
    let o = ftvm(&[
        "record",
        "--config",
        cfg.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with("record: "))
        .unwrap_or_else(|| panic!("no record line: {}\n{}", o.stdout, o.stderr))
        .to_string();
    let exits = line
        .split("exits=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let digest = line.split("digest=").nth(1).unwrap().trim().to_string();
    (exits, digest)
}

fn replay(cfg: &Path, log: &Path) -> Out {
    ftvm(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ])
}

fn replay_line(o: &Out) -> &str {
    o.stdout
        .lines()
        .find(|l| l.starts_with("replay: "))
        .unwrap_or_else(|| panic!("no replay line: {}\n{}", o.stdout, o.stderr))
}

#[test]
fn workloads_replay_to_the_recorded_digest() {
    if !kvm("workloads_replay_to_the_recorded_digest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for w in ["compute", "heap", "clock", "entropy", "mixed"] {
        let cfg = config(dir.path(), w, &demo_image(), &format!("workload={w}"), 16);
        let log = dir.path().join(format!("{w}.ftlog"));
        let (exits, digest) = record(&cfg, &log);
        assert!(exits > 2, "{w}: only {exits} exits");
        let o = replay(&cfg, &log);
        assert_eq!(
            replay_line(&o),
            format!("replay: OK exits={exits} digest={digest}"),
            "{w}"
        );
        assert_eq!(o.code, 0);
        digests.push(digest);
    }
    digests.sort();
    digests.dedup();
    assert_eq!(
        digests.len(),
        5,
        "different workloads end in different states"
    );
}

#[test]
fn twenty_record_replay_pairs_never_differ() {
    if !kvm("twenty_record_replay_pairs_never_differ") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "mixed", &demo_image(), "workload=mixed", 64);
    let mut recorded = std::collections::BTreeSet::new();
    for i in 0..20 {
        let log = dir.path().join(format!("{i}.ftlog"));
        let (exits, digest) = record(&cfg, &log);
        let o = replay(&cfg, &log);
        assert_eq!(
            replay_line(&o),
            format!("replay: OK exits={exits} digest={digest}"),
            "pair {i}"
        );
        recorded.insert(digest);
    }
    // Live clock and entropy differ from run to run, so the recordings do too:
    // replay matching each of them is not a coincidence of identical runs.
    assert!(
        recorded.len() > 1,
        "recordings should differ in their inputs"
    );
}

/// Records `workload` with a digest at every exit and returns the entries.
fn recorded(dir: &Path, workload: &str) -> (PathBuf, LogHeader, Vec<Entry>) {
    let cfg = config(
        dir,
        workload,
        &demo_image(),
        &format!("workload={workload}"),
        1,
    );
    let log = dir.join(format!("{workload}.ftlog"));
    record(&cfg, &log);
    let (h, e) = log::read_all(&log).unwrap();
    (cfg, h, e)
}

fn replay_entries(dir: &Path, cfg: &Path, h: &LogHeader, entries: &[Entry]) -> String {
    let log = dir.join("edited.ftlog");
    log::write_all(&log, h, entries).unwrap();
    replay_line(&replay(cfg, &log)).to_string()
}

#[test]
fn changed_clock_value_diverges_at_that_exit() {
    if !kvm("changed_clock_value_diverges_at_that_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, h, mut entries) = recorded(dir.path(), "clock");
    // Pick an exit in the middle of the clock loop.
    let exits: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Entry::Exit { .. }))
        .map(|(i, _)| i)
        .collect();
    let idx = exits[exits.len() / 2];
    let Entry::Exit {
        ordinal,
        clock_ns,
        inputs,
        ..
    } = &mut entries[idx]
    else {
        unreachable!()
    };
    // The clock the guest sees after this exit: a WAIT's wake time replaces
    // the exit's clock value, so change whichever one the guest reads.
    match inputs.iter_mut().find(|i| matches!(i, Input::Wake { .. })) {
        Some(Input::Wake { now_ns, .. }) => *now_ns += 1,
        _ => *clock_ns += 1,
    }
    let target = *ordinal;
    let line = replay_entries(dir.path(), &cfg, &h, &entries);
    assert!(
        line.starts_with(&format!("replay: DIVERGED at exit {target}: ")),
        "expected divergence at exit {target}, got: {line}"
    );
}

#[test]
fn dropped_entry_diverges_at_that_exit() {
    if !kvm("dropped_entry_diverges_at_that_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, h, mut entries) = recorded(dir.path(), "mixed");
    let idx = entries
        .iter()
        .position(|e| matches!(e, Entry::Exit { ordinal, .. } if *ordinal == 20))
        .unwrap();
    entries.remove(idx);
    let line = replay_entries(dir.path(), &cfg, &h, &entries);
    assert!(
        line.starts_with("replay: DIVERGED at exit 20: "),
        "got: {line}"
    );
}

#[test]
fn flipped_entropy_byte_diverges_at_that_exit() {
    if !kvm("flipped_entropy_byte_diverges_at_that_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cfg, h, mut entries) = recorded(dir.path(), "entropy");
    let mut target = 0;
    for e in entries.iter_mut() {
        if let Entry::Exit {
            ordinal, inputs, ..
        } = e
        {
            if let Some(Input::Entropy(bytes)) = inputs.first_mut() {
                if *ordinal > 3 {
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0x40;
                    target = *ordinal;
                    break;
                }
            }
        }
    }
    assert!(target > 0, "no entropy input found");
    let line = replay_entries(dir.path(), &cfg, &h, &entries);
    assert!(
        line.starts_with(&format!("replay: DIVERGED at exit {target}: ")),
        "expected divergence at exit {target}, got: {line}"
    );
}

#[test]
fn bad_logs_and_images_give_clear_errors() {
    if !kvm("bad_logs_and_images_give_clear_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = config(d, "mixed", &demo_image(), "workload=compute", 8);
    let log = d.join("good.ftlog");
    record(&cfg, &log);
    let bytes = std::fs::read(&log).unwrap();

    let check = |name: &str, data: &[u8], want: &str| {
        let p = d.join(name);
        std::fs::write(&p, data).unwrap();
        let o = replay(&cfg, &p);
        let line = replay_line(&o);
        assert!(line.contains(want), "{name}: expected {want:?} in {line:?}");
        assert_ne!(o.code, 0, "{name}");
        assert!(
            !o.stderr.contains("panicked"),
            "{name} panicked: {}",
            o.stderr
        );
    };
    check("truncated.ftlog", &bytes[..bytes.len() - 7], "truncated");
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    check("corrupt.ftlog", &corrupt, "checksum");
    check("empty.ftlog", b"", "empty file");
    check(
        "garbage.ftlog",
        b"this is not a log at all, just text",
        "bad frame magic",
    );

    // Cut at the last frame boundary: no end marker.
    let (h, entries) = log::read_all(&log).unwrap();
    let cut = d.join("cut.ftlog");
    log::write_all(&cut, &h, &entries[..entries.len() - 1]).unwrap();
    let o = replay(&cfg, &cut);
    assert!(
        replay_line(&o).contains("no end marker"),
        "{}",
        replay_line(&o)
    );

    // A newer log format.
    let mut newer = h.clone();
    newer.format_version = LOG_FORMAT_VERSION + 1;
    let p = d.join("newer.ftlog");
    log::write_all(&p, &newer, &entries).unwrap();
    let o = replay(&cfg, &p);
    assert!(
        replay_line(&o).contains("newer than this ftvm supports"),
        "{}",
        replay_line(&o)
    );

    // A log from another guest image (same program, one byte different).
    let mut other = std::fs::read(demo_image()).unwrap();
    other.push(0);
    let other_img = d.join("other-demo");
    std::fs::write(&other_img, &other).unwrap();
    let other_cfg = config(d, "other", &other_img, "workload=compute", 8);
    let o = replay(&other_cfg, &log);
    assert!(
        replay_line(&o).contains("the log has guest image"),
        "{}",
        replay_line(&o)
    );

    // A missing image, and one that is not ELF.
    let missing = config(d, "missing", &d.join("nope.elf"), "", 8);
    let o = ftvm(&["run", "--config", missing.to_str().unwrap()]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("nope.elf") && o.stderr.contains("cannot read"),
        "{}",
        o.stderr
    );
    let text = d.join("script.sh");
    std::fs::write(&text, "#!/bin/sh\necho not a guest\n".repeat(10)).unwrap();
    let notelf = config(d, "notelf", &text, "", 8);
    let o = ftvm(&["run", "--config", notelf.to_str().unwrap()]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("not an ELF"), "{}", o.stderr);
}

#[test]
fn faulting_guests_are_reported_with_vector_and_rip() {
    if !kvm("faulting_guests_are_reported_with_vector_and_rip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (w, want) in [
        ("fault-ud", "#UD invalid opcode (vector 6)"),
        ("fault-gp", "#GP general protection (vector 13)"),
        ("fault-pf", "(vector 1"),
        ("panic", "guest panic: "),
    ] {
        let cfg = config(dir.path(), w, &demo_image(), &format!("workload={w}"), 8);
        let o = ftvm(&["run", "--config", cfg.to_str().unwrap()]);
        assert_eq!(o.code, 3, "{w}: {}", o.stderr);
        assert!(
            o.stderr.contains(want),
            "{w}: expected {want:?} in {}",
            o.stderr
        );
        assert!(o.stderr.contains("after exit"), "{w}: {}", o.stderr);
        if w != "panic" {
            assert!(o.stderr.contains("rip=0x"), "{w}: {}", o.stderr);
        }
        // A crash replays to the same crash.
        let log = dir.path().join(format!("{w}.ftlog"));
        let r = ftvm(&[
            "record",
            "--config",
            cfg.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 3);
        let o = replay(&cfg, &log);
        assert!(
            replay_line(&o).starts_with("replay: OK"),
            "{w}: {}",
            replay_line(&o)
        );
    }
}

#[test]
fn bad_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[machine]\nimage = \"x\"\nmemory_mb = 64\n").unwrap();
    let o = ftvm(&["run", "--config", p.to_str().unwrap()]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr.contains("bad.toml") && o.stderr.contains("machine.memory_mb"),
        "{}",
        o.stderr
    );
}

#[test]
fn recording_stopped_by_sigterm_replays_to_the_same_exit() {
    if !kvm("recording_stopped_by_sigterm_replays_to_the_same_exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "long",
        &demo_image(),
        "workload=clock iterations=100000",
        256,
    );
    let log = dir.path().join("long.ftlog");
    let child = Command::new(FTVM)
        .args([
            "record",
            "--config",
            cfg.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: sending SIGTERM to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "record exit: {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("record: ")).unwrap();
    let o = replay(&cfg, &log);
    assert_eq!(replay_line(&o), line.replace("record: ", "replay: OK "));
}
