#!/usr/bin/env bash
# TLS against plain TCP on the manager's signalling port: loadgen setup at 5,000 calls/s
# for 20 s (talk 0) against the embedded manager, alternating the order each round.
# Run from the repository root after `cargo build --release -p loadgen`.
set -euo pipefail
D=results/2026-12-07-tls-setup
round=$1; shift
for k in "$@"; do
    a=(); [ "$k" = tls ] && a=(--tls)
    uptime > "$D/r$round/$k.load"
    target/release/loadgen setup --rate 5000 --duration 20 --talk 0 "${a[@]}" --out "$D/r$round/$k" > "$D/r$round/$k.txt" 2>&1
done
