#!/usr/bin/env bash
# Runs every test: unit, integration and end-to-end (real KVM, real TAP
# devices in network namespaces, real redis clients, real QUIC on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --workspace
