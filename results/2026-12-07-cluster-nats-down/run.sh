#!/usr/bin/env bash
# NATS killed under a cluster of two managers, then restarted.
#
#   run.sh [ROUNDS]    (default 5)
#
# nats-server (JetStream, a store that survives its restart) and two release managers
# (a, b). bob listens on b, carol on a. Each round: kill -9 the nats-server; 0.5 s later
# alice (on a) calls bob (on b): the call must fail at once with REJECT ClusterDown, timed
# as the whole peer process (start, STUN, REGISTER, CALL, the answer); dave (on a) calls carol
# (on a): the call must succeed with media both ways. Then nats-server is started again and
# alice calls bob every 0.2 s until a call succeeds: the heal time. One CSV line per round
# in results.csv.
set -euo pipefail
rounds=${1:-5}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mgr=$root/target/release/manager peer=$root/target/release/peer
scratch=$(mktemp -d)
nport=14242
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; pkill -f "nats-server -a 127.0.0.1 -p $nport" || true; sleep 0.5; rm -rf "$scratch"; }
trap cleanup EXIT
nats() { nats-server -a 127.0.0.1 -p $nport -js -sd "$scratch/js" >>"$here/nats.log" 2>&1 & natspid=$!; sleep 0.3; }
nats
"$mgr" --listen 127.0.0.1:17460 --alt-port off --cluster nats://127.0.0.1:$nport --node a >"$here/manager-a.stdout" 2>"$here/manager-a.stderr" &
pids+=($!)
"$mgr" --listen 127.0.0.1:17470 --alt-port off --cluster nats://127.0.0.1:$nport --node b >"$here/manager-b.stdout" 2>"$here/manager-b.stderr" &
pids+=($!)
sleep 1
"$peer" --manager 127.0.0.1:17470 --id bob --bind 127.0.0.1:0 listen --duration 600 --json >"$here/bob.json" 2>"$here/bob.stderr" &
pids+=($!)
"$peer" --manager 127.0.0.1:17460 --id carol --bind 127.0.0.1:0 listen --duration 600 --json >"$here/carol.json" 2>"$here/carol.stderr" &
pids+=($!)
sleep 1
now() { date +%s.%N; }
echo "round,cross_fail_s,cross_result,same_result,same_received,heal_s,heal_tries" >"$here/results.csv"
for r in $(seq "$rounds"); do
    kill -9 "$natspid"; wait "$natspid" 2>/dev/null || true
    sleep 0.5
    t0=$(now)
    "$peer" --manager 127.0.0.1:17460 --id alice --bind 127.0.0.1:0 call bob --duration 1 --json >"$here/cross-$r.json" 2>"$here/cross-$r.stderr" || true
    t1=$(now)
    "$peer" --manager 127.0.0.1:17460 --id dave --bind 127.0.0.1:0 call carol --duration 1 --json >"$here/same-$r.json" 2>"$here/same-$r.stderr" || true
    nats
    t2=$(now)
    tries=0
    while :; do
        tries=$((tries + 1))
        if "$peer" --manager 127.0.0.1:17460 --id alice --bind 127.0.0.1:0 call bob --duration 0.2 --json >"$here/heal-$r.json" 2>/dev/null; then break; fi
        [ "$tries" -ge 100 ] && break
        sleep 0.2
    done
    t3=$(now)
    cross=$(python3 -c "import json;print(json.load(open('$here/cross-$r.json'))['result'])")
    same=$(python3 -c "import json;r=json.load(open('$here/same-$r.json'));print(r['result'], r['received'], sep=',')")
    echo "$r,$(echo "$t1 - $t0" | bc),\"$cross\",$same,$(echo "$t3 - $t2" | bc),$tries" | tee -a "$here/results.csv"
done
