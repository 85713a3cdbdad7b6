#!/usr/bin/env bash
# The local demo (README quick start). Needs root and /dev/kvm.
#
# 1. Records the demo guest and replays it: the replay must end in the same state.
# 2. Boots ftkv, the reference guest (a Redis-compatible server), in a VM
#    whose network card is a TAP device in the namespace `ftvm-demo`, records
#    it while the real `redis-cli` and `redis-benchmark` talk to it, stops it,
#    and replays the recording against a copy of the starting disk: same
#    final state digest, same disk Merkle root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace
FTVM=$PWD/target/release/ftvm
OUT=demo-out
NS=ftvm-demo
mkdir -p "$OUT"

echo "== 1. record and replay the demo guest"
"$FTVM" demo --dir "$OUT"

echo
echo "== 2. ftkv in a VM, with real Redis clients"
cleanup() {
  [ -n "${VM:-}" ] && kill -9 "$VM" 2>/dev/null || true
  ./scripts/net.sh down --netns "$NS" >/dev/null
}
trap cleanup EXIT
./scripts/net.sh up --netns "$NS"
rm -f "$OUT/ftkv.img" "$OUT/ftkv-start.img" "$OUT/ftkv-replay.img" "$OUT/ftkv.ftlog"
"$FTVM" disk create "$OUT/ftkv.img" --size 64M >/dev/null
cp --sparse=always "$OUT/ftkv.img" "$OUT/ftkv-start.img"
ip netns exec "$NS" "$FTVM" record --config examples/ftkv.toml --log "$OUT/ftkv.ftlog" \
  >"$OUT/ftkv-record.out" 2>"$OUT/ftkv-record.err" &
VM=$!
for _ in $(seq 100); do
  ip netns exec "$NS" redis-cli -h 10.0.2.15 PING 2>/dev/null | grep -q PONG && break
  sleep 0.2
done
cli() { echo "\$ redis-cli $*"; ip netns exec "$NS" redis-cli -h 10.0.2.15 "$@"; }
cli PING
cli SET greeting "hello from a recorded VM"
cli GET greeting
cli INCR visits
cli MSET a 1 b 2
cli MGET a b
echo "\$ redis-benchmark -t set,get -n 20000 -c 50 -q"
ip netns exec "$NS" redis-benchmark -h 10.0.2.15 -t set,get -n 20000 -c 50 -q \
  | tr '\r' '\n' | grep 'requests per second' 
kill -TERM "$VM"; wait "$VM"; VM=
grep -E '^(record|disk):' "$OUT/ftkv-record.out"

echo
echo "== 3. replay ftkv's recording on a copy of the starting disk"
cp --sparse=always "$OUT/ftkv-start.img" "$OUT/ftkv-replay.img"
"$FTVM" replay --config examples/ftkv.toml --log "$OUT/ftkv.ftlog" --disk "$OUT/ftkv-replay.img" | tee "$OUT/ftkv-replay.out"
rec_root=$(grep '^disk:' "$OUT/ftkv-record.out")
rep_root=$(grep '^disk:' "$OUT/ftkv-replay.out")
if grep -q '^replay: OK' "$OUT/ftkv-replay.out" && [ "$rec_root" = "$rep_root" ]; then
  echo "demo: OK (replayed to the same state digest and the same disk root)"
else
  echo "demo: FAILED (see $OUT/)" >&2
  exit 1
fi
