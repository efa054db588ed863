#!/usr/bin/env bash
# Call setup across a cluster of three managers on one nats-server, all on this box.
#
#   run.sh [RATE] [SECS] [ROUNDS]          (defaults 5000, 10, 3)
#
# Starts nats-server (JetStream, scratch store) and three release managers as processes
# (`--cluster`, nodes a, b, c, 1 shard each, metrics on), then ROUNDS runs of
# `loadgen setup --rate RATE --duration SECS --talk 0 --manager A,B,C` (the clients spread
# over the three: a third of the calls within one manager, two thirds across), each into
# round-N/. The summary has setup_same_node_* and setup_cross_node_* (percentiles of each
# kind) and cross_node_added_p50_ms/p99_ms (what the hop between managers adds). Each
# manager's counters at the end go to manager-X.json, its CPU seconds to cpu.csv.
set -euo pipefail
rate=${1:-5000} secs=${2:-10} rounds=${3:-3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mgr=$root/target/release/manager lg=$root/target/release/loadgen
scratch=$(mktemp -d)
nport=14232
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; sleep 1; rm -rf "$scratch"; }
trap cleanup EXIT
nats-server -a 127.0.0.1 -p $nport -js -sd "$scratch/js" >"$here/nats.log" 2>&1 &
natspid=$!
pids+=($natspid)
sleep 0.5
declare -A mp
addrs=()
for n in a b c; do
    port=$((17410 + 10 * ($(printf "%d" "'$n") - 97)))
    "$mgr" --listen 127.0.0.1:$port --shards 1 --alt-port off --max-calls-per-conn 0 --metrics 127.0.0.1:$((port + 100)) \
        --cluster nats://127.0.0.1:$nport --node $n >"$here/manager-$n.stdout" 2>"$here/manager-$n.stderr" &
    mp[$n]=$!
    pids+=($!)
    addrs+=(127.0.0.1:$port)
done
sleep 2
managers=$(IFS=,; echo "${addrs[*]}")
cpu() { awk '{print ($14 + $15) / 100}' /proc/"$1"/stat; }
echo "round,cpu_a_s,cpu_b_s,cpu_c_s,cpu_nats_s" >"$here/cpu-$rate.csv"
for r in $(seq "$rounds"); do
    a0=$(cpu "${mp[a]}") b0=$(cpu "${mp[b]}") c0=$(cpu "${mp[c]}") n0=$(cpu $natspid)
    "$lg" setup --rate "$rate" --duration "$secs" --talk 0 --manager "$managers" --out "$here/rate-$rate-round-$r" \
        >"$here/rate-$rate-round-$r.txt" 2>"$here/rate-$rate-round-$r.stderr" || true
    echo "$r,$(echo "$(cpu "${mp[a]}") - $a0" | bc),$(echo "$(cpu "${mp[b]}") - $b0" | bc),$(echo "$(cpu "${mp[c]}") - $c0" | bc),$(echo "$(cpu $natspid) - $n0" | bc)" >>"$here/cpu-$rate.csv"
    sleep 2
done
for n in a b c; do
    kill -TERM "${mp[$n]}"
    wait "${mp[$n]}" || true
    tail -1 "$here/manager-$n.stdout" >"$here/manager-$n.json"
done
cat "$here/cpu-$rate.csv"
for r in $(seq "$rounds"); do
    python3 - "$here/rate-$rate-round-$r/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
keys = ["calls", "calls_ok", "achieved_rate", "setup_p50_ms", "setup_p99_ms", "setup_same_node_calls",
        "setup_same_node_p50_ms", "setup_same_node_p99_ms", "setup_cross_node_calls", "setup_cross_node_p50_ms",
        "setup_cross_node_p99_ms", "cross_node_added_p50_ms", "cross_node_added_p99_ms"]
print(sys.argv[1].split("/")[-2], {k: s.get(k) for k in keys})
PY
done
