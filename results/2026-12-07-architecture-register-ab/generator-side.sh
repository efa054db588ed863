#!/bin/bash
# old vs new loadgen against the same external manager (new), ABBA.
for r in 1 2 3; do  # binaries: /tmp/manager-aaca4e9, /tmp/manager-new, /tmp/loadgen-aaca4e9, /tmp/loadgen-new (release builds of aaca4e9 and of this commit)
  for g in old new new old; do
    lg=/tmp/loadgen-aaca4e9; [ $g = new ] && lg=/tmp/loadgen-new
    port=$((7600 + RANDOM % 300))
    /tmp/manager-new --listen 127.0.0.1:$port --stun-rate 0 --frames-per-sec 0 --max-calls-per-conn 0 > /tmp/m.out 2>/dev/null &
    mp=$!
    sleep 0.5
    line=$($lg register --clients 10000 --rate 2000 --hold 3 --manager 127.0.0.1:$port --json 2>/dev/null | tail -1)
    kill $mp; wait $mp 2>/dev/null
    echo "$g $(echo "$line" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["register_p50_ms"], v["register_p99_ms"], v["registered"])')"
  done
done
