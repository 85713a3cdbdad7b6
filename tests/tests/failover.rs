//! Failover in the three-site lab: each test runs `ftvm drill` (the real
//! binary: real Redis clients on long-lived connections, a real witness,
//! real QUIC, the fault injected through the lab's relay and processes)
//! and checks its report. Each scenario runs with `ftvm-witness` and, as
//! its twin, with a three-member etcd cluster as the witness (one member
//! per site: `scripts/lab.sh up --witness etcd`). These are CI's short
//! sample; the 20-kill runs are `bench failover` (docs/BENCHMARKS.md).

use ftvm_tests::lab::{wait_until, Lab, Site, Witness};
use ftvm_witness::etcd::EpochRecord;

/// With an etcd witness: the cluster's record in etcd names the node live
/// after drill iteration `it` as the holder of the epoch it runs in (its
/// grant came from etcd).
fn assert_etcd_holder(lab: &Lab, it: &serde_json::Value) {
    if lab.witness_kind != Witness::Etcd {
        return;
    }
    let live = match it["live_after"].as_str() {
        Some("a") => Site::A,
        Some("b") => Site::B,
        other => panic!("live_after is {other:?}: {it}"),
    };
    let status = lab.status(live).unwrap();
    // A member that has just rejoined may not know the leader yet: ask again.
    let mut value = String::new();
    wait_until("etcd to answer a read of the epoch key", || {
        value = lab.etcdctl(&["get", "/ftvm/witness/lab/epoch", "--print-value-only"])?;
        Ok(true)
    })
    .unwrap();
    let record = EpochRecord::decode(value.trim().as_bytes())
        .unwrap_or_else(|| panic!("the epoch key holds {value:?}"));
    assert_eq!(
        (Some(record.epoch), record.holder.as_str()),
        (
            status["epoch"].as_u64(),
            format!("node-{}", live.letter()).as_str()
        ),
        "etcd's record vs the live node's status {status}"
    );
}

/// Runs `scenario` in a fresh lab with `witness`, unless the lab cannot
/// run here.
fn in_lab(test: &str, witness: Witness, scenario: fn(&Lab)) {
    if Lab::ready(test, witness) {
        scenario(&Lab::up_with(0, witness).unwrap());
    }
}

/// Each scenario below runs twice: `$ftvm` with `ftvm-witness`, `$etcd`
/// with the etcd witness.
macro_rules! with_each_witness {
    ($scenario:ident: $ftvm:ident, $etcd:ident) => {
        #[test]
        fn $ftvm() {
            in_lab(stringify!($ftvm), Witness::Ftvm, $scenario);
        }

        #[test]
        fn $etcd() {
            in_lab(stringify!($etcd), Witness::Etcd, $scenario);
        }
    };
}

/// The second iteration starts a fresh pair from the new primary's disk
/// (with etcd: the lab's reset deletes the epoch key, so the pair starts
/// at epoch 0 again).
fn kill_primary(lab: &Lab) {
    let all = lab.drill("kill-primary", 2, 11);
    for it in &all {
        assert_eq!(it["live_after"], it["expected_live_after"], "{it}");
        assert_ne!(it["live_after"], it["primary_before"], "{it}");
        assert_eq!(it["restarted_node_fenced"], true, "{it}");
        let f = &it["failover"];
        assert!(f["live_at_exit"].is_number(), "{it}");
    }
    assert_etcd_holder(lab, &all[1]);
}

with_each_witness!(kill_primary:
    kill_primary_twice_loses_nothing_and_the_old_primary_stays_fenced,
    etcd_witness_kill_primary_twice_loses_nothing_and_the_old_primary_stays_fenced);

fn kill_backup(lab: &Lab) {
    let it = &lab.drill("kill-backup", 1, 12)[0];
    assert_eq!(it["live_after"], it["primary_before"], "{it}");
    assert_eq!(it["restarted_node_fenced"], true, "{it}");
    let a = lab.status(Site::A).unwrap();
    assert_eq!(a["role"], "solo", "{a}");
    assert_eq!(a["held_outputs"]["frames"], 0, "{a}");
    assert_etcd_holder(lab, it);
}

with_each_witness!(kill_backup:
    a_killed_backup_lets_the_primary_go_solo_and_release_its_replies,
    etcd_witness_a_killed_backup_lets_the_primary_go_solo_and_release_its_replies);

/// With etcd, cutting the sites also cuts etcd-a from etcd-b: the members
/// keep a majority through etcd-w.
///
/// The drill saw the loser fenced while the sites were cut. With
/// `ft.reprotect = "auto"` the winner then takes it back as its backup, in
/// the same process, and that backup must be able to take over in turn:
/// the primary is killed, and the once-fenced node goes live.
fn partition_sites(lab: &Lab) {
    for site in [Site::A, Site::B] {
        lab.set_ft(site, "reprotect", "\"auto\"").unwrap();
    }
    let it = &lab.drill("partition-sites", 1, 13)[0];
    let (winner, loser) = match it["live_after"].as_str() {
        Some("a") => (Site::A, Site::B),
        Some("b") => (Site::B, Site::A),
        other => panic!("live_after is {other:?}: {it}"),
    };
    assert_etcd_holder(lab, it);
    let back = lab
        .wait_status(loser, "the fenced node taken back as the backup", |v| {
            v["role"] == "backup"
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(
        back["role_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rejoined")),
        "{back}"
    );
    lab.wait_status(winner, "the winner protected again", |v| {
        v["role"] == "primary"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let next = &lab.drill("kill-primary", 1, 17)[0];
    assert_eq!(
        next["primary_before"], it["live_after"],
        "the drill started a fresh pair instead: {next}"
    );
    assert_eq!(
        next["live_after"],
        loser.letter(),
        "the node fenced by the partition, taken back, did not take over: {next}"
    );
}

with_each_witness!(partition_sites:
    partitioned_sites_end_with_exactly_one_live_and_the_other_fenced,
    etcd_witness_partitioned_sites_end_with_exactly_one_live_and_the_other_fenced);

/// With etcd, site A's cut leaves etcd-a a minority of one: node-a gets no
/// answer; node-b claims through etcd-b and etcd-w.
fn isolate_primary(lab: &Lab) {
    let it = &lab.drill("isolate-primary", 1, 14)[0];
    assert_eq!(it["live_after"], "b", "{it}");
    assert_eq!(lab.status(Site::A).unwrap()["role"], "fenced", "{it}");
    assert_etcd_holder(lab, it);
}

with_each_witness!(isolate_primary:
    a_primary_cut_from_backup_and_witness_never_serves_and_is_fenced,
    etcd_witness_a_primary_cut_from_backup_and_witness_never_serves_and_is_fenced);

/// With etcd the drill's witness is etcd-w: with it down and the sites cut,
/// etcd-a and etcd-b are each a minority of one, so nobody may go live.
fn witness_down(lab: &Lab) {
    let it = &lab.drill("partition-and-witness-down", 1, 15)[0];
    assert_eq!(it["nobody_live_while_witness_down"], true, "{it}");
    assert_etcd_holder(lab, it);
}

with_each_witness!(witness_down:
    without_the_witness_nobody_goes_live_until_it_returns,
    etcd_witness_without_a_majority_nobody_goes_live_until_a_member_returns);

/// With etcd the drill's witness is etcd-w, one member of three: the pair
/// runs on, and nothing is claimed.
fn dead_witness_and_hiccup(lab: &Lab) {
    let mut last = serde_json::Value::Null;
    for scenario in ["kill-witness", "hiccup"] {
        let it = lab.drill(scenario, 1, 16).remove(0);
        assert_eq!(it["live_after"], it["primary_before"], "{scenario}: {it}");
        assert!(
            it["failover"].is_null(),
            "{scenario}: a failover happened: {it}"
        );
        last = it;
    }
    let a = lab.status(Site::A).unwrap();
    let b = lab.status(Site::B).unwrap();
    assert_eq!(
        (a["role"].as_str(), b["role"].as_str()),
        (Some("primary"), Some("backup"))
    );
    assert_eq!(a["epoch"], 1, "no epoch was claimed: {a}");
    assert_etcd_holder(lab, &last);
}

with_each_witness!(dead_witness_and_hiccup:
    a_dead_witness_and_a_short_hiccup_change_nothing,
    etcd_witness_a_dead_member_and_a_short_hiccup_change_nothing);
