//! Integration tests: the public API as the appliance and the `ftvm disk`
//! command use it.

use ftvm_storage::merkle::leaf_hash;
use ftvm_storage::{
    diff, run_disk, ChunkHashes, DiskCommand, DiskCommandOutcome, DiskImage, StorageError,
    DEFAULT_CHUNK_SIZE,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[test]
fn write_flush_reopen_sees_data_and_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut disk =
        DiskImage::create(&path, 3 * DEFAULT_CHUNK_SIZE + 4000, DEFAULT_CHUNK_SIZE).unwrap();
    let empty_root = disk.merkle_root();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    disk.write_at(60_000, &data).unwrap();
    disk.flush().unwrap();
    let root = disk.merkle_root();
    assert_ne!(root, empty_root);
    drop(disk);

    let disk = DiskImage::open(&path, DEFAULT_CHUNK_SIZE).unwrap();
    assert_eq!(disk.size(), 3 * DEFAULT_CHUNK_SIZE + 4000);
    assert_eq!(disk.chunk_count(), 4);
    assert_eq!(disk.chunk_len(3), 4000);
    assert_eq!(disk.merkle_root(), root);
    let mut back = vec![0u8; data.len()];
    disk.read_at(60_000, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn two_sites_sync_by_diff_in_one_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * 1024 * 1024;
    let mut primary = DiskImage::create(dir.path().join("a"), size, DEFAULT_CHUNK_SIZE).unwrap();
    let mut backup = DiskImage::create(dir.path().join("b"), size, DEFAULT_CHUNK_SIZE).unwrap();
    primary.write_at(12345, &[1u8; 70_000]).unwrap();
    primary.write_at(size - 10, &[2u8; 10]).unwrap();
    backup.write_at(1_000_000, &[3u8; 5]).unwrap();

    // The backup sends its encoded hashes; the primary decodes and diffs.
    let wire = backup.chunk_hashes().encode();
    let theirs = ChunkHashes::decode(&wire).unwrap();
    let ranges = diff(&primary.chunk_hashes(), &theirs).unwrap();
    assert_eq!(ranges, vec![0..2, 15..16, 31..32]);
    for index in ranges.iter().flat_map(|r| r.clone()) {
        let chunk = primary.read_chunk(index).unwrap();
        assert_eq!(
            &leaf_hash(index, &chunk),
            primary.chunk_hashes().get(index).unwrap()
        );
        backup.write_chunk(index, &chunk).unwrap();
    }
    backup.flush().unwrap();
    assert_eq!(backup.merkle_root(), primary.merkle_root());
}

/// Mounts a small tmpfs for the life of the value (needs root; tests that
/// use it skip themselves when mounting is not allowed).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(SmallFs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn full_file_system_surfaces_as_an_error() {
    let Some(fs) = SmallFs::mount(1024 * 1024) else {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    let path: PathBuf = fs.path().join("disk.img");
    // An 8 MiB sparse image on a 1 MiB file system.
    let mut disk = DiskImage::create(&path, 8 * 1024 * 1024, DEFAULT_CHUNK_SIZE).unwrap();
    let data = vec![0xabu8; 2 * 1024 * 1024];
    let err = disk.write_at(0, &data).unwrap_err();
    assert!(err.is_disk_full(), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("disk.img") && text.contains("write"),
        "{text}"
    );
    // The hashes still describe what the file holds after the partial write.
    let root = disk.merkle_root();
    assert_eq!(root, disk.chunk_hashes().merkle_root());
    drop(disk);
    let reopened = DiskImage::open(&path, DEFAULT_CHUNK_SIZE).unwrap();
    assert_eq!(reopened.merkle_root(), root);
}

#[test]
fn cli_diff_outcome_maps_to_cmp_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let mut out = Vec::new();
    for p in [&a, &b] {
        let cmd = DiskCommand::Create {
            path: p.clone(),
            size: "256K".into(),
            chunk_size: DEFAULT_CHUNK_SIZE,
        };
        assert_eq!(
            run_disk(&cmd, &mut out).unwrap(),
            DiskCommandOutcome::Success
        );
    }
    let cmd = DiskCommand::Diff {
        a: a.clone(),
        b: b.clone(),
        chunk_size: DEFAULT_CHUNK_SIZE,
    };
    assert_eq!(run_disk(&cmd, &mut out).unwrap().exit_code(), 0);
    let mut disk = DiskImage::open(&b, DEFAULT_CHUNK_SIZE).unwrap();
    disk.write_at(200_000, b"hello").unwrap();
    disk.flush().unwrap();
    let mut out = Vec::new();
    assert_eq!(run_disk(&cmd, &mut out).unwrap().exit_code(), 1);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "chunks 3..4 bytes 196608..262144\ndiffers: 1 chunks (65536 bytes) in 1 ranges\n"
    );
    // Different sizes differ too, and say so.
    let c = dir.path().join("c.img");
    DiskImage::create(&c, 128 * 1024, DEFAULT_CHUNK_SIZE).unwrap();
    let mut out = Vec::new();
    let cmd = DiskCommand::Diff {
        a,
        b: c,
        chunk_size: DEFAULT_CHUNK_SIZE,
    };
    assert_eq!(
        run_disk(&cmd, &mut out).unwrap(),
        DiskCommandOutcome::Differs
    );
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("size differs: 262144 vs 131072 bytes\n"),
        "{text}"
    );
    assert!(
        text.contains("chunks 2..4 bytes 131072..262144\n"),
        "{text}"
    );
}

#[test]
fn errors_name_the_file_and_operation() {
    let err = DiskImage::open("/nonexistent/dir/disk.img", DEFAULT_CHUNK_SIZE).unwrap_err();
    assert!(matches!(err, StorageError::Io { op: "open", .. }));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/dir/disk.img: open: "),
        "{err}"
    );
}

#[test]
fn hashing_on_open_is_fast() {
    // Not a strict benchmark: reports the rate and fails only if absurdly slow.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    let size = 256 * 1024 * 1024;
    let mut disk = DiskImage::create(&path, size, DEFAULT_CHUNK_SIZE).unwrap();
    let block = vec![0x5au8; 1024 * 1024];
    for i in 0..size / block.len() as u64 {
        disk.write_at(i * block.len() as u64, &block).unwrap();
    }
    let root = disk.merkle_root();
    drop(disk);
    let start = Instant::now();
    let disk = DiskImage::open(&path, DEFAULT_CHUNK_SIZE).unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "hashed {} MiB on open in {secs:.3} s ({:.0} MiB/s)",
        size >> 20,
        (size >> 20) as f64 / secs
    );
    assert_eq!(disk.merkle_root(), root);
    assert!(secs < 30.0, "open took {secs} s");
}

#[test]
fn written_chunks_are_tracked_only_while_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = ftvm_storage::DiskImage::create(dir.path().join("d.img"), 1 << 20, 4096).unwrap();
    let w = d.written_chunks();
    d.write_at(0, &[1; 10]).unwrap();
    assert!(w.take().is_empty(), "nothing tracked before start");
    w.start();
    d.write_at(4090, &[2; 10]).unwrap(); // chunks 0 and 1
    d.write_at(40960, &[3; 1]).unwrap(); // chunk 10
    assert_eq!(w.take(), vec![0, 1, 10]);
    assert!(w.take().is_empty());
    w.stop();
    d.write_at(0, &[4; 1]).unwrap();
    assert!(w.take().is_empty());
}

#[test]
fn group_hashes_find_the_group_that_differs() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = ftvm_storage::DiskImage::create(dir.path().join("a.img"), 1 << 20, 4096).unwrap();
    let b = ftvm_storage::DiskImage::create(dir.path().join("b.img"), 1 << 20, 4096).unwrap();
    a.write_at(100 * 4096, &[9; 4096]).unwrap();
    let (ga, gb) = (
        a.chunk_hashes().group_hashes(64),
        b.chunk_hashes().group_hashes(64),
    );
    assert_eq!(ga.len(), 4);
    let differ: Vec<usize> = (0..4).filter(|&i| ga[i] != gb[i]).collect();
    assert_eq!(differ, vec![1]);
}
