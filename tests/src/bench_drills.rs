//! Drill benchmarks in the three-site lab, with the product's default
//! `failure_timeout` (2 s) and real Redis clients on long-lived
//! connections: `failover` (repeated `kill-primary` drills at 0 and 20 ms
//! one-way delay) and `reprotect` (repeated `rejoin` and `switchover`
//! drills at both delays, and the disk resync of a 1 GiB image with 10 MiB
//! changed). Every number comes from the drills' own reports.

use crate::lab::Lab;
use crate::report::{quantile, Table};
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

/// The product's default failure timeout, ms.
const FAILURE_TIMEOUT_MS: u64 = 2000;
const DELAYS_MS: [u64; 2] = [0, 20];

fn p50_p99(v: &[f64]) -> String {
    format!("{:.0} / {:.0}", quantile(v, 0.5), quantile(v, 0.99))
}

fn numbers(all: &[Value], pointer: &str) -> Vec<f64> {
    all.iter()
        .filter_map(|it| it.pointer(pointer).and_then(Value::as_f64))
        .collect()
}

fn sum(all: &[Value], key: &str) -> u64 {
    all.iter().filter_map(|it| it[key].as_u64()).sum()
}

/// A lab at `delay_ms` with the default failure timeout.
fn lab(delay_ms: u64) -> Result<Lab> {
    let lab = Lab::up(delay_ms)?;
    lab.set_failure_timeout(FAILURE_TIMEOUT_MS)?;
    Ok(lab)
}

/// Lost writes, broken connections and two-live frames over `all`, and
/// how many iterations passed.
fn safety_cells(all: &[Value]) -> Vec<String> {
    vec![
        format!(
            "{}/{}",
            all.iter().filter(|it| it["passed"] == true).count(),
            all.len()
        ),
        sum(all, "writes_acknowledged").to_string(),
        sum(all, "writes_lost").to_string(),
        sum(all, "connections_broken").to_string(),
        sum(all, "two_live_moments").to_string(),
    ]
}

/// `bench failover`: `kill-primary` drills (20 per delay; 3 with --quick).
pub fn failover(_bin_dir: &Path, quick: bool) -> Result<String> {
    let repeat = if quick { 3 } else { 20 };
    let mut t = Table::new(&[
        "one-way delay",
        "passed",
        "writes acked",
        "lost",
        "broken conns",
        "two-live frames",
        "fault → first reply p50 / p99 (ms)",
        "fault → live p50 / p99 (ms)",
        "worst client pause p50 / p99 (ms)",
    ]);
    for delay in DELAYS_MS {
        let all = lab(delay)?.run_drill("kill-primary", repeat, 100 + delay, 6)?;
        let mut row = vec![format!("{delay} ms")];
        row.extend(safety_cells(&all));
        row.push(p50_p99(&numbers(&all, "/first_reply_after_fault_ms")));
        row.push(p50_p99(&numbers(&all, "/fault_to_live_ms")));
        row.push(p50_p99(&numbers(&all, "/worst_latency_after_fault_ms")));
        t.row(row);
    }
    Ok(format!(
        "## Failover drills\n\n\
         `kill-primary` drills in the lab (`ftvm drill`), {repeat} per delay, \
         failure_timeout {FAILURE_TIMEOUT_MS} ms, 6 Redis clients writing and \
         reading on long-lived connections, every history checked for \
         linearizability. Goal: fault → first reply ≤ failure_timeout + 300 ms at \
         p99; 0 lost writes, 0 broken connections, 0 two-live frames. Both sites, \
         the witness, the relay and the clients share this machine's cores.\n\n{}",
        t.to_markdown()
    ))
}

/// `bench reprotect`: `rejoin` and `switchover` drills at both delays, and
/// the disk resync.
pub fn reprotect(_bin_dir: &Path, quick: bool) -> Result<String> {
    let (joins, switches) = if quick { (1, 2) } else { (5, 10) };
    let mut drills = Table::new(&[
        "one-way delay",
        "drill",
        "passed",
        "writes acked",
        "lost",
        "broken conns",
        "two-live frames",
        "pause p50 / p99 (ms)",
        "other",
    ]);
    for delay in DELAYS_MS {
        let lab = lab(delay)?;
        let all = lab.run_drill("rejoin", joins, 200 + delay, 6)?;
        let mut row = vec![format!("{delay} ms"), "rejoin".into()];
        row.extend(safety_cells(&all));
        row.push(format!(
            "{} (cut-over)",
            p50_p99(&numbers(&all, "/reprotect/last_pause_ms"))
        ));
        row.push(format!(
            "join → protected p50 {:.1} s; memory sent p50 {:.1} MB, disk sent p50 {:.2} MB",
            quantile(&numbers(&all, "/reprotect/join_to_protected_ms"), 0.5) / 1e3,
            quantile(&numbers(&all, "/reprotect/memory_bytes_copied"), 0.5) / 1e6,
            quantile(&numbers(&all, "/reprotect/disk_bytes_copied"), 0.5) / 1e6,
        ));
        drills.row(row);
        let all = lab.run_drill("switchover", switches, 300 + delay, 6)?;
        let mut row = vec![format!("{delay} ms"), "switchover".into()];
        row.extend(safety_cells(&all));
        row.push(format!(
            "{} (worst client request)",
            p50_p99(&numbers(&all, "/worst_latency_after_fault_ms"))
        ));
        row.push(format!(
            "asked → new primary p50 / p99 {} ms",
            p50_p99(&numbers(&all, "/fault_to_live_ms"))
        ));
        drills.row(row);
    }
    let mut lab = lab(0)?;
    let r = crate::reprotect::resync(&mut lab, "1G", 10)?;
    let mut resync = Table::new(&[
        "disk",
        "written while the backup was away",
        "changed chunks (MB)",
        "disk sent (MB)",
        "sent / changed",
        "memory sent (MB)",
        "restart → protected (s)",
        "cut-over pause (ms)",
    ]);
    resync.row(vec![
        "1 GiB".into(),
        "10 MiB (160 × 64 KiB SET)".into(),
        format!("{:.2}", r.changed_bytes as f64 / 1e6),
        format!("{:.2}", r.disk_bytes_sent as f64 / 1e6),
        format!(
            "{:.2}",
            r.disk_bytes_sent as f64 / r.changed_bytes.max(1) as f64
        ),
        format!("{:.1}", r.memory_bytes_sent as f64 / 1e6),
        format!("{:.1}", r.join_ms / 1e3),
        format!("{:.1}", r.pause_ms),
    ]);
    Ok(format!(
        "## Re-protection and switchover\n\n\
         Drills in the lab (`ftvm drill --scenario rejoin|switchover`), guest \
         memory 1 GiB, 6 Redis clients writing throughout, failure_timeout \
         {FAILURE_TIMEOUT_MS} ms. `rejoin`: kill the primary, fail over, restart \
         the killed node with `--join`; its pause is the survivor's vCPU stop at \
         the cut-over. `switchover`: `ftvm switchover` on the primary; its pause \
         is the worst latency of any client request answered after it was asked \
         (goals: cut-over < 200 ms, switchover < 300 ms at 0 ms). Memory sent \
         counts non-zero pages only (a zero page travels as an empty message).\n\n{}\n\
         Disk resync with `ft.reprotect = \"auto\"` (goal: sent / changed ≤ 2):\n\n{}",
        drills.to_markdown(),
        resync.to_markdown()
    ))
}
