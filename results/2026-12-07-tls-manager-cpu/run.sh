#!/bin/bash
# The manager's own CPU per call, in its own process, with and without TLS: a release
# manager on loopback (2 shards), loadgen setup against it at RATE calls/s for SECS s
# (--talk 0), the manager's utime + stime from /proc before and after. Alternating order.
# Run from the repository root after `cargo build --release -p loadgen -p manager`.
set -euo pipefail
OUT=results/2026-12-07-tls-manager-cpu
RATE=${RATE:-5000}; SECS=${SECS:-20}; ROUNDS=${ROUNDS:-2}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"; [ -n "${MPID:-}" ] && kill "$MPID" 2>/dev/null || true' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost -addext basicConstraints=critical,CA:FALSE \
  -days 1 -keyout "$TMP/k.pem" -out "$TMP/c.pem" 2>/dev/null
tick=$(getconf CLK_TCK)
: > "$OUT/runs.jsonl"
{ echo "cores: $(nproc)"; echo "kernel: $(uname -r)"; echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"; } > "$OUT/machine.txt"
run() { # MODE
  local mode=$1 extra=() margs=()
  if [ "$mode" = tls ]; then margs=(--tls-cert "$TMP/c.pem" --tls-key "$TMP/k.pem"); extra=(--tls --ca "$TMP/c.pem"); fi
  ./target/release/manager --listen 127.0.0.1:0 --shards 2 "${margs[@]}" > "$TMP/m.out" &
  MPID=$!
  for _ in $(seq 100); do grep -q '^listening' "$TMP/m.out" 2>/dev/null && break; sleep 0.05; done
  local addr; addr=$(awk '/^listening/ {print $2; exit}' "$TMP/m.out")
  local before; before=$(awk '{print $14 + $15}' /proc/$MPID/stat)
  local summary; summary=$(./target/release/loadgen setup --manager "$addr" --rate "$RATE" --duration "$SECS" --talk 0 "${extra[@]}" --json 2>/dev/null | tail -1)
  local after; after=$(awk '{print $14 + $15}' /proc/$MPID/stat)
  kill "$MPID"; wait "$MPID" 2>/dev/null || true; MPID=
  python3 - "$mode" "$before" "$after" "$tick" "$summary" >> "$OUT/runs.jsonl" <<'PY'
import json, sys
mode, before, after, tick, summary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
cpu = (after - before) / tick
ok = summary.get("calls_ok", 0)
print(json.dumps({"mode": mode, "manager_cpu_s": cpu, "calls_ok": ok, "calls": summary.get("calls"),
  "manager_cpu_us_per_call": cpu / ok * 1e6 if ok else None,
  "setup_p50_ms": summary.get("setup_p50_ms"), "setup_p99_ms": summary.get("setup_p99_ms"),
  "generator_cpu_cores": summary.get("cpu_cores")}))
PY
}
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then order="plain tls"; else order="tls plain"; fi
  for m in $order; do run "$m"; done
done
cat "$OUT/runs.jsonl"
