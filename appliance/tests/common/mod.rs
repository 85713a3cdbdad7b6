//! What the appliance's integration tests share.

use std::path::PathBuf;

/// The demo guest, as appliance/build.rs built it.
pub fn demo_image() -> PathBuf {
    PathBuf::from(env!("FTVM_GUEST_DIR")).join("demo")
}

/// Whether /dev/kvm opens; prints SKIPPED (or, under
/// FTVM_REQUIRE_ALL_TESTS=1, fails) when it does not.
pub fn kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            // CI sets FTVM_REQUIRE_ALL_TESTS=1: there a missing /dev/kvm is a failure.
            assert!(
                std::env::var("FTVM_REQUIRE_ALL_TESTS").map_or(true, |v| v != "1"),
                "/dev/kvm cannot be opened ({e}) and FTVM_REQUIRE_ALL_TESTS=1"
            );
            println!("SKIPPED {test}: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}
