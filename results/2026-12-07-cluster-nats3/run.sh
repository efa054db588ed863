#!/usr/bin/env bash
# A 3-server NATS cluster losing one server under load.
#
#   run.sh [RATE] [SECS] [KILL_AT]     (defaults 1000, 20, 8)
#
# Three nats-servers in one NATS cluster (routes, JetStream, each its own store), three
# release managers (`--cluster` naming all three servers, each preferring a different one
# first, `--cluster-replicas 3`), and `loadgen setup --rate RATE --duration SECS --talk 0
# --manager A,B,C --live-csv live.csv`. KILL_AT seconds into the calls, `kill -9` of the
# first nats-server (the one manager a uses). Writes run/ (the loadgen run), live.csv (one
# line per second: calls placed, ok, failed, setup p50/p99), the managers' counters at the
# end, and killed.txt (when the server was killed, seconds after the calls began).
set -euo pipefail
rate=${1:-1000} secs=${2:-20} kill_at=${3:-8}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mgr=$root/target/release/manager lg=$root/target/release/loadgen
scratch=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; sleep 1; rm -rf "$scratch"; }
trap cleanup EXIT
ports=(14252 14253 14254) routes=(14262 14263 14264)
rl=$(printf 'nats://127.0.0.1:%s,' "${routes[@]}"); rl=${rl%,}
nats=()
for i in 0 1 2; do
    nats-server -a 127.0.0.1 -p "${ports[$i]}" -js -sd "$scratch/n$i" --server_name "n$i" --cluster_name np \
        --cluster "nats://127.0.0.1:${routes[$i]}" --routes "$rl" >"$here/nats-$i.log" 2>&1 &
    nats+=($!)
    pids+=($!)
done
sleep 3
u() { echo "nats://127.0.0.1:${ports[$1]}"; }
declare -A mp
addrs=()
i=0
for n in a b c; do
    port=$((17480 + 10 * i))
    order="$(u $i),$(u $(((i + 1) % 3))),$(u $(((i + 2) % 3)))"
    "$mgr" --listen 127.0.0.1:$port --shards 1 --alt-port off --max-calls-per-conn 0 --metrics 127.0.0.1:$((port + 100)) \
        --cluster "$order" --cluster-replicas 3 --node $n >"$here/manager-$n.stdout" 2>"$here/manager-$n.stderr" &
    mp[$n]=$!
    pids+=($!)
    addrs+=(127.0.0.1:$port)
    i=$((i + 1))
done
# Wait for the JetStream cluster and every node's directory.
for _ in $(seq 100); do
    up=0
    for i in 0 1 2; do
        curl -s "http://127.0.0.1:$((17580 + 10 * i))/metrics" | grep -q '^nullpunch_manager_cluster_up 1' && up=$((up + 1))
    done
    [ $up -eq 3 ] && break
    sleep 0.2
done
managers=$(IFS=,; echo "${addrs[*]}")
"$lg" setup --rate "$rate" --duration "$secs" --talk 0 --manager "$managers" --live-every 1 --live-csv "$here/live.csv" \
    --out "$here/run" >"$here/run.txt" 2>"$here/run.stderr" &
lgpid=$!
sleep $((kill_at + 1))
kill -9 "${nats[0]}"
echo "nats-server n0 killed about ${kill_at} s into the calls (1 s of registration before them)" >"$here/killed.txt"
wait $lgpid || true
for n in a b c; do
    kill -TERM "${mp[$n]}"
    wait "${mp[$n]}" || true
    tail -1 "$here/manager-$n.stdout" >"$here/manager-$n.json"
done
grep -E "^calls:|setup \(plan|failed:" "$here/run.txt"
cat "$here/live.csv"
