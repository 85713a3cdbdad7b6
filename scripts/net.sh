#!/usr/bin/env bash
# One command to give a guest a network on this machine.
#
#   scripts/net.sh up   [--netns NS]   create TAP ftvm0 with the host at 10.0.2.1/24
#   scripts/net.sh down [--netns NS]   remove it (and the namespace, if one was named)
#
# The guest (examples/ftkv.toml) is 10.0.2.15 on that TAP. With --netns, the
# TAP lives in network namespace NS (created if missing): run ftvm and the
# clients with `ip netns exec NS ...`. Needs root.
set -euo pipefail
TAP=${TAP:-ftvm0}
HOST_CIDR=${HOST_CIDR:-10.0.2.1/24}
cmd=${1:-}
ns=
if [ "${2:-}" = "--netns" ]; then ns=${3:?--netns needs a name}; fi
ipn() { if [ -n "$ns" ]; then ip -n "$ns" "$@"; else ip "$@"; fi; }

case "$cmd" in
  up)
    if [ -n "$ns" ] && ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
      ip -n "$ns" link set lo up
    fi
    ipn link show "$TAP" >/dev/null 2>&1 || ipn tuntap add dev "$TAP" mode tap
    ipn addr replace "$HOST_CIDR" dev "$TAP"
    ipn link set "$TAP" up
    echo "net: $TAP up with host ${HOST_CIDR}${ns:+ in netns $ns}; the guest is 10.0.2.15"
    ;;
  down)
    ipn link del "$TAP" 2>/dev/null || true
    if [ -n "$ns" ]; then ip netns del "$ns" 2>/dev/null || true; fi
    echo "net: $TAP removed${ns:+, netns $ns deleted}"
    ;;
  *)
    echo "usage: $0 up|down [--netns NS]" >&2
    exit 2
    ;;
esac
