#!/bin/bash
# 19,968 clients (the manager binary holds RLIMIT_NOFILE less 32 connections: 19,968) registered at once with one manager process: three loadgen processes
# (a process may hold at most 20,000 descriptors here, and a client costs two on the
# generator's side), each with its own id prefix, against a separate manager (2 shards)
# whose memory and counters are read from /proc and its metrics endpoint during the hold.
# Usage: run.sh OUTDIR [RATE]   (from the repository root, after cargo build --release;
# RATE: connects per second per generator, default 700)
set -euo pipefail
OUT=$1; RATE=${2:-700}; mkdir -p "$OUT"
M=127.0.0.1:7490; METRICS=127.0.0.1:7491
./target/release/manager --listen $M --shards 2 --metrics $METRICS --stun-rate 0 2> "$OUT/manager.log" &
MPID=$!
trap 'kill $MPID 2>/dev/null; wait $MPID 2>/dev/null || true' EXIT
sleep 1
echo "manager fds at start: $(ls /proc/$MPID/fd | wc -l)" > "$OUT/manager.txt"
RSS0=$(awk '/VmRSS/{print $2}' /proc/$MPID/status)
rcvbuf() { awk '/^Udp:/{n++} /^Udp:/ && n==2 {print $6}' /proc/net/snmp; }
DROP0=$(rcvbuf)
echo "manager VmRSS before: $RSS0 kB" >> "$OUT/manager.txt"
PIDS=()
for p in a b c; do
  ./target/release/loadgen register --manager $M --clients 6656 --rate $RATE --hold 40 --id-prefix "$p-" \
    --out "$OUT/gen-$p" --json > "$OUT/gen-$p.json" 2> "$OUT/gen-$p.err" &
  PIDS+=($!)
done
# Read the manager 10 s after the ramp (6656 / RATE s), during the hold.
sleep $(( 6656 / RATE + 10 ))
RSS1=$(awk '/VmRSS/{print $2}' /proc/$MPID/status)
FDS1=$(ls /proc/$MPID/fd | wc -l)
curl -s http://$METRICS/metrics > "$OUT/manager-metrics-during-hold.txt"
OPEN=$(awk '/^nullpunch_manager_connections_open /{print $2}' "$OUT/manager-metrics-during-hold.txt")
REGS=$(awk '/^nullpunch_manager_registrations_total /{print $2}' "$OUT/manager-metrics-during-hold.txt")
{
  echo "manager VmRSS during the hold: $RSS1 kB"
  echo "manager fds during the hold: $FDS1"
  echo "manager connections open during the hold: $OPEN"
  echo "manager registrations so far: $REGS"
  echo "manager memory per connection: $(( (RSS1 - RSS0) * 1024 / ${OPEN%.*} )) bytes"
  echo "UDP datagrams dropped at full receive buffers (whole machine) during the ramp: $(( $(rcvbuf) - DROP0 ))"
} >> "$OUT/manager.txt"
rc=0
for pid in "${PIDS[@]}"; do wait $pid || rc=1; done
cat "$OUT/manager.txt"
exit $rc
