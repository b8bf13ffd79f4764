#!/usr/bin/env bash
# Before/after benchmark of eviod's data-plane locking, interleaved: two host namespaces joined by a veth,
# etcd, N extra (unreachable) registered peers so that status and metrics have work to do; every round
# runs each build once (agents restarted with that build on the same state, so same keys and VIPs):
#   1 TCP stream and 4 TCP streams VIP to VIP (iperf3), idle p50/p99 RTT (ping -i 0.01),
#   the same 1 stream and RTT while a client hammers the control socket (status and metrics in turn,
#   as fast as the agent answers: the "scrape stalls forwarding" case), and how many scrapes/s it got.
# Medians over rounds. Needs root; removes everything it made on exit.
#
# Usage: scripts/bench-lock.sh BEFORE_EVIOD AFTER_EVIOD [ROUNDS] [SECONDS] [PEERS]
set -euo pipefail
A=$1 B=$2
ROUNDS=${3:-3}
SECS=${4:-5}
PEERS=${5:-200}
S=$(( $$ % 100000 ))
H1=elk1-$S H2=elk2-$S
D=$(mktemp -d /tmp/evio-bench-lock.XXXXXX)
cleanup() {
  exec 2>/dev/null
  for ns in $H1 $H2; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  if [[ -n "${KEEP:-}" ]]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
in1() { ip netns exec $H1 "$@"; }
in2() { ip netns exec $H2 "$@"; }
ip netns add $H1; ip netns add $H2
ip -n $H1 link add eth0 type veth peer name eth0 netns $H2
ip -n $H1 addr add 10.98.0.1/24 dev eth0; ip -n $H2 addr add 10.98.0.2/24 dev eth0
for ns in $H1 $H2; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
mkdir -m 700 $D/etcd
in1 etcd --name b --data-dir $D/etcd --listen-client-urls http://10.98.0.1:2379 \
  --advertise-client-urls http://10.98.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster b=http://127.0.0.1:2380 \
  --log-level warn > $D/etcd.log 2>&1 &
until in1 curl -sf http://10.98.0.1:2379/health | grep -q true; do sleep 0.05; done
ETCD=http://10.98.0.1:2379

declare -A PID
start() { # binary
  for i in 1 2; do
    ip netns exec elk$i-$S "$1" --node-name bench-$i --etcd-endpoints $ETCD --state-dir $D/evio$i \
      --listen-port 51820 >> $D/eviod$i.log 2>&1 &
    PID[$i]=$!
  done
  for i in $(seq 200); do [[ -S $D/evio1/eviod.sock && -S $D/evio2/eviod.sock ]] && break; sleep 0.05; done
}
stop() {
  for i in 1 2; do kill ${PID[$i]} 2>/dev/null || true; done
  for i in 1 2; do wait ${PID[$i]} 2>/dev/null || true; rm -f $D/evio$i/eviod.sock; done
}
vip() { python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(b"status\n"); print(json.loads(s.makefile().read())["address"])' "$1"; }
npeers() { python3 -c 'import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(b"status\n"); print(len(json.loads(s.makefile().read())["peers"]))' "$1"; }

# Extra peers (random keys, unreachable documentation addresses), registered once.
start "$A"
LEASE=$(in1 etcdctl --endpoints $ETCD lease grant 3600 -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ID"])')
# Records and address claims (the agents accept only registrations with a claim), through etcd's JSON API.
in1 python3 - $PEERS $ETCD $LEASE <<'PY'
import base64,json,os,sys,time,urllib.request
n_peers,etcd,lease=int(sys.argv[1]),sys.argv[2],sys.argv[3]
b64=lambda s: base64.b64encode(s.encode()).decode()
def put(k,v):
    body=json.dumps({"key":b64(k),"value":b64(json.dumps(v,separators=(",",":"))),"lease":lease}).encode()
    urllib.request.urlopen(urllib.request.Request(etcd+"/v3/kv/put",body)).read()
for n in range(1,n_peers+1):
    name,addr=f"fake-{n}",f"10.10.{100+n//250}.{n%250+1}"
    claim={"node":name,"address":addr,"since":int(time.time())}
    put(f"/evio/v1/addresses/by-address/{addr}",claim)
    put(f"/evio/v1/addresses/by-node/{name}",claim)
    # Any 32 bytes are an X25519 public key; nobody holds the private key: the peer never answers.
    pk=base64.b64encode(os.urandom(32)).decode()
    put(f"/evio/v1/nodes/{name}",{"node":name,"publicKey":pk,"address":addr,"podSubnet":None,"endpoints":[f"192.0.2.{n%250+1}:51820"]})
PY
for i in $(seq 300); do [[ $(npeers $D/evio1) -ge $((PEERS + 1)) ]] && break; sleep 0.1; done
echo "peers: $(npeers $D/evio1)"
stop

# The scraper: status and metrics in turn over the control socket until killed; prints requests made.
cat > $D/scrape.py <<'PY'
import socket,sys,signal,time
n=0
def done(*_):
    print(n); sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    for cmd in (b"status\n", b"metrics\n"):
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]+"/eviod.sock"); s.sendall(cmd)
        while s.recv(65536): pass
        s.close(); n+=1
PY
rtt() { in1 ping -c 200 -i 0.01 $V2 | python3 -c 'import sys,statistics,re; v=sorted(float(m) for m in re.findall(r"time=([0-9.]+)",sys.stdin.read())); print(f"{statistics.median(v):.3f} {v[int(len(v)*0.99)-1]:.3f}")'; }
gbps() { in1 iperf3 -c $V2 -t $SECS -P $1 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }

in2 iperf3 -s -D >/dev/null 2>&1
echo "build round gbps1 gbps4 rtt_p50 rtt_p99 scrape_gbps1 scrape_rtt_p50 scrape_rtt_p99 scrapes_per_s load1" > $D/results
for r in $(seq $ROUNDS); do
  for build in before after; do
    bin=$A; [[ $build == after ]] && bin=$B
    start "$bin"
    V2=$(vip $D/evio2)
    for i in $(seq 100); do [[ $(npeers $D/evio1) -ge $((PEERS + 1)) ]] && break; sleep 0.1; done
    for i in $(seq 100); do in1 ping -c1 -W1 $V2 >/dev/null 2>&1 && break; sleep 0.1; done
    g1=$(gbps 1); g4=$(gbps 4); read -r p50 p99 <<< "$(rtt)"
    python3 $D/scrape.py $D/evio1 > $D/scrapes & sp=$!
    t0=$(date +%s.%N)
    sg1=$(gbps 1); read -r sp50 sp99 <<< "$(rtt)"
    kill -TERM $sp; wait $sp || true
    t1=$(date +%s.%N)
    rate=$(python3 -c "print(round($(cat $D/scrapes)/($t1-$t0)))")
    stop
    echo "$build $r $g1 $g4 $p50 $p99 $sg1 $sp50 $sp99 $rate $(cut -d' ' -f1 /proc/loadavg)" | tee -a $D/results
  done
done
python3 - $D/results <<'PY'
import sys,statistics,collections
rows=[l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
by=collections.defaultdict(list)
for row in rows: by[row[0]].append([float(x) for x in row[2:]])
cols=["1 stream Gb/s","4 streams Gb/s","RTT p50 ms","RTT p99 ms","1 stream Gb/s, scraped","RTT p50 ms, scraped","RTT p99 ms, scraped","scrapes/s","load (1 min)"]
print()
print("| build | "+" | ".join(cols)+" |")
print("|---|"+"---|"*len(cols))
for b,v in by.items():
    med=[statistics.median(x[i] for x in v) for i in range(len(cols))]
    print(f"| {b} | "+" | ".join(f"{m:.2f}" if i not in (2,3,5,6) else f"{m:.3f}" for i,m in enumerate(med))+" |")
print(f"\n{len(rows)//2} rounds, medians; per round:")
for row in rows: print("  "+" ".join(row))
PY
