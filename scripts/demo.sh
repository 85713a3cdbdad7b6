#!/usr/bin/env bash
# The local demo: builds ftvm (release) and runs `ftvm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace
exec ./target/release/ftvm demo "$@"
