#!/usr/bin/env bash
# One REGISTER flood against a fresh manager process on loopback, its memory sampled.
#
#   run.sh MANAGER LOADGEN LABEL PORT [IDS] [CONCURRENCY] [-- MANAGER FLAGS...]
#
# Starts MANAGER on 127.0.0.1:PORT (metrics on PORT+10), floods IDS (default 1,000,000)
# distinct ids with `LOADGEN hostile --register-flood`, each on its own connection closed
# with a reset at REGISTERED, CONCURRENCY (default 8) at a time, and writes into LABEL/ next
# to this script: the loadgen run (summary.json, report.txt, command.txt, machine.txt),
# samples.csv (one line per 100,000 ids: ids, seconds, VmRSS and VmHWM in KiB, directory
# entries and tombstones; empty where the manager has no such gauges), and the manager's
# stdout/stderr (its counters as JSON at SIGTERM).
set -euo pipefail
mgr=$1 lg=$2 label=$3 port=$4 ids=${5:-1000000} conc=${6:-8}
shift $(( $# < 6 ? $# : 6 ))
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")" && pwd)
out=$here/$label
mkdir -p "$out"
"$mgr" --listen 127.0.0.1:"$port" --metrics 127.0.0.1:$((port + 10)) "$@" >"$out/manager.stdout" 2>"$out/manager.stderr" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^metrics' "$out/manager.stdout" && break; sleep 0.1; done
"$lg" hostile --register-flood "$ids" --flood-concurrency "$conc" \
    --manager 127.0.0.1:"$port" --manager-pid "$pid" --manager-metrics http://127.0.0.1:$((port + 10))/metrics \
    --out "$out" 2>"$out/loadgen.stderr" | tee "$out/stdout.txt"
{ echo "ids,secs,vm_rss_kb,vm_hwm_kb,directory_entries,directory_tombstones"; grep '^flood,' "$out/loadgen.stderr" | cut -d, -f2-; } >"$out/samples.csv"
kill -TERM $pid
wait $pid || true
trap - EXIT
