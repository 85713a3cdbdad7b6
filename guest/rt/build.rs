//! Makes `rt/link.ld` visible to the linker of every binary that uses this
//! crate: it is copied into OUT_DIR, which is put on the library search path
//! (propagated to dependents), and `.cargo/config.toml` passes
//! `-Tftvm-guest.ld`, which GNU ld resolves through that search path.

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let script =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo")).join("link.ld");
    fs::copy(&script, out.join("ftvm-guest.ld"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", script.display()));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
