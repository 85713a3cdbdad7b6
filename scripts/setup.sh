#!/usr/bin/env bash
# Installs what ftvm's demo, tests and benchmarks need on a fresh Debian
# machine. Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo

need=()
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
# The etcd witness backend: protoc builds its gRPC client; its tests run a
# real three-member etcd cluster and inspect it with etcdctl.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto), which etcd's
# protos import.
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
# Deployment tests (tests/tests/deploy.rs): lab hosts are namespaces with
# their own sshd, reached through socat; systemd-analyze checks the units.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  # redis-server's, etcd-server's and openssh-server's packages would start
  # system-wide servers (etcd on the default ports 2379/2380, sshd on 22):
  # tests start their own.
  if [[ " ${need[*]} " == *" redis-server "* || " ${need[*]} " == *" etcd-server "* ||
    " ${need[*]} " == *" openssh-server "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The Python Redis client the compatibility tests use, as users get it
# today: the latest `redis` from PyPI (default settings speak RESP3), in a
# venv of its own so the system's Python stays untouched. Tests look for it
# at target/py-venv (or $FTVM_PYTHON).
venv="$(cd "$(dirname "$0")/.." && pwd)/target/py-venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv" || {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    python3 -m venv "$venv"
  }
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade redis
echo "setup: redis-py $("$venv/bin/python" -c 'import redis; print(redis.__version__)') in $venv"

# Ansible for the deployment tests and the playbooks in ansible/, pinned to
# releases that run on this Python (3.11: ansible-core 2.19 is the last
# series for it), in a venv of its own: tests look for it at
# target/ansible-venv (or $FTVM_ANSIBLE_VENV).
ANSIBLE_CORE=2.19.14
ANSIBLE_LINT=26.10.1
avenv="$(cd "$(dirname "$0")/.." && pwd)/target/ansible-venv"
[ -x "$avenv/bin/python" ] || python3 -m venv "$avenv"
have=$("$avenv/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null || true)
if ! grep -qx "ansible-core==$ANSIBLE_CORE" <<<"$have" || ! grep -qx "ansible-lint==$ANSIBLE_LINT" <<<"$have"; then
  echo "setup: installing ansible-core $ANSIBLE_CORE and ansible-lint $ANSIBLE_LINT into $avenv"
  "$avenv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "ansible-core==$ANSIBLE_CORE" "ansible-lint==$ANSIBLE_LINT"
fi
echo "setup: $("$avenv/bin/ansible-playbook" --version | head -1) in $avenv"

if [ ! -e /dev/kvm ]; then
  echo "setup: warning: /dev/kvm is missing; KVM tests will print SKIPPED" >&2
fi
