//! Failover in the three-site lab: each test runs `ftvm drill` (the real
//! binary: real Redis clients on long-lived connections, a real witness,
//! real QUIC, the fault injected through the lab's relay and processes)
//! and checks its report. These are CI's short sample; the 20-kill runs are
//! `bench failover` (docs/BENCHMARKS.md).

use ftvm_tests::lab::{Lab, Site};
use ftvm_tests::site;
use std::process::Command;

fn ready(test: &str) -> bool {
    ftvm_tests::kvm_available(test)
        && site::root_available(test)
        && site::tool_available(test, "redis-cli", "redis-tools")
}

/// Runs a drill against `lab`; returns each iteration's report.
fn drill(lab: &Lab, scenario: &str, repeat: u32, seed: u64) -> Vec<serde_json::Value> {
    let out = lab.dir.join(format!("drill-{scenario}"));
    let run = Command::new(ftvm_tests::bin("ftvm"))
        .args(["drill", "--targets"])
        .arg(lab.dir.join("drill.toml"))
        .args(["--scenario", scenario, "--repeat", &repeat.to_string()])
        .args([
            "--seed",
            &seed.to_string(),
            "--settle",
            "6",
            "--clients",
            "6",
            "--out",
        ])
        .arg(&out)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let report = std::fs::read_to_string(out.join("report.json")).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}\n{}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr),
            lab.logs()
        )
    });
    let all: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap();
    assert_eq!(all.len(), repeat as usize);
    for it in &all {
        let problems = &it["problems"];
        assert_eq!(
            it["passed"],
            true,
            "{scenario} #{}: {problems}\n{}\n{}",
            it["iteration"],
            String::from_utf8_lossy(&run.stdout),
            lab.logs()
        );
        // The drill's checks, restated: nothing a client saw was lost.
        assert_eq!(it["writes_lost"], 0, "{it}");
        assert_eq!(it["connections_broken"], 0, "{it}");
        assert_eq!(it["linearizable"], "linearizable", "{it}");
        assert_eq!(it["two_live_moments"], 0, "{it}");
        assert!(it["writes_acknowledged"].as_u64() > Some(100), "{it}");
        assert!(it["first_reply_after_fault_ms"].is_number(), "{it}");
    }
    assert!(run.status.success());
    assert!(out.join(format!("{scenario}-1.svg")).exists());
    all
}

#[test]
fn kill_primary_twice_loses_nothing_and_the_old_primary_stays_fenced() {
    if !ready("kill_primary_twice_loses_nothing_and_the_old_primary_stays_fenced") {
        return;
    }
    let lab = Lab::up(0).unwrap();
    for it in drill(&lab, "kill-primary", 2, 11) {
        assert_eq!(it["live_after"], it["expected_live_after"], "{it}");
        assert_ne!(it["live_after"], it["primary_before"], "{it}");
        assert_eq!(it["restarted_node_fenced"], true, "{it}");
        let f = &it["failover"];
        assert!(f["live_at_exit"].is_number(), "{it}");
    }
}

#[test]
fn a_killed_backup_lets_the_primary_go_solo_and_release_its_replies() {
    if !ready("a_killed_backup_lets_the_primary_go_solo_and_release_its_replies") {
        return;
    }
    let lab = Lab::up(0).unwrap();
    let it = &drill(&lab, "kill-backup", 1, 12)[0];
    assert_eq!(it["live_after"], it["primary_before"], "{it}");
    assert_eq!(it["restarted_node_fenced"], true, "{it}");
    let a = lab.status(Site::A).unwrap();
    assert_eq!(a["role"], "solo", "{a}");
    assert_eq!(a["held_outputs"]["frames"], 0, "{a}");
}

#[test]
fn partitioned_sites_end_with_exactly_one_live_and_the_other_fenced() {
    if !ready("partitioned_sites_end_with_exactly_one_live_and_the_other_fenced") {
        return;
    }
    let lab = Lab::up(0).unwrap();
    let it = &drill(&lab, "partition-sites", 1, 13)[0];
    let live = it["live_after"].as_str().unwrap();
    let other = if live == "a" { Site::B } else { Site::A };
    assert_eq!(lab.status(other).unwrap()["role"], "fenced", "{it}");
}

#[test]
fn a_primary_cut_from_backup_and_witness_never_serves_and_is_fenced() {
    if !ready("a_primary_cut_from_backup_and_witness_never_serves_and_is_fenced") {
        return;
    }
    let lab = Lab::up(0).unwrap();
    let it = &drill(&lab, "isolate-primary", 1, 14)[0];
    assert_eq!(it["live_after"], "b", "{it}");
    assert_eq!(lab.status(Site::A).unwrap()["role"], "fenced", "{it}");
}

#[test]
fn without_the_witness_nobody_goes_live_until_it_returns() {
    if !ready("without_the_witness_nobody_goes_live_until_it_returns") {
        return;
    }
    let lab = Lab::up(0).unwrap();
    let it = &drill(&lab, "partition-and-witness-down", 1, 15)[0];
    assert_eq!(it["nobody_live_while_witness_down"], true, "{it}");
}

#[test]
fn a_dead_witness_and_a_short_hiccup_change_nothing() {
    if !ready("a_dead_witness_and_a_short_hiccup_change_nothing") {
        return;
    }
    let lab = Lab::up(0).unwrap();
    for scenario in ["kill-witness", "hiccup"] {
        let it = &drill(&lab, scenario, 1, 16)[0];
        assert_eq!(it["live_after"], it["primary_before"], "{scenario}: {it}");
        assert!(
            it["failover"].is_null(),
            "{scenario}: a failover happened: {it}"
        );
    }
    let a = lab.status(Site::A).unwrap();
    let b = lab.status(Site::B).unwrap();
    assert_eq!(
        (a["role"].as_str(), b["role"].as_str()),
        (Some("primary"), Some("backup"))
    );
    assert_eq!(a["epoch"], 1, "no epoch was claimed: {a}");
}
