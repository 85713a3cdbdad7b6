//! The disk-resync scenario of re-protection, shared by its test and by
//! `bench reprotect`: with `ft.reprotect = "auto"` on both nodes and fresh
//! disks of `disk_size`, the backup goes away, `written_mib` MiB are written
//! through Redis, the backup restarts (no `--join`) and the survivor takes
//! it back; the pair then stops cleanly and the disks are compared.

use crate::lab::{Lab, Site};
use anyhow::{bail, ensure, Context, Result};
use ftvm_storage::{merkle, DiskImage};
use std::path::Path;
use std::time::Instant;

/// The lab's disk chunk size (the config's default).
pub const CHUNK: u64 = 65536;

/// What one resync measured.
#[derive(Debug, Clone)]
pub struct Resync {
    /// Disk bytes the survivor sent.
    pub disk_bytes_sent: u64,
    /// Bytes in the chunks where the backup's disk, when it left, differs
    /// from the primary's at the end.
    pub changed_bytes: u64,
    pub memory_bytes_sent: u64,
    /// From starting the returning node to a protected pair.
    pub join_ms: f64,
    /// The survivor's vCPU pause at the cut-over.
    pub pause_ms: f64,
}

/// Runs `ftvm`; its stdout, or why it failed.
fn ftvm(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(crate::bin("ftvm"))
        .args(args)
        .output()?;
    ensure!(out.status.success(), "ftvm {args:?}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces `img` with a new, empty image of `size` (e.g. "1G").
pub fn fresh_disk(img: &Path, size: &str) -> Result<()> {
    let _ = std::fs::remove_file(img);
    ftvm(&[
        "disk",
        "create",
        img.to_str().context("path")?,
        "--size",
        size,
    ])?;
    Ok(())
}

/// The image's Merkle root, as `ftvm disk hash` prints it.
pub fn disk_root(img: &Path) -> Result<String> {
    Ok(ftvm(&["disk", "hash", img.to_str().context("path")?])?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Bytes in the chunks where images `a` and `b` differ.
pub fn changed_bytes(a: &Path, b: &Path) -> Result<u64> {
    let a = DiskImage::open_read_only(a, CHUNK)?;
    let b = DiskImage::open_read_only(b, CHUNK)?;
    Ok(merkle::diff(&a.chunk_hashes(), &b.chunk_hashes())?
        .iter()
        .map(|r| (r.end - r.start) * CHUNK)
        .sum())
}

/// The scenario in a lab that is up and has no nodes running. Leaves both
/// nodes stopped, with equal disk roots checked.
pub fn resync(lab: &mut Lab, disk_size: &str, written_mib: usize) -> Result<Resync> {
    let (img_a, img_b) = (lab.dir.join("node-a.img"), lab.dir.join("node-b.img"));
    fresh_disk(&img_a, disk_size)?;
    std::fs::copy(&img_a, &img_b)?;
    for s in [Site::A, Site::B] {
        lab.set_ft(s, "reprotect", "\"auto\"")?;
    }
    lab.start_pair()?;
    lab.stop_node(Site::B, libc::SIGKILL)?;
    lab.wait_status(Site::A, "the primary to go solo", |v| v["role"] == "solo")?;
    let stale = lab.dir.join("stale-b.img");
    std::fs::copy(&img_b, &stale)?;
    let value = "v".repeat(64 * 1024);
    for i in 0..written_mib * 16 {
        let answer = lab.cli(&["SET", &format!("big{i}"), &value])?;
        ensure!(answer == "OK", "SET big{i}: {answer}");
    }

    let started = Instant::now();
    lab.start_node(Site::B, &[])?;
    let a = lab.wait_status(Site::A, "the survivor to be protected again", |v| {
        v["role"] == "primary" && v["reprotect"]["joins_completed"].as_u64() >= Some(1)
    })?;
    lab.wait_status(Site::B, "the backup role", |v| v["role"] == "backup")?;
    let join_ms = started.elapsed().as_secs_f64() * 1e3;
    let last = format!("big{}", written_mib * 16 - 1);
    ensure!(lab.cli(&["GET", &last])? == value, "{last} lost");
    let r = &a["reprotect"];

    ensure!(
        lab.stop_node(Site::A, libc::SIGTERM)? == Some(0),
        "primary stop"
    );
    ensure!(lab.wait_node(Site::B)? == Some(0), "backup stop");
    let (ra, rb) = (disk_root(&img_a)?, disk_root(&img_b)?);
    if ra != rb {
        bail!("the disks differ after the clean stop: {ra} vs {rb}");
    }
    Ok(Resync {
        disk_bytes_sent: r["disk_bytes_copied"]
            .as_u64()
            .context("disk_bytes_copied")?,
        changed_bytes: changed_bytes(&stale, &img_a)?,
        memory_bytes_sent: r["memory_bytes_copied"].as_u64().unwrap_or(0),
        join_ms,
        pause_ms: r["last_pause_ms"].as_f64().unwrap_or(f64::NAN),
    })
}
