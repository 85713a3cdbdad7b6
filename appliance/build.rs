//! Builds the guest workspace (`guest/`) whenever the appliance builds, so a
//! plain `cargo build` / `cargo test` also produces the guest ELF images.
//!
//! The guest is its own workspace, built by a nested `cargo build --release`
//! run from `guest/` (so `guest/.cargo/config.toml` applies: freestanding
//! rustflags, target triple) into `<target>/guest`. The images' directory is
//! exported as `FTVM_GUEST_DIR` (`env!("FTVM_GUEST_DIR")`), e.g.
//! `<target>/guest/x86_64-unknown-linux-gnu/release/demo`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir
        .parent()
        .expect("appliance/ has a parent")
        .join("guest");
    let target_dir = main_target_dir();
    let guest_target = target_dir.join("guest");
    let images = guest_target.join(GUEST_TRIPLE).join("release");

    track_guest_sources(&guest_dir);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--target-dir")
        .arg(&guest_target);
    // Cargo hands build scripts its configuration through the environment
    // (CARGO_ENCODED_RUSTFLAGS, CARGO_BUILD_*, CARGO_PROFILE_*, RUSTC,
    // wrappers for clippy/coverage, ...). Those describe the host build and
    // would override guest/.cargo/config.toml, so the nested cargo starts
    // clean. Kept: where cargo's home and registry cache are, and network
    // settings, which the user chose for both builds.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let keep =
            key == "CARGO_HOME" || key.starts_with("CARGO_NET_") || key.starts_with("CARGO_HTTP_");
        let drop = (key.starts_with("CARGO") && !keep)
            || key.starts_with("__CARGO")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC"
                    | "RUSTDOC"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTC_LINKER"
            );
        if drop {
            cmd.env_remove(key);
        }
    }

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run cargo to build the guest workspace: {e}"));
    if !output.status.success() {
        panic!(
            "building the guest workspace failed ({}): cd {} && cargo build --release --target-dir {}\n{}",
            output.status,
            guest_dir.display(),
            guest_target.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("cargo:rustc-env=FTVM_GUEST_DIR={}", images.display());
}

/// The main workspace's target directory: `CARGO_TARGET_DIR` if it is an
/// absolute path, else the ancestor of OUT_DIR that cargo marked with
/// `CACHEDIR.TAG` (OUT_DIR is `<target>[/<triple>]/<profile>/build/<pkg>/out`),
/// else `OUT_DIR/../../../..`.
fn main_target_dir() -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    if let Some(tagged) = out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
    {
        return tagged.to_path_buf();
    }
    out_dir
        .ancestors()
        .nth(4)
        .expect("OUT_DIR is <target>/<profile>/build/<pkg>/out")
        .to_path_buf()
}

/// Reruns this script when anything in guest/ changes, except build output.
/// Directories are watched whole (cargo scans them for changed files).
fn track_guest_sources(guest_dir: &Path) {
    let entries =
        fs::read_dir(guest_dir).unwrap_or_else(|e| panic!("reading {}: {e}", guest_dir.display()));
    for entry in entries.flatten() {
        if entry.file_name() == "target" {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
