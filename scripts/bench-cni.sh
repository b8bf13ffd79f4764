#!/usr/bin/env bash
# CNI ADD/DEL latency of evio-cni vs the reference `bridge` plugin (containernetworking-plugins), same
# host-local config, same throw-away node netns, interleaved; plus a burst of concurrent ADDs.
# Needs a release build (cargo build --release -p evio-cni). Never touches the root netns.
# Usage: scripts/bench-cni.sh [N] [BURST] > docs/bench/cni.md
set -euo pipefail
cd "$(dirname "$0")/.."
LOAD0=$(cut -d" " -f1-3 /proc/loadavg)
N=${1:-30}
BURST=${2:-30}
PLUGIN=$PWD/target/release/evio-cni
REF=/usr/lib/cni
[ -x "$PLUGIN" ] || { echo "build first: cargo build --release -p evio-cni" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

TAG=bc$$
NODE=${TAG}n
T=$(mktemp -d /tmp/evio-bench-cni.XXXXXX)
PODS=()
cleanup() {
  for p in "${PODS[@]}"; do ip netns del "$p" 2>/dev/null || true; done
  ip netns del "$NODE" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT INT TERM

ip netns add "$NODE"
ip -n "$NODE" link set lo up
mkdir -p "$T/bin"
ln -s "$PLUGIN" "$T/bin/evio-cni"
for p in bridge host-local; do ln -s "$REF/$p" "$T/bin/$p"; done

# conf NAME TYPE BRIDGE SUBNET MASQ
conf() {
  local masqkey=ipMasq
  cat <<JSON
{"cniVersion":"1.0.0","name":"$1","type":"$2","bridge":"$3","isGateway":true,"isDefaultGateway":true,
 "$masqkey":$5,"stateDir":"$T/state","ipam":{"type":"host-local","subnet":"$4","dataDir":"$T/ipam"}}
JSON
}
for m in false true; do
  conf "ev$m" evio-cni "evbr$m" "10.$([ $m = true ] && echo 41 || echo 40).0.0/16" $m > "$T/evio-cni-$m.json"
  conf "br$m" bridge "cnibr$m" "10.$([ $m = true ] && echo 43 || echo 42).0.0/16" $m > "$T/bridge-$m.json"
done

mkpods() { # COUNT PREFIX
  local i
  for ((i = 0; i < $1; i++)); do ip netns add "$2$i"; PODS+=("$2$i"); done
}

# The measuring loop runs inside the node netns: each plugin run is a plain fork+exec from that shell, timed
# with bash's EPOCHREALTIME (microseconds).
cat > "$T/one.sh" <<'SH'
# one.sh CONF CID NETNS COMMAND -> prints elapsed ms, fails loudly if the plugin fails
set -u
export CNI_PATH=$BIN CNI_COMMAND=$4 CNI_CONTAINERID=$2 CNI_NETNS=/run/netns/$3 CNI_IFNAME=eth0
s=$EPOCHREALTIME
out=$("$BIN/$TYPE" < "$1") || { echo "FAIL $TYPE $4 $2: $out" >&2; exit 1; }
e=$EPOCHREALTIME
echo "$s $e" | awk '{printf "%.3f\n", ($2-$1)*1000}'
SH

run1() { # TYPE CONF CID POD COMMAND
  ip netns exec "$NODE" env BIN="$T/bin" TYPE="$1" bash "$T/one.sh" "$2" "$3" "$4" "$5"
}

# Serial rounds, in-netns loop: one bash process runs all rounds so ip-netns-exec cost is outside the timing.
cat > "$T/serial.sh" <<'SH'
set -eu
# serial.sh N MASQ POD_PREFIX
export CNI_PATH=$BIN CNI_IFNAME=eth0
t() { local s=$EPOCHREALTIME; CNI_COMMAND=$2 CNI_CONTAINERID=$3 CNI_NETNS=/run/netns/$4 "$BIN/$1" < "$5" >/dev/null || { echo "FAIL $1 $2 $3" >&2; exit 1; }; local e=$EPOCHREALTIME; echo "$1 $2 $s $e"; }
for ((i = 0; i < $1; i++)); do
  if ((i % 2 == 0)); then a=evio-cni; b=bridge; else a=bridge; b=evio-cni; fi
  for p in $a $b; do t $p ADD c$i-$p "$3$i-$p" "$CONF/$p-$2.json"; done
  for p in $b $a; do t $p DEL c$i-$p "$3$i-$p" "$CONF/$p-$2.json"; done
done
SH

declare -A MED
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) printf "%.2f", a[(NR+1)/2]; else printf "%.2f", (a[NR/2]+a[NR/2+1])/2}'; }
minimum() { sort -n | head -1 | awk '{printf "%.2f", $1}'; }
declare -A MIN

for m in false true; do
  for ((i = 0; i < N; i++)); do
    for p in evio-cni bridge; do ip netns add "${TAG}s$m$i-$p"; PODS+=("${TAG}s$m$i-$p"); done
  done
  # one warm-up attachment per plugin (bridge creation, host-local dir, delegate version cache)
  for p in evio-cni bridge; do
    ip netns add "${TAG}w$m-$p"; PODS+=("${TAG}w$m-$p")
    run1 $p "$T/$p-$m.json" w$m-$p "${TAG}w$m-$p" ADD >/dev/null
  done
  ip netns exec "$NODE" env BIN="$T/bin" CONF="$T" bash "$T/serial.sh" "$N" $m "${TAG}s$m" > "$T/serial-$m.txt"
  [ -z "${BENCH_RAW:-}" ] || cp "$T/serial-$m.txt" "$BENCH_RAW-$m.txt"
  for p in evio-cni bridge; do
    for c in ADD DEL; do
      MED[$p-$c-$m]=$(awk -v p=$p -v c=$c '$1==p && $2==c {printf "%.3f\n", ($4-$3)*1000}' "$T/serial-$m.txt" | median)
      MIN[$p-$c-$m]=$(awk -v p=$p -v c=$c '$1==p && $2==c {printf "%.3f\n", ($4-$3)*1000}' "$T/serial-$m.txt" | minimum)
    done
  done
done

# Burst: BURST concurrent ADDs (then DELs), wall time; 3 alternating repetitions per plugin, median.
cat > "$T/burst.sh" <<'SH'
set -eu
# burst.sh TYPE CONF COUNT POD_PREFIX COMMAND
export CNI_PATH=$BIN CNI_IFNAME=eth0
s=$EPOCHREALTIME
for ((i = 0; i < $3; i++)); do
  CNI_COMMAND=$5 CNI_CONTAINERID=b$i CNI_NETNS=/run/netns/$4$i "$BIN/$1" < "$2" >/dev/null &
done
fail=0
for j in $(jobs -p); do wait "$j" || fail=1; done
e=$EPOCHREALTIME
[ $fail = 0 ] || { echo "FAIL burst $1 $5" >&2; exit 1; }
echo "$s $e" | awk '{printf "%.3f\n", ($2-$1)*1000}'
SH
declare -A BADD BDEL
for rep in 0 1 2; do
  if ((rep % 2 == 0)); then order="evio-cni bridge"; else order="bridge evio-cni"; fi
  for p in $order; do
    mkpods "$BURST" "${TAG}b$rep$p"
    BADD[$p]+="$(ip netns exec "$NODE" env BIN="$T/bin" bash "$T/burst.sh" $p "$T/$p-true.json" "$BURST" "${TAG}b$rep$p" ADD) "
    BDEL[$p]+="$(ip netns exec "$NODE" env BIN="$T/bin" bash "$T/burst.sh" $p "$T/$p-true.json" "$BURST" "${TAG}b$rep$p" DEL) "
  done
done
bmed() { tr ' ' '\n' | grep . | median; }
r() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

kernel=$(uname -r)
cat <<MD
# CNI plugin latency: evio-cni vs the reference bridge plugin

Produced by \`scripts/bench-cni.sh $N $BURST\` (release build of evio-cni) on $(date -u +%Y-%m-%d), kernel $kernel,
$(nproc) cores shared with other work (load average at the start: $LOAD0; at the end: $(cut -d" " -f1-3 /proc/loadavg)).

Setup: one throw-away node netns; each plugin gets the same config shape (\`cniVersion\` 1.0.0, \`isGateway\`,
\`isDefaultGateway\`, host-local IPAM with a /16 and its \`dataDir\` in a temp dir), its own bridge and
subnet. Each serial round does evio ADD, bridge ADD, then both DELs (the order alternates every round),
one attachment each into a fresh pod netns; the timing loop runs inside the node netns (a plain fork+exec
per run, bash \`EPOCHREALTIME\`), after one warm-up ADD per plugin. N = $N rounds per row. Reference:
containernetworking-plugins $(dpkg-query -W -f='${Version}' containernetworking-plugins 2>/dev/null || echo '?')
from /usr/lib/cni (its masquerade uses iptables; evio's uses one nft transaction).

| ipMasq | verb | evio-cni median (ms) | bridge median (ms) | ratio of medians | goal | evio-cni min | bridge min |
|---|---|---|---|---|---|---|---|
| false | ADD | ${MED[evio-cni-ADD-false]} | ${MED[bridge-ADD-false]} | $(r ${MED[evio-cni-ADD-false]} ${MED[bridge-ADD-false]}) | <= 0.5 | ${MIN[evio-cni-ADD-false]} | ${MIN[bridge-ADD-false]} |
| false | DEL | ${MED[evio-cni-DEL-false]} | ${MED[bridge-DEL-false]} | $(r ${MED[evio-cni-DEL-false]} ${MED[bridge-DEL-false]}) | <= 0.5 | ${MIN[evio-cni-DEL-false]} | ${MIN[bridge-DEL-false]} |
| true | ADD | ${MED[evio-cni-ADD-true]} | ${MED[bridge-ADD-true]} | $(r ${MED[evio-cni-ADD-true]} ${MED[bridge-ADD-true]}) | <= 0.5 | ${MIN[evio-cni-ADD-true]} | ${MIN[bridge-ADD-true]} |
| true | DEL | ${MED[evio-cni-DEL-true]} | ${MED[bridge-DEL-true]} | $(r ${MED[evio-cni-DEL-true]} ${MED[bridge-DEL-true]}) | <= 0.5 | ${MIN[evio-cni-DEL-true]} | ${MIN[bridge-DEL-true]} |

Burst: $BURST concurrent ADDs into $BURST fresh pod netns (ipMasq true), wall time from the first start to the
last exit, then $BURST concurrent DELs; 3 alternating repetitions per plugin, median.

| burst | evio-cni (ms) | bridge (ms) | ratio | goal |
|---|---|---|---|---|
| $BURST x ADD | $(echo ${BADD[evio-cni]} | bmed) | $(echo ${BADD[bridge]} | bmed) | $(r $(echo ${BADD[evio-cni]} | bmed) $(echo ${BADD[bridge]} | bmed)) | <= 0.5 |
| $BURST x DEL | $(echo ${BDEL[evio-cni]} | bmed) | $(echo ${BDEL[bridge]} | bmed) | $(r $(echo ${BDEL[evio-cni]} | bmed) $(echo ${BDEL[bridge]} | bmed)) | (info) |

Raw burst samples (ms): evio ADD ${BADD[evio-cni]}/ bridge ADD ${BADD[bridge]}/ evio DEL ${BDEL[evio-cni]}/ bridge DEL ${BDEL[bridge]}
MD
