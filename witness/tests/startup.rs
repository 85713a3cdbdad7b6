//! The witness refuses to start on a corrupt or unreadable database, a bad
//! config or a missing key file, and says which.

mod common;

use common::{Lab, WitnessProc, BIN};
use ftvm_witness::ClaimOutcome;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `ftvm-witness run --config cfg`, which must exit (non-zero) within
/// 20 s; returns its stderr.
fn must_refuse(cfg: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!status.success(), "witness started: {stderr}");
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("LISTENING"),
                "witness listened"
            );
            return stderr;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("witness did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn corrupt(only: Option<&str>) -> String {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    {
        let w = WitnessProc::start(&cfg);
        let a = lab.client("node-a", w.addr);
        assert_eq!(
            a.claim(0).await.unwrap(),
            ClaimOutcome::Granted { epoch: 1 }
        );
    }
    // Overwrite the data files of the sled directory with garbage.
    let db = lab.path().join("witness.db");
    let mut n = 0;
    for e in std::fs::read_dir(&db).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_file() && only.is_none_or(|o| o == name) {
            let len = std::fs::metadata(&p).unwrap().len().max(64) as usize;
            let junk: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
            std::fs::write(&p, junk).unwrap();
            n += 1;
        }
    }
    assert!(n > 0, "no sled files found in {}", db.display());
    let err = must_refuse(&cfg);
    eprintln!("corrupt {only:?}: {err}");
    assert!(err.contains("witness.db"), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_database_is_refused_and_named() {
    let err = corrupt(None).await;
    assert!(
        err.contains("corrupt") || err.contains("cannot open"),
        "{err}"
    );
    // Only the data file (sled's config file intact).
    let err = corrupt(Some("db")).await;
    assert!(
        err.contains("corrupt") || err.contains("cannot open"),
        "{err}"
    );
}

#[test]
fn unreadable_database_is_refused_and_named() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    std::fs::write(lab.path().join("witness.db"), b"not a directory").unwrap();
    let err = must_refuse(&cfg);
    eprintln!("unreadable: {err}");
    assert!(
        err.contains("witness.db") && err.contains("not a directory"),
        "{err}"
    );
}

#[test]
fn locked_database_is_refused_and_named() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let _w = WitnessProc::start(&cfg);
    let err = must_refuse(&cfg);
    eprintln!("locked: {err}");
    assert!(
        err.contains("witness.db") && err.contains("locked"),
        "{err}"
    );
}

#[test]
fn bad_config_is_refused_naming_file_and_key() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "max_frame_bytes = \"big\"");
    let err = must_refuse(&cfg);
    eprintln!("bad config: {err}");
    assert!(
        err.contains("witness.toml") && err.contains("server.max_frame_bytes"),
        "{err}"
    );
    std::fs::write(&cfg, "[server\nnode = ").unwrap();
    let err = must_refuse(&cfg);
    assert!(
        err.contains("witness.toml") && err.contains("syntax"),
        "{err}"
    );
    let err = must_refuse(&lab.path().join("absent.toml"));
    assert!(err.contains("absent.toml"), "{err}");
}

#[test]
fn missing_key_file_is_refused_and_named() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    std::fs::remove_file(lab.path().join("pki/witness.key")).unwrap();
    let err = must_refuse(&cfg);
    eprintln!("missing key: {err}");
    assert!(err.contains("pki/witness.key"), "{err}");
    // Nothing was created: the database is checked after the identity.
    assert!(!lab.path().join("witness.db").exists());
}

#[test]
fn certificate_of_another_node_is_refused() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("pki/witness.", "pki/node-a.");
    std::fs::write(&cfg, text).unwrap();
    let err = must_refuse(&cfg);
    assert!(
        err.contains("node-a") && err.contains("server.node"),
        "{err}"
    );
}

/// The entries of a directory, sorted (empty when it does not exist).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A witness killed (SIGKILL) at many moments of its first start on a new
/// database (the first ones create the directory, sled's files and the
/// format marker) never served a claim: every later start must work, as on
/// a new database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_creating_a_new_database_starts_again() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let db = lab.path().join("witness.db");
    // How long a whole start takes here, to spread the kills over it.
    let t = Instant::now();
    drop(WitnessProc::start(&cfg));
    let whole = t.elapsed();
    const KILLS: u32 = 60;
    // What the kills left: nothing, a creation that was stopped, a database.
    let (mut nothing, mut stopped, mut created) = (0, Vec::new(), 0);
    for i in 0..KILLS {
        std::fs::remove_dir_all(&db).unwrap();
        let delay = whole * i / (KILLS * 3 / 4);
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        let left = listing(&db);
        let w = WitnessProc::start(&cfg);
        // Nothing was ever granted: the first claim gets epoch 1.
        let a = lab.client("node-a", w.addr);
        assert_eq!(
            a.claim(0).await.unwrap(),
            ClaimOutcome::Granted { epoch: 1 },
            "kill {i} after {delay:?} left {left:?}"
        );
        a.close().await;
        if left.is_empty() {
            nothing += 1;
        } else if left.iter().any(|n| n == ftvm_witness::store::CREATING_FILE) {
            stopped.push(left);
        } else {
            created += 1;
        }
        drop(w);
    }
    eprintln!(
        "{KILLS} kills over {:?} (a whole start and a third): {nothing} left nothing, \
         {created} a created database, {} a stopped creation: {stopped:?}",
        whole * 4 / 3,
        stopped.len()
    );
}
