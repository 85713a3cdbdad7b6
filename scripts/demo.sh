#!/usr/bin/env bash
# The local demo (README quick start). Needs root and /dev/kvm.
#
# A fault-tolerant pair in a three-site lab on this machine (scripts/lab.sh):
# site A and site B, each a network namespace with a KVM VM running ftkv (a
# Redis-compatible server), a witness site, a client LAN stretched to both
# sites, and a WAN relay adding 5 ms each way between the sites.
#
# 1. starts the witness, the primary on site A and the backup on site B;
# 2. drives the primary's guest with real redis-cli and redis-benchmark;
# 3. prints both sites' status: the backup replays, zero divergences;
# 4. stops the pair cleanly: the backup stops at the same exit, and the
#    two disks have the same Merkle root;
# 5. runs a failover drill: a fresh pair, a write load of real Redis
#    clients, SIGKILL of the primary, and a report of what clients saw.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace
export FTVM_BIN_DIR=$PWD/target/release
FTVM=$FTVM_BIN_DIR/ftvm
P=ftvm-demo
OUT=demo-out/lab
lab() { ./scripts/lab.sh "$1" --prefix "$P" --dir "$OUT" "${@:2}"; }
cleanup() { lab down >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
rm -rf "$OUT" demo-out/drill
mkdir -p demo-out
lab up --delay-ms 5

role_of() { lab status "$1" 2>/dev/null | sed -n 's/.*"role":"\([a-z-]*\)".*/\1/p'; }
wait_for() { # wait_for WHAT COMMAND...
  local what=$1; shift
  for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "demo: FAILED waiting for $what (logs in $OUT/)" >&2
  exit 1
}
is_backup() { [ "$(role_of b)" = backup ]; }
pong() { ip netns exec "$P-c" redis-cli -h 10.0.2.15 PING | grep -q PONG; }

echo
echo "== 1. the witness, the primary on site A, the backup on site B"
lab start witness
sleep 0.5
lab start a -- --primary
lab start b
wait_for "the backup to pair" is_backup
wait_for "ftkv to answer" pong
echo "paired: A is $(role_of a), B is $(role_of b)"

echo
echo "== 2. real Redis clients on the client LAN, through the primary"
cli() { echo "\$ redis-cli $*"; ip netns exec "$P-c" redis-cli -h 10.0.2.15 "$@"; }
cli PING
cli SET greeting "hello from a fault-tolerant VM"
cli GET greeting
cli INCR visits
cli MSET a 1 b 2
cli MGET a b
echo "\$ redis-benchmark -t set,get -n 20000 -c 20 -q"
ip netns exec "$P-c" redis-benchmark -h 10.0.2.15 -t set,get -n 20000 -c 20 -q \
  | tr '\r' '\n' | grep 'requests per second'

echo
echo "== 3. both sites' status"
sleep 1
ip netns exec "$P-a" "$FTVM" status --config "$OUT/node-a.toml"
ip netns exec "$P-b" "$FTVM" status --config "$OUT/node-b.toml"
lab status b | grep -q '"divergence":null' || { echo "demo: FAILED: the backup diverged" >&2; exit 1; }

echo
echo "== 4. a clean stop: the primary ends its log, the backup stops at the same exit"
lab kill a TERM
wait_for "the backup to reach the end of the log" grep -q '^replay: OK' "$OUT/node-b.out"
lab kill b TERM
grep -E '^(record|disk):' "$OUT/node-a.out" | sed 's/^/site A: /'
grep -E '^(replay|disk):' "$OUT/node-b.out" | sed 's/^/site B: /'
root_a=$("$FTVM" disk hash "$OUT/node-a.img" | head -1)
root_b=$("$FTVM" disk hash "$OUT/node-b.img" | head -1)
echo "site A disk: $root_a"
echo "site B disk: $root_b"
[ "$root_a" = "$root_b" ] || { echo "demo: FAILED: the disks differ" >&2; exit 1; }

echo
echo "== 5. a failover drill: SIGKILL the primary under a write load"
lab kill witness
"$FTVM" drill --targets "$OUT/drill.toml" --scenario kill-primary --out demo-out/drill
echo
echo "demo: OK (the backup replayed to the same state, the disks match, and a failover lost nothing)"
echo "demo: logs and configs in $OUT/, the drill's report and plot in demo-out/drill/"
