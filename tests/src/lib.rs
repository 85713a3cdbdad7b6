//! Helpers shared by ftvm's end-to-end tests and the `bench` binary: locating
//! the built binaries, and writing benchmark tables into docs/BENCHMARKS.md.

pub mod ansible;
pub mod bench_drills;
pub mod bench_ftkv;
pub mod bench_machine;
pub mod bench_pair;
pub mod bench_witness;
pub mod etcd_lab;
pub mod lab;
pub mod report;
pub mod reprotect;
pub mod site;

use std::path::PathBuf;

/// The repository root (the workspace holding this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives one level below the repository root")
        .to_path_buf()
}

/// Path of a binary built by this workspace (`ftvm`, `ftvm-witness`) in the
/// same profile as the running test or bench executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` (or `cargo build --release --workspace` for bench)",
        path.display()
    );
    path
}

/// True when `/dev/kvm` can be opened; otherwise prints a SKIPPED line with the reason.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => skip(test, &format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// Where `cargo build` put the guest images (target/guest/.../release).
pub fn guest_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    // target/<profile>/ -> target/guest/x86_64-unknown-linux-gnu/release
    dir.pop();
    dir.join("guest/x86_64-unknown-linux-gnu/release")
}

/// Reports a test that cannot run here: a SKIPPED line with the reason, or,
/// when `FTVM_REQUIRE_ALL_TESTS=1` (CI sets it), a failure.
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var("FTVM_REQUIRE_ALL_TESTS").is_ok_and(|v| v == "1") {
        panic!("{test} cannot run: {why} (FTVM_REQUIRE_ALL_TESTS=1)");
    }
    println!("SKIPPED {test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
    false
}
