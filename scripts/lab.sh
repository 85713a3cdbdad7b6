#!/usr/bin/env bash
# A three-site lab on one machine (needs root): site A, site B, the witness
# site and a client, each a network namespace; a WAN relay between the
# sites (tests/src/bin/wan-relay.rs: delay, jitter, loss, partitions).
#
#   scripts/lab.sh up    [--prefix P] [--dir D] [--delay-ms N] [--witness ftvm|etcd] [--hosts]
#   scripts/lab.sh down  [--prefix P] [--dir D]
#   scripts/lab.sh relay [--prefix P] [--dir D] -- (set|block|unblock) ROUTE|all [fwd|rev|both] [delay=MS jitter=MS loss=P] | status
#   scripts/lab.sh exec  [--prefix P] a|b|w|c|wan -- COMMAND...
#   scripts/lab.sh start [--prefix P] [--dir D] witness|a|b|etcd-a|etcd-b|etcd-w [-- ARGS...]   (e.g. a -- --primary)
#   scripts/lab.sh kill  [--prefix P] [--dir D] witness|a|b|etcd-a|etcd-b|etcd-w [SIGNAL]   (KILL: returns at once)
#   scripts/lab.sh status [--prefix P] [--dir D] a|b      (the node's /status JSON)
#   scripts/lab.sh switchover [--prefix P] [--dir D] a|b  (asks that node, the primary, to hand over)
#   scripts/lab.sh reset [--prefix P] [--dir D] [--from a|b]
#   scripts/lab.sh etcdctl [--prefix P] [--dir D] -- ARGS...   (etcd witness: etcdctl as operator)
#
# `start` runs a process in its site's namespace in the background (logs
# and pidfile in D); `reset` stops both nodes and the witness, forgets
# their state and gives both sites a copy of one site's disk (default: the
# site that was live last), ready for a fresh pair. `up` also writes
# D/drill.toml, the targets file of `ftvm drill` for this lab.
#
# `up --hosts` also makes sites A and B and the witness site SSH-reachable
# "hosts" for deployment tests (ansible/inventories/lab): each runs its own
# sshd (on 127.0.0.1:22 inside its namespace) in a mount namespace of its
# own, where /etc/ftvm, /var/lib/ftvm, /opt/ftvm, /run/ftvm and
# /var/log/ftvm are private directories under D/hosts/<host>/, so a role
# installs to the paths a real host has and the machine's own are never
# touched (empty mount points are created if missing). D/hosts/ssh_config
# names them node-a, node-b and witness-c (user root, a key of the lab's own,
# their host keys pinned); `ssh -F D/hosts/ssh_config node-a` reaches site
# A through `ip netns exec` and socat.
#
# Defaults: P=ftvm, D=lab-out. `up` creates D with a development PKI, the
# lab configs from examples/lab/ (machine.image pointed at the built ftkv),
# two identical 64 MiB disks and the state directories, then starts the
# relay. Binaries come from $FTVM_BIN_DIR (default target/release, else
# target/debug).
#
#            P-a (site A)                 P-wan                 P-b (site B)
#   ftkv VM ─ TAP ftvm0 ┐  wan0 10.77.1.2 ── relay ── 10.77.2.2 wan0  ┌ TAP ftvm0 ─ ftkv VM
#                 br0 ──┤                    │                        ├── br0
#                       └── lan0 ─┐      10.77.3.2 (P-w: witness)  ┌─ lan0
#                                 └──── P-c: bridge `lan`, client 10.0.2.1/24
#
# The client LAN is stretched across both sites (as VMware FT assumes): the
# guest has one IP and MAC (10.0.2.15, 52:54:00:12:34:56) wherever it is
# live. Relay routes (peer and witness addresses in the configs):
#   b-to-a  10.77.2.1:7401 -> 10.77.1.2:7400   (B dials A's log channel)
#   a-to-b  10.77.1.1:7402 -> 10.77.2.2:7400   (A dials B's log channel)
#   a-w     10.77.1.1:7470 -> 10.77.3.2:7470   (A asks the witness)
#   b-w     10.77.2.1:7470 -> 10.77.3.2:7470   (B asks the witness)
#
# The etcd witness (`up --witness etcd`; docs/witness.md): instead of
# ftvm-witness, a three-member etcd cluster (Debian's etcd-server) is the
# witness, placed as docs/witness.md advises, one member per site: etcd-a
# in site A, etcd-b in site B, etcd-w in the witness site, each on its
# site's WAN address (10.77.{1,2,3}.2, client port 2379, peer port 2380),
# TLS with client certificates from the lab's PKI (members' certificates
# name their addresses), --pre-vote on. The nodes' [witness] tables get
# `kind = "etcd"` and every member's client URL, their own site's first.
# `up` starts the members and waits for the cluster; the cluster's keys are
# under /ftvm/witness/lab/. etcd speaks TCP and the relay carries UDP, so the
# WAN namespace routes etcd's TCP (ports 2379 and 2380, nothing else)
# between the sites' addresses, without the relay's delay, jitter or loss,
# and cuts it with nftables whenever a relay route of that link is blocked
# in any direction: a-to-b or b-to-a cut A<->B, a-w cuts A<->W, b-w cuts
# B<->W. So partitions and isolations mean the same for both witnesses.
# `start|kill witness` start or kill etcd-w (the witness site's member: the
# drill's kill-witness loses one member of three, and the cluster keeps a
# majority while sites A and B reach each other); `reset` leaves the
# members running (starting any that is down), waits until all three
# answer and deletes the cluster's keys; `etcdctl` runs etcdctl in the
# witness site with the lab's operator certificate (e.g. `-- get --prefix
# /ftvm/witness/`). Needs etcd, etcdctl and nft.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}
shift || true
P=ftvm
D=lab-out
DELAY=0
WITNESS=ftvm
HOSTS=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) P=$2; shift 2 ;;
    --dir) D=$2; shift 2 ;;
    --delay-ms) DELAY=$2; shift 2 ;;
    --witness) WITNESS=$2; shift 2 ;;
    --hosts) HOSTS=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ -z "${FTVM_BIN_DIR:-}" ]; then
  if [ -x "$ROOT/target/release/wan-relay" ]; then FTVM_BIN_DIR=$ROOT/target/release; else FTVM_BIN_DIR=$ROOT/target/debug; fi
fi
FTVM=$FTVM_BIN_DIR/ftvm
RELAY=$FTVM_BIN_DIR/wan-relay
ns() { ip netns exec "$P-$1" "${@:2}"; }

veth() { # veth NS1 IF1 NS2 IF2
  ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
  ip -n "$1" link set "$2" up
  ip -n "$3" link set "$4" up
}

# The witness's kind, as `up` chose it (kept in D for the later commands).
witness_kind() { cat "$D/witness-kind" 2>/dev/null || echo ftvm; }

# --- The etcd witness (`up --witness etcd`) ---------------------------------
ETCD_SITES="a b w"
# The lab pair's keys (cluster "lab" of examples/lab, the default key prefix).
ETCD_KEYS=/ftvm/witness/lab/
WAN_TABLE=ftvm_lab_etcd
site_ip() { case "$1" in a) echo 10.77.1.2 ;; b) echo 10.77.2.2 ;; w) echo 10.77.3.2 ;; esac; }

etcd_endpoints() { # etcd_endpoints SITE: every member's client URL, SITE's first, then W's
  local out="https://$(site_ip "$1"):2379" s
  for s in w a b; do [ "$s" = "$1" ] || out+=",https://$(site_ip "$s"):2379"; done
  echo "$out"
}

etcdctl_lab() { # etcdctl as the lab's operator, from the witness site
  local abs; abs=$(cd "$D" && pwd)
  ns w env ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints w)" --cacert "$abs/pki/ca.pem" \
    --cert "$abs/pki/operator.pem" --key "$abs/pki/operator.key" \
    --dial-timeout 2s --command-timeout 5s "$@"
}

etcd_running() { [ -f "$D/etcd-$1.pid" ] && kill -0 "$(cat "$D/etcd-$1.pid")" 2>/dev/null; }

start_member() { # start_member a|b|w: starts that site's member unless it runs
  local s=$1 abs ip initial="" m
  etcd_running "$s" && return 0
  abs=$(cd "$D" && pwd)
  ip=$(site_ip "$s")
  for m in $ETCD_SITES; do initial+="${initial:+,}etcd-$m=https://$(site_ip "$m"):2380"; done
  # A member restarted on its data directory ignores the --initial-* flags.
  # Heartbeat and election timeout are twice etcd's defaults: the members
  # share two cores with two VMs, and a late heartbeat should not cost a
  # leader.
  ip netns exec "$P-$s" etcd --name "etcd-$s" --data-dir "$abs/etcd-$s.data" \
    --listen-client-urls "https://$ip:2379" --advertise-client-urls "https://$ip:2379" \
    --listen-peer-urls "https://$ip:2380" --initial-advertise-peer-urls "https://$ip:2380" \
    --initial-cluster "$initial" --initial-cluster-token "$P" --initial-cluster-state new \
    --client-cert-auth --trusted-ca-file "$abs/pki/ca.pem" \
    --cert-file "$abs/pki/etcd-$s.pem" --key-file "$abs/pki/etcd-$s.key" \
    --peer-client-cert-auth --peer-trusted-ca-file "$abs/pki/ca.pem" \
    --peer-cert-file "$abs/pki/etcd-$s.pem" --peer-key-file "$abs/pki/etcd-$s.key" \
    --heartbeat-interval 200 --election-timeout 2000 --pre-vote \
    --logger zap --log-outputs stderr </dev/null >>"$abs/etcd-$s.log" 2>&1 &
  echo $! >"$abs/etcd-$s.pid"
}

etcd_wait() { # waits (at most 120 s) until every member answers a linearizable read
  local until=$((SECONDS + 120))
  while [ "$SECONDS" -lt "$until" ]; do
    etcdctl_lab endpoint health >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "lab: the etcd members did not all answer within 120 s (logs: $D/etcd-*.log)" >&2
  etcdctl_lab endpoint health >&2 || true
  exit 1
}

etcd_network() { # routes etcd's TCP (only) between the sites' WAN addresses
  ip netns exec "$P-wan" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$P-a" route add 10.77.2.0/24 via 10.77.1.1
  ip -n "$P-a" route add 10.77.3.0/24 via 10.77.1.1
  ip -n "$P-b" route add 10.77.1.0/24 via 10.77.2.1
  ip -n "$P-b" route add 10.77.3.0/24 via 10.77.2.1
  ip -n "$P-w" route add 10.77.1.0/24 via 10.77.3.1
  ip -n "$P-w" route add 10.77.2.0/24 via 10.77.3.1
  # `cut` holds (source, destination) pairs of the links whose relay routes
  # are blocked (sync_etcd_cuts); dropped in the forward hook, silently, as a
  # cut WAN drops.
  ns wan nft -f - <<EOT
table inet $WAN_TABLE {
  set cut { type ipv4_addr . ipv4_addr; }
  set sites { type ipv4_addr; elements = { 10.77.1.2, 10.77.2.2, 10.77.3.2 } }
  chain forward {
    type filter hook forward priority 0; policy drop;
    ip saddr . ip daddr @cut drop
    ip saddr @sites ip daddr @sites tcp dport { 2379, 2380 } accept
    ip saddr @sites ip daddr @sites tcp sport { 2379, 2380 } accept
  }
}
EOT
}

sync_etcd_cuts() { # cuts etcd's TCP on each link one of whose relay routes is blocked
  [ "$(witness_kind)" = etcd ] || return 0
  local route elems=() list
  declare -A cut=()
  for route in $("$RELAY" ctl --control "$D/relay.sock" status | awk '/ blocked=true / {print $1}'); do
    case "$route" in
      a-to-b|b-to-a) cut[ab]=1 ;;
      a-w) cut[aw]=1 ;;
      b-w) cut[bw]=1 ;;
    esac
  done
  [ -n "${cut[ab]:-}" ] && elems+=("10.77.1.2 . 10.77.2.2" "10.77.2.2 . 10.77.1.2")
  [ -n "${cut[aw]:-}" ] && elems+=("10.77.1.2 . 10.77.3.2" "10.77.3.2 . 10.77.1.2")
  [ -n "${cut[bw]:-}" ] && elems+=("10.77.2.2 . 10.77.3.2" "10.77.3.2 . 10.77.2.2")
  list=$(IFS=,; echo "${elems[*]}")
  { echo "flush set inet $WAN_TABLE cut"
    [ -z "$list" ] || echo "add element inet $WAN_TABLE cut { $list }"
  } | ns wan nft -f -
}

etcd_up() { # up, etcd mode: certificates, network, node configs, members
  local s
  for s in $ETCD_SITES; do
    "$FTVM" certs issue --dir "$D/pki" --node "etcd-$s" --ip "$(site_ip "$s")" >/dev/null 2>&1
  done
  "$FTVM" certs issue --dir "$D/pki" --node operator >/dev/null 2>&1
  etcd_network
  for s in a b; do
    sed -i '/^\[witness\]/,$d' "$D/node-$s.toml"
    cat >>"$D/node-$s.toml" <<EOT
[witness]
# The lab's etcd cluster (scripts/lab.sh up --witness etcd): one member per
# site, this site's first.
kind = "etcd"
endpoints = ["$(etcd_endpoints "$s" | sed 's/,/", "/g')"]
ca = "pki/ca.pem"
cert = "pki/node-$s.pem"
key = "pki/node-$s.key"
EOT
  done
  for s in $ETCD_SITES; do start_member "$s"; done
  etcd_wait
}

# Which process `start`/`kill` mean: with etcd, "witness" is etcd-w.
proc_name() {
  if [ "$1" = witness ] && [ "$(witness_kind)" = etcd ]; then echo etcd-w; else echo "$1"; fi
}

up() {
  case "$WITNESS" in
    ftvm) ;;
    etcd)
      local t
      for t in etcd etcdctl nft; do
        command -v "$t" >/dev/null || { echo "lab: --witness etcd needs $t (scripts/setup.sh installs it)" >&2; exit 1; }
      done
      ;;
    *) echo "lab: --witness must be ftvm or etcd, not $WITNESS" >&2; exit 2 ;;
  esac
  for x in wan a b w c; do
    ip netns add "$P-$x"
    ip -n "$P-$x" link set lo up
  done
  # WAN: each site reaches only the relay's address on its own link.
  veth "$P-wan" to-a "$P-a" wan0
  veth "$P-wan" to-b "$P-b" wan0
  veth "$P-wan" to-w "$P-w" wan0
  ip -n "$P-wan" addr add 10.77.1.1/24 dev to-a
  ip -n "$P-wan" addr add 10.77.2.1/24 dev to-b
  ip -n "$P-wan" addr add 10.77.3.1/24 dev to-w
  ip -n "$P-a" addr add 10.77.1.2/24 dev wan0
  ip -n "$P-b" addr add 10.77.2.2/24 dev wan0
  ip -n "$P-w" addr add 10.77.3.2/24 dev wan0
  # The client LAN, stretched to both sites' bridges.
  ip -n "$P-c" link add lan type bridge
  ip -n "$P-c" link set lan up
  ip -n "$P-c" addr add 10.0.2.1/24 dev lan
  for s in a b; do
    ip -n "$P-$s" link add br0 type bridge
    ip -n "$P-$s" link set br0 up
    ip -n "$P-$s" tuntap add dev ftvm0 mode tap
    ip -n "$P-$s" link set ftvm0 master br0
    ip -n "$P-$s" link set ftvm0 up
    veth "$P-$s" lan0 "$P-c" "site-$s"
    ip -n "$P-$s" link set lan0 master br0
    ip -n "$P-c" link set "site-$s" master lan
  done

  mkdir -p "$D"
  "$FTVM" certs init --dir "$D/pki" >/dev/null 2>&1
  for n in node-a node-b witness; do "$FTVM" certs issue --dir "$D/pki" --node "$n" >/dev/null 2>&1; done
  local image
  image=$(cd "$FTVM_BIN_DIR/../guest/x86_64-unknown-linux-gnu/release" 2>/dev/null && pwd)/ftkv
  for f in node-a node-b witness; do
    sed "s|^image = .*|image = \"$image\"|" "$ROOT/examples/lab/$f.toml" > "$D/$f.toml"
  done
  echo "$WITNESS" >"$D/witness-kind"
  rm -f "$D/node-a.img" "$D/node-b.img"
  "$FTVM" disk create "$D/node-a.img" --size 64M >/dev/null
  cp --sparse=always "$D/node-a.img" "$D/node-b.img"

  ns wan "$RELAY" run --control "$D/relay.sock" --delay-ms "$DELAY" \
    --route b-to-a=10.77.2.1:7401\>10.77.1.2:7400 \
    --route a-to-b=10.77.1.1:7402\>10.77.2.2:7400 \
    --route a-w=10.77.1.1:7470\>10.77.3.2:7470 \
    --route b-w=10.77.2.1:7470\>10.77.3.2:7470 \
    >"$D/relay.log" 2>&1 &
  echo $! >"$D/relay.pid"
  for _ in $(seq 50); do [ -S "$D/relay.sock" ] && break; sleep 0.1; done
  [ -S "$D/relay.sock" ] || { echo "lab: the relay did not start (see $D/relay.log)" >&2; exit 1; }
  [ "$WITNESS" = etcd ] && etcd_up
  write_drill_targets
  [ -z "$HOSTS" ] || hosts_up
  echo "lab: up (prefix $P, dir $D, one-way delay ${DELAY} ms, witness $WITNESS)"
  if [ "$WITNESS" = etcd ]; then
    echo "lab:   witness: etcd members running: $(etcd_endpoints w)"
  else
    echo "lab:   witness: ip netns exec $P-w $FTVM_BIN_DIR/ftvm-witness run --config $D/witness.toml"
  fi
  echo "lab:   site A:  ip netns exec $P-a $FTVM run --config $D/node-a.toml --primary"
  echo "lab:   site B:  ip netns exec $P-b $FTVM run --config $D/node-b.toml"
  echo "lab:   client:  ip netns exec $P-c redis-cli -h 10.0.2.15 PING"
}

# The private paths of a lab host: mount point and directory name.
HOST_PATHS="/etc/ftvm:etc-ftvm /var/lib/ftvm:var-lib-ftvm /opt/ftvm:opt-ftvm /run/ftvm:run-ftvm /var/log/ftvm:var-log-ftvm"

hosts_up() {
  local abs h site name mp sub binds
  abs=$(cd "$D" && pwd)/hosts
  mkdir -p "$abs" /run/sshd
  [ -f "$abs/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C "ftvm-lab-$P" -f "$abs/id_ed25519"
  cp "$abs/id_ed25519.pub" "$abs/authorized_keys"
  : >"$abs/known_hosts"
  cat >"$abs/ssh_config" <<EOT
# The lab's hosts (scripts/lab.sh up --hosts, prefix $P).
Host node-a node-b witness-c
  User root
  IdentityFile $abs/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $abs/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
  ControlMaster auto
  ControlPath $abs/cm-%C
  ControlPersist 60
EOT
  for h in a:node-a b:node-b w:witness-c; do
    site=${h%%:*} name=${h#*:}
    mkdir -p "$abs/$name"
    binds=
    for mp in $HOST_PATHS; do
      sub=${mp#*:} mp=${mp%%:*}
      mkdir -p "$abs/$name/$sub" "$mp"
      binds="$binds mount --bind $abs/$name/$sub $mp &&"
    done
    [ -f "$abs/$name/ssh_host_ed25519_key" ] ||
      ssh-keygen -q -t ed25519 -N '' -C "$name" -f "$abs/$name/ssh_host_ed25519_key"
    echo "$name $(cut -d' ' -f1-2 "$abs/$name/ssh_host_ed25519_key.pub")" >>"$abs/known_hosts"
    cat >"$abs/$name/sshd_config" <<EOT
ListenAddress 127.0.0.1:22
HostKey $abs/$name/ssh_host_ed25519_key
PidFile $abs/$name/sshd.pid
AuthorizedKeysFile $abs/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
Subsystem sftp internal-sftp
EOT
    printf 'Host %s\n  ProxyCommand ip netns exec %s socat STDIO TCP:127.0.0.1:22\n' \
      "$name" "$P-$site" >>"$abs/ssh_config"
    # `down` stops it with everything else in the namespace.
    ip netns exec "$P-$site" unshare -m --propagation private \
      sh -c "$binds exec /usr/sbin/sshd -D -f $abs/$name/sshd_config -E $abs/$name/sshd.log" \
      </dev/null >/dev/null 2>&1 &
  done
  for name in node-a node-b witness-c; do
    for _ in $(seq 100); do
      ssh -F "$abs/ssh_config" "$name" true 2>/dev/null && continue 2
      sleep 0.1
    done
    echo "lab: the sshd of $name does not answer (see $abs/$name/sshd.log)" >&2
    exit 1
  done
  echo "lab: hosts node-a, node-b, witness-c: ssh -F $abs/ssh_config HOST"
}

write_drill_targets() {
  local me="$ROOT/scripts/lab.sh"
  cmd_of() { echo "[\"bash\", \"$me\", \"$1\", \"--prefix\", \"$P\", \"--dir\", \"$(cd "$D" && pwd)\"${2:+, $2}]"; }
  cat >"$D/drill.toml" <<EOT
# Targets of \`ftvm drill\` for the lab $P (written by scripts/lab.sh up).
service = "10.0.2.15:6379"
client_netns = "$P-c"
guest_mac = "52:54:00:12:34:56"
wan_delay_ms = $DELAY
failure_timeout_ms = 2000
# The drill appends "--from a|b": the site whose disk both sites start from.
reset = $(cmd_of reset)
# The witness: ftvm-witness, or with \`up --witness etcd\` the witness site's
# etcd member (etcd-w; killed with SIGKILL, started again on its data).
start_witness = $(cmd_of start '"witness"')
kill_witness = $(cmd_of kill '"witness", "KILL"')
partition_sites = $(cmd_of relay '"--", "block", "a-to-b,b-to-a"')
heal_sites = $(cmd_of relay '"--", "unblock", "a-to-b,b-to-a"')
isolate_a = $(cmd_of relay '"--", "block", "a-to-b,b-to-a,a-w"')
isolate_b = $(cmd_of relay '"--", "block", "a-to-b,b-to-a,b-w"')
heal_all = $(cmd_of relay '"--", "unblock", "all"')

[capture]
netns = "$P-c"
a = "site-a"
b = "site-b"

[site.a]
name = "node-a"
status = $(cmd_of status '"a"')
start_primary = $(cmd_of start '"a", "--", "--primary"')
start_backup = $(cmd_of start '"a"')
join = $(cmd_of start '"a", "--", "--join"')
switchover = $(cmd_of switchover '"a"')
kill = $(cmd_of kill '"a", "KILL"')

[site.b]
name = "node-b"
status = $(cmd_of status '"b"')
start_primary = $(cmd_of start '"b", "--", "--primary"')
start_backup = $(cmd_of start '"b"')
join = $(cmd_of start '"b", "--", "--join"')
switchover = $(cmd_of switchover '"b"')
kill = $(cmd_of kill '"b", "KILL"')
EOT
}

start_proc() { # start_proc witness|a|b|etcd-a|etcd-b|etcd-w ARGS...
  local who; who=$(proc_name "$1"); shift
  local abs; abs=$(cd "$D" && pwd)
  # A node or witness sent KILL by `kill` may still be exiting (its TAP and
  # files stay busy until it has): wait for it; refuse to start beside a
  # live one. (etcd members: start_member checks for itself.)
  if [ -f "$abs/$who.pid" ] && { [ "$who" = a ] || [ "$who" = b ] || [ "$who" = witness ]; }; then
    local old; old=$(cat "$abs/$who.pid")
    for _ in $(seq 300); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$old" 2>/dev/null; then echo "lab: $who is still running (pid $old)" >&2; exit 1; fi
    rm -f "$abs/$who.pid"
  fi
  # `ip netns exec` execs the program: $! is the program's own pid.
  case "$who" in
    etcd-a|etcd-b|etcd-w) start_member "${who#etcd-}"; return ;;
    witness) ip netns exec "$P-w" "$FTVM_BIN_DIR/ftvm-witness" run --config "$abs/witness.toml" >"$abs/witness.out" 2>"$abs/witness.err" & ;;
    a|b) ip netns exec "$P-$who" "$FTVM" run --config "$abs/node-$who.toml" "$@" >"$abs/node-$who.out" 2>"$abs/node-$who.err" & ;;
    *) echo "lab: start witness|a|b|etcd-a|etcd-b|etcd-w" >&2; exit 2 ;;
  esac
  echo $! >"$abs/$who.pid"
}

kill_proc() { # kill_proc witness|a|b|etcd-a|etcd-b|etcd-w [SIGNAL]
  local pidfile sig=${2:-TERM}
  pidfile="$D/$(proc_name "$1").pid"
  [ -f "$pidfile" ] || return 0
  kill -"$sig" "$(cat "$pidfile")" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pidfile"
}

reset() {
  local from=${1:-a}
  local kind; kind=$(witness_kind)
  for who in a b; do kill_proc "$who" KILL; done
  [ "$kind" = ftvm ] && kill_proc witness KILL
  local to=a; [ "$from" = a ] && to=b
  cp --sparse=always "$D/node-$from.img" "$D/node-$to.img"
  rm -rf "$D/state-a" "$D/state-b" "$D/witness.db"
  "$RELAY" ctl --control "$D/relay.sock" unblock all >/dev/null
  sync_etcd_cuts
  if [ "$kind" = etcd ]; then
    local s
    for s in $ETCD_SITES; do start_member "$s"; done
    etcd_wait
    etcdctl_lab del --prefix "$ETCD_KEYS" >/dev/null
  fi
  echo "lab: reset (disk of site $from copied to site $to; state forgotten)"
}

down() {
  for x in a b w c wan; do
    if ip netns list | grep -qw "$P-$x"; then
      for pid in $(ip netns pids "$P-$x" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    fi
  done
  sleep 0.5
  for x in a b w c wan; do
    if ip netns list | grep -qw "$P-$x"; then
      for pid in $(ip netns pids "$P-$x" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$P-$x" 2>/dev/null || true
    fi
  done
  rm -f "$D/relay.pid" "$D/relay.sock"
  echo "lab: down (prefix $P)"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  relay)
    "$RELAY" ctl --control "$D/relay.sock" "$@"
    sync_etcd_cuts
    ;;
  start)
    who=${1:?start witness|a|b|etcd-a|etcd-b|etcd-w}; shift
    [ "${1:-}" = "--" ] && shift
    start_proc "$who" "$@"
    ;;
  kill)
    who=${1:?kill witness|a|b|etcd-a|etcd-b|etcd-w}
    if [ "${2:-TERM}" = KILL ]; then
      # A crash, for drills: return once the signal is sent (a killed VMM
      # takes seconds to vanish, and the drill counts the fault from our
      # return). The pidfile stays, so `start` and `reset` still wait for
      # the exit.
      pidfile="$D/$(proc_name "$who").pid"
      [ -f "$pidfile" ] && kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
    else
      kill_proc "$who" "${2:-TERM}"
    fi
    ;;
  status) ns "${1:?status a|b}" "$FTVM" status --json --config "$(cd "$D" && pwd)/node-$1.toml" ;;
  switchover) ns "${1:?switchover a|b}" "$FTVM" switchover --config "$(cd "$D" && pwd)/node-$1.toml" ;;
  reset)
    from=
    [ "${1:-}" = "--from" ] && from=${2:?--from a|b}
    reset "$from"
    ;;
  etcdctl)
    [ "$(witness_kind)" = etcd ] || { echo "lab: this lab's witness is not etcd (up --witness etcd)" >&2; exit 2; }
    [ "${1:-}" = "--" ] && shift
    etcdctl_lab "$@"
    ;;
  exec)
    site=${1:?exec needs a site: a, b, w, c or wan}
    shift
    [ "${1:-}" = "--" ] && shift
    ns "$site" "$@"
    ;;
  *)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
