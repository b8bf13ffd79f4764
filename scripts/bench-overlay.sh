#!/usr/bin/env bash
# Overlay benchmark: one TCP stream between two host network namespaces joined by a veth, over
#   underlay (bare veth path), evio (eviod, host VIP to VIP), wireguard-go (Debian), boringtun-cli,
# interleaved (every round runs each system once), medians reported. Also p50 RTT (ping) and eviod RSS
# with 1 and 50 peers. Needs root; removes everything it made on exit.
#
# Usage: scripts/bench-overlay.sh [ROUNDS] [SECONDS]
#   EVIOD=path (default target/release/eviod), BORINGTUN=path (default: boringtun-cli on PATH or
#   /tmp/evio-bench-boringtun/bin/boringtun-cli; install with
#   `cargo install boringtun-cli --root /tmp/evio-bench-boringtun`), SYSTEMS="underlay evio wggo boringtun".
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EVIOD=${EVIOD:-$ROOT/target/release/eviod}
BORINGTUN=${BORINGTUN:-$(command -v boringtun-cli || echo /tmp/evio-bench-boringtun/bin/boringtun-cli)}
SYSTEMS=${SYSTEMS:-"underlay evio wggo boringtun"}
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
S=$(( $$ % 100000 ))
H1=evb1-$S H2=evb2-$S
WG=wgg$S BT=btn$S
D=$(mktemp -d /tmp/evio-bench.XXXXXX)

cleanup() {
  for ns in $H1 $H2; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  rm -f /var/run/wireguard/$WG.sock /var/run/wireguard/$BT.sock
  rm -rf "$D"
}
trap cleanup EXIT
in1() { ip netns exec $H1 "$@"; }
in2() { ip netns exec $H2 "$@"; }

ip netns add $H1; ip netns add $H2
ip -n $H1 link add eth0 type veth peer name eth0 netns $H2
ip -n $H1 addr add 10.98.0.1/24 dev eth0; ip -n $H2 addr add 10.98.0.2/24 dev eth0
for ns in $H1 $H2; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done

# etcd on H1's underlay address.
mkdir -m 700 $D/etcd
in1 etcd --name b --data-dir $D/etcd --listen-client-urls http://10.98.0.1:2379 \
  --advertise-client-urls http://10.98.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster b=http://127.0.0.1:2380 \
  --log-level warn > $D/etcd.log 2>&1 &
until in1 curl -sf http://10.98.0.1:2379/health | grep -q true; do sleep 0.05; done
ETCD=http://10.98.0.1:2379

# evio
for i in 1 2; do
  ns=evb$i-$S
  ip netns exec $ns "$EVIOD" --node-name bench-$i --etcd-endpoints $ETCD --state-dir $D/evio$i \
    --listen-port 51820 > $D/eviod$i.log 2>&1 &
done
# wireguard-go and boringtun-cli (same keys layout, own ports and addresses)
for t in wg bt; do
  wg genkey > $D/$t.k1; wg genkey > $D/$t.k2
  wg pubkey < $D/$t.k1 > $D/$t.p1; wg pubkey < $D/$t.k2 > $D/$t.p2
done
if [[ " $SYSTEMS " == *" wggo "* ]]; then
  in1 wireguard-go -f $WG > $D/wg1.log 2>&1 &
  in2 wireguard-go -f $WG > $D/wg2.log 2>&1 &
fi
if [[ " $SYSTEMS " == *" boringtun "* ]]; then
  in1 "$BORINGTUN" -f --disable-drop-privileges $BT > $D/bt1.log 2>&1 &
  in2 "$BORINGTUN" -f --disable-drop-privileges $BT > $D/bt2.log 2>&1 &
fi
sleep 1
setup_wg() { # dev net port type
  local dev=$1 net=$2 port=$3 t=$4
  in1 wg set $dev private-key $D/$t.k1 listen-port $port peer $(cat $D/$t.p2) allowed-ips $net.2/32 endpoint 10.98.0.2:$port
  in2 wg set $dev private-key $D/$t.k2 listen-port $port peer $(cat $D/$t.p1) allowed-ips $net.1/32 endpoint 10.98.0.1:$port
  in1 ip addr add $net.1/24 dev $dev; in2 ip addr add $net.2/24 dev $dev
  for ns in $H1 $H2; do ip -n $ns link set $dev mtu 1420 up; done
}
[[ " $SYSTEMS " == *" wggo "* ]] && setup_wg $WG 10.97.0 51821 wg
[[ " $SYSTEMS " == *" boringtun "* ]] && setup_wg $BT 10.96.0 51822 bt

# evio VIPs (from the agents' status)
vip() { python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(b"status\n"); print(json.loads(s.makefile().read())["address"])' "$1"; }
for i in $(seq 100); do [[ -S $D/evio1/eviod.sock && -S $D/evio2/eviod.sock ]] && break; sleep 0.1; done
V2=$(vip $D/evio2)
declare -A DST=([underlay]=10.98.0.2 [evio]=$V2 [wggo]=10.97.0.2 [boringtun]=10.96.0.2)
for sys in $SYSTEMS; do
  for i in $(seq 100); do in1 ping -c1 -W1 ${DST[$sys]} >/dev/null 2>&1 && break; sleep 0.2; done
done
in2 iperf3 -s -D -1 >/dev/null 2>&1 || true
in2 iperf3 -s -D >/dev/null 2>&1

# CPU seconds (utime+stime, all threads) of every process in both namespaces.
cpu() { python3 - "$@" <<'PY'
import os,sys,subprocess
t=0
for ns in sys.argv[1:]:
    for pid in subprocess.run(["ip","netns","pids",ns],capture_output=True,text=True).stdout.split():
        try: f=open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
        except OSError: continue
        t+=int(f[11])+int(f[12])+int(f[13])+int(f[14])
print(t/os.sysconf("SC_CLK_TCK"))
PY
}
echo "system round gbps busy_cores rtt_p50_ms" > $D/results
for r in $(seq $ROUNDS); do
  for sys in $SYSTEMS; do
    c0=$(cpu $H1 $H2)
    out=$(in1 /usr/bin/time -f "%U %S" iperf3 -c ${DST[$sys]} -t $SECS -J 2>$D/time)
    c1=$(cpu $H1 $H2)
    gbps=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
    busy=$(python3 -c "u,s=open('$D/time').read().split()[-2:]; print(($c1-$c0+float(u)+float(s))/$SECS)")
    rtt=$(in1 ping -c 50 -i 0.01 ${DST[$sys]} | python3 -c 'import sys,statistics,re; v=[float(m) for m in re.findall(r"time=([0-9.]+)",sys.stdin.read())]; print(statistics.median(v))')
    echo "$sys $r $gbps $busy $rtt" | tee -a $D/results
  done
done

# eviod memory: 1 peer, then 50 (49 more registrations with fresh keys and unreachable endpoints).
pid1=$(for p in $(ip netns pids $H1); do [[ $(cat /proc/$p/comm) == eviod ]] && echo $p; done)
rss() { awk '/VmRSS/ {print $2}' /proc/$pid1/status; }
RSS1=$(rss)
LEASE=$(in1 etcdctl --endpoints $ETCD lease grant 120 | awk '{print $2}')
for n in $(seq 3 51); do
  pk=$(wg genkey | wg pubkey)
  in1 etcdctl --endpoints $ETCD put /evio/v1/nodes/fake-$n \
    "{\"node\":\"fake-$n\",\"publicKey\":\"$pk\",\"address\":\"10.10.200.$n\",\"podSubnet\":\"10.250.$n.0/24\",\"endpoints\":[\"192.0.2.$n:51820\"]}" \
    --lease=$LEASE > /dev/null
done
for i in $(seq 100); do
  n=$(python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(b"status\n"); print(len(json.loads(s.makefile().read())["peers"]))' $D/evio1)
  [[ $n -ge 50 ]] && break; sleep 0.2
done
sleep 2
RSS50=$(rss)

python3 - $D/results "$RSS1" "$RSS50" "$n" <<'PY'
import sys,statistics,collections
rows=[l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
by=collections.defaultdict(list)
for s,r,g,b,t in rows: by[s].append((float(g),float(b),float(t)))
base_rtt=statistics.median(x[2] for x in by["underlay"]) if "underlay" in by else 0
print()
print("| system | Gb/s (median) | busy cores | Gb/s per busy core | p50 RTT ms | RTT added ms | runs |")
print("|---|---|---|---|---|---|---|")
for s,v in by.items():
    g=statistics.median(x[0] for x in v); b=statistics.median(x[1] for x in v); t=statistics.median(x[2] for x in v)
    print(f"| {s} | {g:.2f} | {b:.2f} | {g/b:.2f} | {t:.3f} | {t-base_rtt:+.3f} | {', '.join(f'{x[0]:.2f}' for x in v)} |")
print()
print(f"eviod RSS: {int(sys.argv[2])/1024:.1f} MiB with 1 peer, {int(sys.argv[3])/1024:.1f} MiB with {sys.argv[4]} peers")
PY
