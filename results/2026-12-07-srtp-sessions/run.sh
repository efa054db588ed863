#!/bin/bash
# SRTP (AEAD_AES_128_GCM, the default) against plain RTP (--no-srtp), the same binary, ABBA:
# loadgen sessions --sessions 2000 --duration 30. Run from the repository root after
# `cargo build --release -p loadgen`, on an otherwise idle machine.
set -euo pipefail
OUT=results/2026-12-07-srtp-sessions
scripts/ab "$OUT" "$OUT/loadgen-no-srtp" ./target/release/loadgen "${ROUNDS:-2}" \
  latency_p50_ms,latency_p99_ms,loss_ratio,cpu_cores,pps_delivered,frames_skipped \
  -- sessions --sessions 2000 --duration 30
