#!/usr/bin/env bash
# Installs what evio's demo and tests need on a fresh Debian 12 machine (as root), when missing.
# Idempotent and quick when everything is present.
set -euo pipefail

packages=(
  etcd-server etcd-client openvswitch-switch containernetworking-plugins coturn
  iproute2 nftables iptables iputils-ping ethtool conntrack socat tcpdump iperf3 curl
  podman runc busybox-static containerd protobuf-compiler binutils ca-certificates python3
  chromium chromium-driver
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# kubernetes-validate (PyPI): offline, strict validation of deploy/*.yaml against the Kubernetes schemas in
# the tests (crates/evioctl/tests/deploy.rs).
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pip
  fi
  echo "deps: installing kubernetes-validate with pip" >&2
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "deps: installing the Rust toolchain with rustup" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  fi
fi

# Debian starts these daemons from their packages where systemd runs; evio's tests and demo start their own
# instances with their own data dirs, so a system-wide one is never needed (and would hold ports).
for svc in etcd coturn; do
  if pgrep -x "$svc" >/dev/null 2>&1 && command -v systemctl >/dev/null 2>&1; then
    systemctl stop "$svc" 2>/dev/null || true
  fi
done
