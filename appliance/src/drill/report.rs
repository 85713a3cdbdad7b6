//! Drill reports an operator can read: per iteration a JSON file, an SVG
//! plot of every client request's latency around the fault (with the fault,
//! the detection, the witness's grant and go-live marked), and one Markdown
//! summary of all iterations.

use super::Iteration;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

fn json_of(it: &Iteration) -> serde_json::Value {
    let mut v = serde_json::to_value(it).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        let answered: Vec<f64> = it
            .latencies
            .iter()
            .filter(|(_, _, ok)| *ok)
            .map(|(_, l, _)| *l)
            .collect();
        o.insert("requests".into(), serde_json::json!(it.latencies.len()));
        o.insert(
            "requests_answered".into(),
            serde_json::json!(answered.len()),
        );
    }
    v
}

/// Writes `iteration-N.json` and `iteration-N.svg` into `dir`.
pub fn write_iteration(dir: &Path, it: &Iteration) -> Result<()> {
    let base = dir.join(format!("{}-{}", it.scenario, it.iteration));
    let json = serde_json::to_string_pretty(&json_of(it))?;
    std::fs::write(base.with_extension("json"), json)
        .with_context(|| format!("writing {}", base.display()))?;
    plot(&base.with_extension("svg"), it)?;
    Ok(())
}

/// Milestones of a failover, seconds after the fault.
fn marks(it: &Iteration) -> Vec<(&'static str, f64, RGBColor)> {
    let mut m = vec![("fault", 0.0, RED)];
    let f = |k: &str| {
        it.failover
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(|x| x.as_f64())
    };
    // The detector fires failure_timeout after the last word from the peer.
    if let (Some(live), Some(d2l)) = (it.fault_to_live_ms, f("detection_to_live_ms")) {
        let detect = (live - d2l).max(0.0) / 1e3;
        m.push(("detection", detect, MAGENTA));
        if let Some(d2g) = f("detection_to_grant_ms") {
            m.push(("witness grant", detect + d2g / 1e3, BLUE));
        }
        m.push(("go-live", live / 1e3, GREEN));
    } else if let Some(live) = it.fault_to_live_ms {
        m.push(("new roles", live / 1e3, GREEN));
    }
    m
}

fn plot(path: &Path, it: &Iteration) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (x0, x1) = it
        .latencies
        .iter()
        .fold((0.0f64, 1.0f64), |(a, b), (t, _, _)| (a.min(*t), b.max(*t)));
    let ymax = it
        .latencies
        .iter()
        .map(|(_, l, _)| *l)
        .fold(10.0f64, f64::max)
        * 1.1;
    let title = format!(
        "{} #{} (WAN one-way delay {} ms): client request latency",
        it.scenario, it.iteration, it.wan_delay_ms
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (0.5f64..ymax).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the fault")
        .y_desc("latency (ms, log)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(
            it.latencies
                .iter()
                .filter(|(_, _, ok)| *ok)
                .map(|(t, l, _)| Circle::new((*t, l.max(0.5)), 2, BLACK.mix(0.5).filled())),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("answered request")
        .legend(|(x, y)| Circle::new((x, y), 3, BLACK.filled()));
    for (name, at, color) in marks(it) {
        chart
            .draw_series(LineSeries::new(
                vec![(at, 0.5), (at, ymax)],
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

/// The Markdown summary of a drill (`summary.md`) and all iterations in
/// one JSON file (`report.json`).
pub fn write_summary(dir: &Path, all: &[Iteration]) -> Result<()> {
    let json: Vec<serde_json::Value> = all.iter().map(json_of).collect();
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let mut md = String::new();
    let passed = all.iter().filter(|i| i.passed).count();
    let _ = writeln!(md, "# Drill report\n");
    if let Some(first) = all.first() {
        let _ = writeln!(
            md,
            "Scenario **{}**, {} iteration(s), WAN one-way delay {} ms: **{passed} passed, {} failed**.\n",
            first.scenario,
            all.len(),
            first.wan_delay_ms,
            all.len() - passed
        );
    }
    let _ = writeln!(
        md,
        "| # | primary before | live after | fault → first reply (ms) | fault → live (ms) | worst pause (ms) | writes acked | lost | linearizable | broken conns | two-live frames | result |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for i in all {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i.iteration,
            i.primary_before.key(),
            i.live_after.map_or("none", |s| s.key()),
            opt(i.first_reply_after_fault_ms),
            opt(i.fault_to_live_ms),
            opt(i.worst_latency_after_fault_ms),
            i.writes_acknowledged,
            i.writes_lost,
            if i.linearizable == "linearizable" {
                "yes"
            } else {
                &i.linearizable
            },
            i.connections_broken,
            i.two_live_moments.map_or("-".into(), |n| n.to_string()),
            if i.passed {
                "PASS".to_string()
            } else {
                format!("FAIL: {}", i.problems.join("; "))
            }
        );
    }
    let mut times: Vec<f64> = all
        .iter()
        .filter_map(|i| i.first_reply_after_fault_ms)
        .collect();
    if !times.is_empty() {
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        let _ = writeln!(
            md,
            "\nFault to first successful reply: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} iteration(s).",
            pct(0.5),
            pct(0.99),
            times[times.len() - 1],
            times.len()
        );
    }
    let joins: Vec<&serde_json::Value> = all.iter().filter_map(|i| i.reprotect.as_ref()).collect();
    if !joins.is_empty() {
        let _ = writeln!(
            md,
            "\n| # | disk bytes copied | chunks differing | memory bytes copied | pre-copy rounds | cut-over pause (ms) |\n|---|---|---|---|---|---|"
        );
        for i in all {
            if let Some(r) = &i.reprotect {
                let n = |k: &str| r.get(k).map_or("-".into(), |x| x.to_string());
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    i.iteration,
                    n("disk_bytes_copied"),
                    n("disk_chunks_differing"),
                    n("memory_bytes_copied"),
                    n("round"),
                    n("last_pause_ms")
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nEach iteration has `<scenario>-<n>.json` (all numbers) and `<scenario>-<n>.svg` (client latency around the fault, with fault, detection, witness grant and go-live marked)."
    );
    std::fs::write(dir.join("summary.md"), md)?;
    Ok(())
}
