#!/usr/bin/env bash
# Single-node walk-through of evio-cni: a throw-away "node" network namespace, two "pod" namespaces plugged
# in with evio-cni + the real host-local IPAM, their addresses, pings pod->gateway and pod->pod, then DEL and
# teardown (also on error). Builds nothing: it uses target/release/evio-cni (make release). Runs as root and
# never changes the root network namespace: every command runs inside the namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
PLUGIN=${EVIO_CNI:-$PWD/target/release/evio-cni}
REF=/usr/lib/cni
[ -x "$PLUGIN" ] || { echo "walkthrough: $PLUGIN missing; build it first (cargo build --release -p evio-cni)" >&2; exit 1; }
[ -x "$REF/host-local" ] || { echo "walkthrough: $REF/host-local missing (apt-get install containernetworking-plugins)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "walkthrough: run as root (it creates network namespaces)" >&2; exit 1; }

ID=$$
NODE=evio-wt-node-$ID
PODS=(evio-wt-pod1-$ID evio-wt-pod2-$ID)
T=$(mktemp -d /tmp/evio-walkthrough.XXXXXX)
ADDED=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cni() { # COMMAND CONTAINER_ID POD_NETNS
  ip netns exec "$NODE" env CNI_COMMAND="$1" CNI_CONTAINERID="$2" CNI_NETNS="${3:+/run/netns/$3}" \
    CNI_IFNAME=eth0 CNI_PATH="$T/bin" "$PLUGIN" < "$T/10-evio.conf"
}

cleanup() {
  local rc=$?
  set +e
  for i in "${!ADDED[@]}"; do cni DEL "pod$((i + 1))-$ID" "${PODS[$i]}" >/dev/null 2>&1; done
  for p in "${PODS[@]}"; do ip netns del "$p" 2>/dev/null; done
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$T"
  if [ $rc = 0 ]; then echo; echo "walkthrough: done, everything removed"; else echo "walkthrough: FAILED (rc $rc), everything removed" >&2; fi
}
trap cleanup EXIT INT TERM

mkdir -p "$T/bin"
ln -s "$PLUGIN" "$T/bin/evio-cni"
ln -s "$REF/host-local" "$T/bin/host-local"
cat > "$T/10-evio.conf" <<JSON
{
  "cniVersion": "1.1.0",
  "name": "evio",
  "type": "evio-cni",
  "bridge": "eviobr0",
  "bridgeType": "linux",
  "isGateway": true,
  "isDefaultGateway": true,
  "ipMasq": true,
  "podCIDR": "10.244.0.0/16",
  "mtu": 1400,
  "stateDir": "$T/state",
  "logFile": "$T/evio-cni.log",
  "ipam": { "type": "host-local", "subnet": "10.244.3.0/24", "rangeStart": "10.244.3.2",
            "rangeEnd": "10.244.3.254", "dataDir": "$T/ipam" }
}
JSON

say "node and pod network namespaces"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
for p in "${PODS[@]}"; do ip netns add "$p"; ip -n "$p" link set lo up; done
echo "node: $NODE   pods: ${PODS[*]}"
say "network config"
cat "$T/10-evio.conf"

IPS=()
for i in 0 1; do
  say "CNI ADD pod$((i + 1))"
  out=$(cni ADD "pod$((i + 1))-$ID" "${PODS[$i]}")
  ADDED+=("$i")
  echo "$out"
  IPS+=("$(echo "$out" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')")
done

say "addresses"
for i in 0 1; do echo "pod$((i + 1)):"; ip -n "${PODS[$i]}" -br addr show eth0; ip -n "${PODS[$i]}" route; done
echo "node:"; ip -n "$NODE" -br addr show eviobr0; ip -n "$NODE" -br link show master eviobr0

say "ping pod1 -> gateway 10.244.3.1"
ip netns exec "${PODS[0]}" ping -c 2 -W 2 10.244.3.1
say "ping pod1 -> pod2 (${IPS[1]})"
ip netns exec "${PODS[0]}" ping -c 2 -W 2 "${IPS[1]}"

say "masquerade (table inet evio_cni in the node netns)"
ip netns exec "$NODE" nft list set inet evio_cni pods4

say "CNI DEL"
for i in 1 0; do cni DEL "pod$((i + 1))-$ID" "${PODS[$i]}"; echo "pod$((i + 1)) deleted"; done
ADDED=()
echo "veths left in the node: $(ip -n "$NODE" -o link show type veth | wc -l)"
echo "addresses reserved: $(find "$T/ipam" -name '10.*' | wc -l)"
