//! Re-protection and planned switchover in the three-site lab, with real
//! Redis clients: a killed or fenced node rejoins a running primary
//! (`--join`, or `ft.reprotect = "auto"` on the survivor), a join is
//! interrupted from either side, and roles swap by `ftvm switchover`.
//! Drills (`ftvm drill --scenario rejoin|switchover`) check lost writes,
//! broken connections, linearizability and two-live moments; the long runs
//! and the pause figures are `bench reprotect` (docs/BENCHMARKS.md).

use ftvm_tests::lab::{wait_until, Lab, Site, Witness};
use ftvm_tests::reprotect::{disk_root, fresh_disk, resync};
use std::time::{Duration, Instant};

fn role(lab: &Lab, site: Site) -> String {
    lab.status(site)
        .map(|v| v["role"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|_| "down".into())
}

/// Whether the process in a lab.sh pidfile still runs (not a zombie).
fn lab_proc_runs(lab: &Lab, name: &str) -> bool {
    let Ok(pid) = std::fs::read_to_string(lab.dir.join(format!("{name}.pid"))) else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Stops the pair a drill left running (started by lab.sh): the primary
/// cleanly, then waits for the backup to end at the same exit. Returns the
/// backup's stdout.
fn stop_drilled_pair(lab: &Lab, primary: Site) -> String {
    let backup = primary.other();
    lab.script(&["kill", primary.letter(), "TERM"]).unwrap();
    wait_until("the backup to stop", || {
        Ok(!lab_proc_runs(lab, backup.letter()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    std::fs::read_to_string(lab.dir.join(format!("node-{}.out", backup.letter()))).unwrap()
}

fn side(v: &serde_json::Value) -> Site {
    match v.as_str() {
        Some("a") => Site::A,
        Some("b") => Site::B,
        other => panic!("not a site: {other:?}"),
    }
}

/// The first and fourth checks: kill the primary, fail over,
/// rejoin the old primary with `--join`, twice (the second failover goes
/// the other way); then five switchovers back and forth; all under a write
/// load; then a clean stop with identical disks.
#[test]
fn rejoin_after_failover_and_five_switchovers_lose_nothing() {
    let test = "rejoin_after_failover_and_five_switchovers_lose_nothing";
    if !Lab::ready(test, Witness::Ftvm) {
        return;
    }
    let lab = Lab::up(0).unwrap();
    let rejoins = lab.drill("rejoin", 2, 31);
    for it in &rejoins {
        assert_eq!(it["live_after"], it["expected_live_after"], "{it}");
        assert_ne!(it["live_after"], it["primary_before"], "{it}");
        let r = &it["reprotect"];
        assert_eq!(r["phase"], "done", "{it}");
        assert!(r["memory_bytes_copied"].as_u64() > Some(0), "{it}");
        assert!(r["last_pause_ms"].is_number(), "{it}");
        assert!(r["joins_completed"].as_u64() >= Some(1), "{it}");
    }
    // The second failover went back to the first primary.
    assert_eq!(rejoins[1]["live_after"], rejoins[0]["primary_before"]);

    let switchovers = lab.drill("switchover", 5, 32);
    for it in &switchovers {
        assert_ne!(it["live_after"], it["primary_before"], "{it}");
        assert!(it["worst_latency_after_fault_ms"].is_number(), "{it}");
    }
    let primary = side(&switchovers[4]["live_after"]);
    let backup_out = stop_drilled_pair(&lab, primary);
    assert!(
        backup_out.contains("replay: OK"),
        "{backup_out}\n{}",
        lab.logs()
    );
    assert_eq!(
        disk_root(&lab.dir.join("node-a.img")).unwrap(),
        disk_root(&lab.dir.join("node-b.img")).unwrap()
    );
}

/// The third check, with `ft.reprotect = "auto"`: the backup goes
/// away, 10 MiB are written on a 1 GiB disk, the backup restarts without
/// `--join` and the survivor takes it back; the disk bytes sent are within
/// 2x of the chunks that changed, and the disks end identical.
#[test]
fn auto_reprotect_sends_only_the_changed_disk_chunks() {
    let test = "auto_reprotect_sends_only_the_changed_disk_chunks";
    if !Lab::ready(test, Witness::Ftvm) {
        return;
    }
    let mut lab = Lab::up(0).unwrap();
    let r = resync(&mut lab, "1G", 10).unwrap_or_else(|e| panic!("{e:#}\n{}", lab.logs()));
    eprintln!(
        "disk resync: {} bytes sent for {} bytes of changed chunks ({:.2}x)",
        r.disk_bytes_sent,
        r.changed_bytes,
        r.disk_bytes_sent as f64 / r.changed_bytes as f64
    );
    assert!(r.changed_bytes >= 10 << 20, "{r:?}");
    assert!(
        r.disk_bytes_sent > 0 && r.disk_bytes_sent <= 2 * r.changed_bytes,
        "{r:?}"
    );
}

/// Polls the live node until a join is copying (disk or memory), for at
/// most a minute; false if the join ended first.
fn copying(lab: &Lab, live: Site) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(v) = lab.status(live) {
            match v["reprotect"]["phase"].as_str() {
                Some("disk" | "memory") => return true,
                Some("done") if v["role"] == "primary" => return false,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The fifth check, and the empty-disk half of the third: a joiner
/// with an empty disk is killed mid-copy (the primary serves on, solo), a
/// retry syncs it in full; then the live node is killed while another join
/// copies, and the joiner, whose copy is incomplete, never goes live.
#[test]
fn an_interrupted_join_leaves_the_primary_serving_and_a_retry_completes() {
    let test = "an_interrupted_join_leaves_the_primary_serving_and_a_retry_completes";
    if !Lab::ready(test, Witness::Ftvm) {
        return;
    }
    let mut lab = Lab::up(0).unwrap();
    lab.start_pair().unwrap();
    for i in 0..50 {
        assert_eq!(lab.cli(&["SET", &format!("k{i}"), "x"]).unwrap(), "OK");
    }
    lab.stop_node(Site::B, libc::SIGKILL).unwrap();
    lab.wait_status(Site::A, "the primary to go solo", |v| v["role"] == "solo")
        .unwrap();
    let img_b = lab.dir.join("node-b.img");
    fresh_disk(&img_b, "64M").unwrap();

    // Kill the joiner mid-copy (a join can finish before it is seen
    // copying: then the backup leaves and joins again).
    let mut interrupted = false;
    for _ in 0..3 {
        lab.start_node(Site::B, &["--join"]).unwrap();
        if copying(&lab, Site::A) {
            lab.stop_node(Site::B, libc::SIGKILL).unwrap();
            interrupted = true;
            break;
        }
        lab.stop_node(Site::B, libc::SIGKILL).unwrap();
    }
    assert!(interrupted, "never saw a join copying\n{}", lab.logs());
    let a = lab
        .wait_status(Site::A, "the primary to stay solo", |v| {
            v["role"] == "solo"
                && v["reprotect"]["phase"] != "disk"
                && v["reprotect"]["phase"] != "memory"
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_eq!(a["protected"], false, "{a}");
    assert_eq!(lab.cli(&["SET", "during", "solo"]).unwrap(), "OK");
    assert_eq!(lab.cli(&["GET", "k49"]).unwrap(), "x");

    // The retry completes; the joiner checked its disk root against the
    // primary's at the cut-over.
    lab.start_node(Site::B, &["--join"]).unwrap();
    lab.wait_status(Site::A, "the pair protected again", |v| {
        v["role"] == "primary"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    lab.wait_status(Site::B, "the backup role", |v| v["role"] == "backup")
        .unwrap();
    let (_, b_err) = lab.node_output(Site::B);
    assert!(b_err.contains("re-protected"), "{b_err}");
    assert_eq!(lab.cli(&["GET", "during"]).unwrap(), "solo");

    // Now the live node dies while a join copies: the joiner has only part
    // of a machine and must not go live.
    lab.stop_node(Site::B, libc::SIGKILL).unwrap();
    lab.wait_status(Site::A, "the primary to go solo", |v| v["role"] == "solo")
        .unwrap();
    let mut interrupted = false;
    for _ in 0..3 {
        lab.start_node(Site::B, &["--join"]).unwrap();
        if copying(&lab, Site::A) {
            lab.stop_node(Site::A, libc::SIGKILL).unwrap();
            interrupted = true;
            break;
        }
        lab.stop_node(Site::B, libc::SIGKILL).unwrap();
        lab.wait_status(Site::A, "the primary to go solo", |v| v["role"] == "solo")
            .unwrap();
    }
    assert!(interrupted, "never saw a join copying\n{}", lab.logs());
    // Three failure timeouts and more: the joiner stays fenced.
    let watch = Duration::from_millis(3 * ftvm_tests::lab::TEST_FAILURE_TIMEOUT_MS);
    let start = Instant::now();
    while start.elapsed() < watch {
        let r = role(&lab, Site::B);
        assert!(
            r != "primary" && r != "solo",
            "the joiner went live with a partial copy: {r}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(role(&lab, Site::B), "fenced");
}
