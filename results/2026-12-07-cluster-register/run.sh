#!/usr/bin/env bash
# 60,000 registrations across a cluster of three managers on one nats-server, on loopback.
#
#   run.sh [CLIENTS_PER_NODE] [HOLD_SECS]      (defaults 20000, 30)
#
# Starts nats-server (JetStream, a scratch store) and three release managers (`--cluster`,
# nodes a, b, c), then three `loadgen register` processes at once, one per manager, each
# registering CLIENTS_PER_NODE clients (ids a-0.., b-0.., c-0..; source IPs 127.0.1.x,
# 127.0.2.x, 127.0.3.x) and holding them HOLD_SECS. Writes next to this script: each
# loadgen's run (node-X/), each manager's RSS at rest and at hold (rss.csv), and each
# manager's counters at SIGTERM (node-X/manager.json), including cluster_entries: how many
# directory entries every node knew (all 60,000 on each node means every registration was
# written to the cluster directory and seen by every other node).
set -euo pipefail
per=${1:-20000} hold=${2:-30}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mgr=$root/target/release/manager lg=$root/target/release/loadgen
scratch=$(mktemp -d)
nport=14222
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; sleep 1; rm -rf "$scratch"; }
trap cleanup EXIT
nats-server -a 127.0.0.1 -p $nport -js -sd "$scratch/js" >"$here/nats.log" 2>&1 &
pids+=($!)
sleep 0.5
rss() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }
echo "node,rss_rest_kb,rss_hold_kb,connections_open,cluster_entries" >"$here/rss.csv"
declare -A mp
for n in a b c; do
    mkdir -p "$here/node-$n"
    port=$((17440 + 10 * ($(printf "%d" "'$n") - 97)))
    "$mgr" --listen 127.0.0.1:$port --metrics 127.0.0.1:$((port + 100)) --cluster nats://127.0.0.1:$nport --node $n --alt-port off --shards 2 \
        >"$here/node-$n/manager.stdout" 2>"$here/node-$n/manager.stderr" &
    mp[$n]=$!
    pids+=($!)
done
sleep 1
declare -A rest
for n in a b c; do rest[$n]=$(rss "${mp[$n]}"); done
i=0
lpids=()
for n in a b c; do
    i=$((i + 1))
    port=$((17440 + 10 * ($(printf "%d" "'$n") - 97)))
    "$lg" register --clients "$per" --rate 5000 --hold "$hold" --manager 127.0.0.1:$port \
        --manager-pid "${mp[$n]}" --id-prefix "$n-" --bind-ip 127.0.$i.1 --out "$here/node-$n" \
        >"$here/node-$n/stdout.txt" 2>"$here/node-$n/loadgen.stderr" &
    lpids+=($!)
done
# The hold: sample each manager's RSS in the middle of it.
sleep $((per / 5000 + hold / 2 + 3))
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
for n in a b c; do
    port=$((17440 + 10 * ($(printf "%d" "'$n") - 97)))
    echo "$n,${rest[$n]},$(rss "${mp[$n]}"),$(metric $((port + 100)) nullpunch_manager_connections_open),$(metric $((port + 100)) nullpunch_manager_cluster_entries)" >>"$here/rss.csv"
done
for p in "${lpids[@]}"; do wait "$p" || true; done
for n in a b c; do
    kill -TERM "${mp[$n]}"
    wait "${mp[$n]}" || true
    tail -1 "$here/node-$n/manager.stdout" >"$here/node-$n/manager.json"
done
cat "$here/rss.csv"
for n in a b c; do
    echo "node $n: $(grep -o '"registrations":[0-9]*\|"cluster_writes":[0-9]*\|"cluster_write_failures":[0-9]*\|"registrations_replaced":[0-9]*' "$here/node-$n/manager.json" | tr '\n' ' ')"
done
