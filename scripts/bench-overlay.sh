#!/usr/bin/env bash
# Overlay benchmark: one TCP stream between two host network namespaces joined by a veth, over
#   underlay (bare veth path), evio (eviod, host VIP to VIP), wireguard-go (Debian 12), boringtun-cli,
#   and the newest peers from Debian 13 (wireguard-go 0.0.20231211 with offloads and batching, Nebula
#   1.9.3), interleaved (every round runs each system once), medians reported. Also p50 RTT (ping) and
#   eviod RSS with 1 and 50 peers. Needs root; removes everything it made on exit.
#
# Usage: scripts/bench-overlay.sh [ROUNDS] [SECONDS]
#   EVIOD=path (default target/release/eviod), EVIOD_ARGS="..." (extra flags of the evio pair, e.g.
#   "--tun-queues 2"), BORINGTUN=path (default: boringtun-cli on PATH or
#   /tmp/evio-bench-boringtun/bin/boringtun-cli; install with
#   `cargo install boringtun-cli --root /tmp/evio-bench-boringtun`),
#   SYSTEMS="underlay evio evio-pod wggo boringtun wggo13 nebula13" (evio-pod: pod to pod over evio, pods
#   on a bridge, subnets claimed with EVIOCTL=path cni-config; evio-relay, not in the default list: a
#   second pair of agents, on their own etcd, that nftables lets meet only through a real coturn on H1's
#   underlay address: the relayed path), STREAMS=1 (parallel TCP streams),
#   PEERS_CACHE=dir (default target/bench-peers: Debian 13's wireguard-go and nebula are downloaded there
#   with apt-get download against a trixie source list and unpacked; nothing is installed).
set -euo pipefail
ROUNDS=${1:-5}
SECS=${2:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EVIOD=${EVIOD:-$ROOT/target/release/eviod}
BORINGTUN=${BORINGTUN:-$(command -v boringtun-cli || echo /tmp/evio-bench-boringtun/bin/boringtun-cli)}
EVIOCTL=${EVIOCTL:-$ROOT/target/release/evioctl}
[[ -x $EVIOCTL ]] || EVIOCTL=$ROOT/target/debug/evioctl
SYSTEMS=${SYSTEMS:-"underlay evio evio-pod wggo boringtun wggo13 nebula13"}
STREAMS=${STREAMS:-1}
PEERS_CACHE=${PEERS_CACHE:-$ROOT/target/bench-peers}

# The newest peers (TESTBED.md): Debian 13's packages, fetched once into the cache, never installed.
fetch_trixie() {
  [[ -x $PEERS_CACHE/usr/bin/wireguard-go && -x $PEERS_CACHE/usr/bin/nebula ]] && return
  local t; t=$(mktemp -d); mkdir -p $t/lists/partial $t/archives/partial "$PEERS_CACHE"
  echo "deb http://deb.debian.org/debian trixie main" > $t/sources.list
  local o="-o Dir::Etc::sourcelist=$t/sources.list -o Dir::Etc::sourceparts=- -o Dir::State::Lists=$t/lists -o Dir::Cache::Archives=$t/archives"
  apt-get $o -qq update && (cd $t && apt-get $o -qq download wireguard-go nebula)
  for d in $t/*.deb; do dpkg-deb -x $d "$PEERS_CACHE"; done
  rm -rf $t
}
if [[ " $SYSTEMS " == *" wggo13 "* || " $SYSTEMS " == *" nebula13 "* ]]; then fetch_trixie; fi
WGGO13=$PEERS_CACHE/usr/bin/wireguard-go NEBULA=$PEERS_CACHE/usr/bin/nebula NEBULA_CERT=$PEERS_CACHE/usr/bin/nebula-cert
# Debian 12's tools for the peers and the load (installed if missing; nothing else on the machine changes).
missing=""
for t in wg:wireguard-tools wireguard-go:wireguard-go iperf3:iperf3; do
  command -v ${t%%:*} >/dev/null || missing="$missing ${t#*:}"
done
if [[ -n $missing ]]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; fi
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
S=$(( $$ % 100000 ))
H1=evb1-$S H2=evb2-$S P1=evp1-$S P2=evp2-$S
# wireguard-go and boringtun keep their control sockets in /var/run/wireguard, shared by all namespaces:
# every instance needs its own interface name.
WG1=wga$S WG2=wgb$S BT1=bta$S BT2=btb$S W31=w3a$S W32=w3b$S NB1=nba$S NB2=nbb$S
D=$(mktemp -d /tmp/evio-bench.XXXXXX)

cleanup() {
  exec 2>/dev/null   # job-control "Killed" notices of the agents
  for ns in $H1 $H2 $P1 $P2; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  rm -f /var/run/wireguard/{$WG1,$WG2,$BT1,$BT2,$W31,$W32}.sock
  if [[ -n "${KEEP:-}" ]]; then echo "kept $D"; else rm -rf "$D"; fi
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
    --listen-port 51820 ${EVIOD_ARGS:-} > $D/eviod$i.log 2>&1 &
done
# evio-relay: a second pair of agents (own etcd, port, TUN and overlay range) whose datagrams may go only
# to or through coturn: nftables drops anything their port sends elsewhere (the other agent's underlay
# address, or its address inside the first evio tunnel), so the only path left is the TURN relay.
if [[ " $SYSTEMS " == *" evio-relay "* ]]; then
  mkdir -m 700 $D/etcd-r
  in1 etcd --name r --data-dir $D/etcd-r --listen-client-urls http://10.98.0.1:2479 \
    --advertise-client-urls http://10.98.0.1:2479 --listen-peer-urls http://127.0.0.1:2480 \
    --initial-advertise-peer-urls http://127.0.0.1:2480 --initial-cluster r=http://127.0.0.1:2480 \
    --log-level warn > $D/etcd-r.log 2>&1 &
  (umask 077; printf secret > $D/turn-password
   printf '%s\n' listening-ip=10.98.0.1 relay-ip=10.98.0.1 listening-port=3478 realm=evio lt-cred-mech \
     user=evio:secret fingerprint no-tls no-dtls no-cli no-software-attribute min-port=49152 \
     max-port=65535 allowed-peer-ip=10.98.0.0-10.98.0.255 log-file=stdout simple-log > $D/turnserver.conf)
  in1 turnserver -c $D/turnserver.conf > $D/turnserver.log 2>&1 &
  for i in 1 2; do
    ip netns exec evb$i-$S nft -f - <<EOF2
table inet evbench {
  chain out { type filter hook output priority 0;
    udp sport 51830 ip daddr != 10.98.0.1 drop
    udp sport 51830 udp dport 51830 drop
  }
}
EOF2
  done
  until in1 curl -sf http://10.98.0.1:2479/health | grep -q true; do sleep 0.05; done
  for i in 1 2; do
    ip netns exec evb$i-$S "$EVIOD" --node-name relay-$i --etcd-endpoints http://10.98.0.1:2479 \
      --state-dir $D/evior$i --listen-port 51830 --interface evior0 --overlay-cidr 10.12.0.0/16 \
      --stun 10.98.0.1:3478 --turn 10.98.0.1:3478 --turn-user evio --turn-password-file $D/turn-password \
      > $D/eviorelay$i.log 2>&1 &
  done
fi
# wireguard-go and boringtun-cli (same keys layout, own ports and addresses)
for t in wg bt; do
  wg genkey > $D/$t.k1; wg genkey > $D/$t.k2
  wg pubkey < $D/$t.k1 > $D/$t.p1; wg pubkey < $D/$t.k2 > $D/$t.p2
done
if [[ " $SYSTEMS " == *" wggo "* ]]; then
  in1 wireguard-go -f $WG1 > $D/wg1.log 2>&1 &
  in2 wireguard-go -f $WG2 > $D/wg2.log 2>&1 &
fi
if [[ " $SYSTEMS " == *" boringtun "* ]]; then
  in1 "$BORINGTUN" -f --disable-drop-privileges $BT1 > $D/bt1.log 2>&1 &
  in2 "$BORINGTUN" -f --disable-drop-privileges $BT2 > $D/bt2.log 2>&1 &
fi
if [[ " $SYSTEMS " == *" wggo13 "* ]]; then
  in1 "$WGGO13" -f $W31 > $D/w31.log 2>&1 &
  in2 "$WGGO13" -f $W32 > $D/w32.log 2>&1 &
fi
for pair in "$WG1 $WG2" "$BT1 $BT2" "$W31 $W32"; do
  set -- $pair
  [[ $1 == $WG1 && " $SYSTEMS " != *" wggo "* ]] && continue
  [[ $1 == $BT1 && " $SYSTEMS " != *" boringtun "* ]] && continue
  [[ $1 == $W31 && " $SYSTEMS " != *" wggo13 "* ]] && continue
  for i in $(seq 100); do ip -n $H1 link show $1 >/dev/null 2>&1 && ip -n $H2 link show $2 >/dev/null 2>&1 && break; sleep 0.1; done
done
setup_wg() { # dev1 dev2 net port type
  local d1=$1 d2=$2 net=$3 port=$4 t=$5
  in1 wg set $d1 private-key $D/$t.k1 listen-port $port peer $(cat $D/$t.p2) allowed-ips $net.2/32 endpoint 10.98.0.2:$port
  in2 wg set $d2 private-key $D/$t.k2 listen-port $port peer $(cat $D/$t.p1) allowed-ips $net.1/32 endpoint 10.98.0.1:$port
  in1 ip addr add $net.1/24 dev $d1; in2 ip addr add $net.2/24 dev $d2
  ip -n $H1 link set $d1 mtu 1420 up; ip -n $H2 link set $d2 mtu 1420 up
}
if [[ " $SYSTEMS " == *" wggo "* ]]; then setup_wg $WG1 $WG2 10.97.0 51821 wg; fi
if [[ " $SYSTEMS " == *" boringtun "* ]]; then setup_wg $BT1 $BT2 10.96.0 51822 bt; fi
if [[ " $SYSTEMS " == *" wggo13 "* ]]; then
  wg genkey > $D/w3.k1; wg genkey > $D/w3.k2; wg pubkey < $D/w3.k1 > $D/w3.p1; wg pubkey < $D/w3.k2 > $D/w3.p2
  setup_wg $W31 $W32 10.94.0 51823 w3
fi
# Nebula 1.9.3: a CA, one certificate per host, a static host map to the other host, any traffic allowed.
if [[ " $SYSTEMS " == *" nebula13 "* ]]; then
  mkdir -p $D/nebula
  "$NEBULA_CERT" ca -name bench -out-crt $D/nebula/ca.crt -out-key $D/nebula/ca.key
  for i in 1 2; do
    "$NEBULA_CERT" sign -ca-crt $D/nebula/ca.crt -ca-key $D/nebula/ca.key -name h$i -ip 10.95.0.$i/24 \
      -out-crt $D/nebula/h$i.crt -out-key $D/nebula/h$i.key
    other=$((3 - i)); dev=$([[ $i == 1 ]] && echo $NB1 || echo $NB2)
    cat > $D/nebula/h$i.yml <<EOF2
pki: {ca: $D/nebula/ca.crt, cert: $D/nebula/h$i.crt, key: $D/nebula/h$i.key}
static_host_map: {"10.95.0.$other": ["10.98.0.$other:4242"]}
lighthouse: {am_lighthouse: false}
listen: {host: 0.0.0.0, port: 4242}
punchy: {punch: false}
tun: {dev: $dev, mtu: 1420}
logging: {level: warning}
firewall:
  outbound: [{port: any, proto: any, host: any}]
  inbound: [{port: any, proto: any, host: any}]
EOF2
    ip netns exec evb$i-$S "$NEBULA" -config $D/nebula/h$i.yml > $D/nebula$i.log 2>&1 &
  done
fi

# evio VIPs (from the agents' status)
vip() { python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(b"status\n"); print(json.loads(s.makefile().read())["address"])' "$1"; }
for i in $(seq 100); do [[ -S $D/evio1/eviod.sock && -S $D/evio2/eviod.sock ]] && break; sleep 0.1; done
V2=$(vip $D/evio2)
VR2=""
if [[ " $SYSTEMS " == *" evio-relay "* ]]; then
  for i in $(seq 100); do [[ -S $D/evior1/eviod.sock && -S $D/evior2/eviod.sock ]] && break; sleep 0.1; done
  VR2=$(vip $D/evior2)
fi

# Pods (evio-pod): subnets claimed with `evioctl cni-config`, one pod netns per host on a bridge.
echo '{"podCIDR":"10.244.0.0/16","nodeBits":8}' > $D/net-conf.json
for i in 1 2; do
  mkdir -p $D/cni$i/net.d $D/cni$i/bin
  ip netns exec evb$i-$S "$EVIOCTL" cni-config --net-conf $D/net-conf.json --node-name bench-$i \
    --etcd-endpoints $ETCD --cni-conf-dir $D/cni$i/net.d --cni-bin-dir $D/cni$i/bin \
    --plugin-binary "$(dirname "$EVIOCTL")/evio-cni" > $D/cni$i.json 2> $D/cni$i.err
  gw=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["gateway"])' $D/cni$i.json)
  sub=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["subnet"])' $D/cni$i.json)
  pip=${gw%.1}.10
  h=evb$i-$S; p=evp$i-$S
  ip netns add $p; ip -n $p link set lo up
  ip -n $h link add eviobr0 type bridge; ip -n $h addr add $gw/${sub#*/} dev eviobr0; ip -n $h link set eviobr0 up
  ip -n $h link add vpod type veth peer name eth0 netns $p
  ip -n $h link set vpod master eviobr0; ip -n $h link set vpod up
  ip -n $p addr add $pip/${sub#*/} dev eth0; ip -n $p link set eth0 mtu 1420 up; ip -n $p route add default via $gw
  ip netns exec $h sysctl -qw net.ipv4.ip_forward=1
  eval POD$i=$pip
done
declare -A DST=([underlay]=10.98.0.2 [evio]=$V2 [evio-relay]=$VR2 [evio-pod]=$POD2 [wggo]=10.97.0.2 [boringtun]=10.96.0.2 [wggo13]=10.94.0.2 [nebula13]=10.95.0.2)
declare -A SRC=([underlay]=$H1 [evio]=$H1 [evio-relay]=$H1 [evio-pod]=$P1 [wggo]=$H1 [boringtun]=$H1 [wggo13]=$H1 [nebula13]=$H1)
for sys in $SYSTEMS; do
  for i in $(seq 100); do ip netns exec ${SRC[$sys]} ping -c1 -W1 ${DST[$sys]} >/dev/null 2>&1 && break; sleep 0.2; done
done
if [[ " $SYSTEMS " == *" evio-relay "* ]]; then
  # The relayed pair must really be relayed (and the first pair direct).
  path() { python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(b"status\n"); print(" ".join(p["path"] for p in json.loads(s.makefile().read())["peers"]))' "$1"; }
  echo "paths: evio $(path $D/evio1), evio-relay $(path $D/evior1)"
  [[ $(path $D/evior1) == relay ]] || { echo "evio-relay is not relayed" >&2; exit 1; }
fi
in2 iperf3 -s -D >/dev/null 2>&1
ip netns exec $P2 iperf3 -s -D >/dev/null 2>&1

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
    c0=$(cpu $H1 $H2 $P1 $P2)
    out=$(ip netns exec ${SRC[$sys]} /usr/bin/time -f "%U %S" iperf3 -c ${DST[$sys]} -t $SECS -P $STREAMS -J 2>$D/time) || { echo "$sys: iperf3 failed: $out" >&2; tail -5 $D/eviod*.log >&2; continue; }
    c1=$(cpu $H1 $H2 $P1 $P2)
    gbps=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
    busy=$(python3 -c "u,s=open('$D/time').read().split()[-2:]; print(($c1-$c0+float(u)+float(s))/$SECS)")
    rtt=$(ip netns exec ${SRC[$sys]} ping -c 50 -i 0.01 ${DST[$sys]} | python3 -c 'import sys,statistics,re; v=[float(m) for m in re.findall(r"time=([0-9.]+)",sys.stdin.read())]; print(statistics.median(v))')
    echo "$sys $r $gbps $busy $rtt" | tee -a $D/results
  done
done

# eviod memory: 1 peer, then 50 (49 more registrations with fresh keys and unreachable endpoints).
pid1=$(pgrep -f -- "--node-name bench-1 " | head -1)
rss() { awk '/VmRSS/ {print $2}' /proc/$pid1/status; }
RSS1=$(rss)
echo "eviod pid $pid1 rss ${RSS1} kB (1 peer)"
LEASE=$(in1 etcdctl --endpoints $ETCD lease grant 120 | awk '{print $2}')
for n in $(seq 3 51); do
  pk=$(wg genkey | wg pubkey)
  # The claims a registration needs to be accepted (docs/store.md): its VIP and its pod subnet.
  va="{\"node\":\"fake-$n\",\"address\":\"10.10.200.$n\"}"
  vs="{\"node\":\"fake-$n\",\"subnet\":\"10.250.$n.0/24\"}"
  for kv in "addresses/by-address/10.10.200.$n:$va" "addresses/by-node/fake-$n:$va" \
            "subnets/by-subnet/10.250.$n.0-24:$vs" "subnets/by-node/fake-$n:$vs"; do
    in1 etcdctl --endpoints $ETCD put "/evio/v1/${kv%%:*}" "${kv#*:}" > /dev/null
  done
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
